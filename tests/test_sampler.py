"""runtime_ref.sampler against straight torch transliterations of the official samplers.

The transliterations below are written as the official code reads (ML-GSAI/LLaDA generate.py, newest
batched version; Dream generation_utils.py ``sample_tokens`` / ``top_p_logits`` / ``top_k_logits`` /
``_sample`` without attention mask), operating on torch tensors and a ``model(x).logits`` callable.
Both they and the NumPy sampler are driven by the same deterministic fake model.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F

from formats.errors import QdllmError
from runtime_ref.backend import shift_right
from runtime_ref.sampler import (
    dream_generate,
    dream_timesteps,
    get_num_transfer_tokens,
    llada_generate,
)

V = 50
MASK = V - 1


# ------------------------------------------------------------------------------------------------
# fake model
# ------------------------------------------------------------------------------------------------


class FakeModel:
    """Deterministic logits that depend on the whole canvas (token + position embeddings, a global
    context vector, a nonlinearity, a linear head). Continuous random weights: no exact ties. The
    mask token is made unlikely so rows never drift apart."""

    def __init__(self, seed: int = 0, vocab: int = V, d: int = 16, max_len: int = 64, scale: float = 1.5):
        rng = np.random.default_rng(seed)
        self.E = rng.normal(size=(vocab, d))
        self.P = rng.normal(size=(max_len, d))
        self.A = rng.normal(size=(d, d)) / np.sqrt(d)
        self.W = rng.normal(size=(d, vocab)) * scale
        self.b = rng.normal(size=vocab) * 0.3
        self.vocab = vocab
        self.calls: list[np.ndarray] = []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        self.calls.append(ids.copy())
        T = ids.shape[1]
        e = self.E[ids]
        # neighbours (masked or not) and a global context vector make every logit depend on the canvas
        h = e + self.P[:T][None] + 0.8 * (np.roll(e, 1, axis=1) + np.roll(e, -1, axis=1))
        ctx = np.tanh(2.0 * h.mean(axis=1, keepdims=True) @ self.A)
        h2 = np.tanh(h + ctx)
        logits = h2 @ self.W + self.b
        logits[..., self.vocab - 1] -= 8.0  # the mask token is (almost) never predicted
        return logits.astype(np.float32)


def torch_model(np_fn):
    """``model(x).logits`` interface of the official code around a NumPy logits function."""

    def model(x, *args, **kwargs):
        return types.SimpleNamespace(logits=torch.from_numpy(np_fn(x.numpy())))

    return model


# ------------------------------------------------------------------------------------------------
# official LLaDA generate.py, transliterated
# ------------------------------------------------------------------------------------------------


def official_add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def official_get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def official_llada_generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0,
                            cfg_scale=0.0, remasking="low_confidence", mask_id=126336):
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()

    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length

    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        block_mask_index = (
            x[:, prompt.shape[1] + num_block * block_length: prompt.shape[1] + (num_block + 1) * block_length:]
            == mask_id
        )
        num_transfer_tokens = official_get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                logits = model(x_).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits

            logits_with_noise = official_add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length:] = -np.inf

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]

    return x


# ------------------------------------------------------------------------------------------------
# official Dream generation_utils.py, transliterated
# ------------------------------------------------------------------------------------------------


def official_top_p_logits(logits, top_p=None):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool, device=logits.device)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits


def official_top_k_logits(logits, top_k=None):
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    logits = logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)
    return logits


def official_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False,
                           neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = official_top_p_logits(logits, top_p)
    if top_k is not None:
        logits = official_top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)

    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)

    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        top1_probs = sorted_probs[:, 0]
        top2_probs = sorted_probs[:, 1]
        confidence = top1_probs - top2_probs

    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)

    return confidence, x0


@torch.no_grad()
def official_dream_sample(model, input_ids, *, max_length, mask_token_id, steps, eps=1e-3, alg="origin",
                          alg_temp=None, temperature=0.0, top_p=None, top_k=None):
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    attention_mask = "full"
    tok_idx = None
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = model(x, attention_mask, tok_idx).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]

        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], device=x.device, dtype=torch.long) + mask_token_id
            transfer_index_t_s = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer_index_t_s] = official_sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k)
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = official_sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k)
            elif alg == "topk_margin":
                confidence, x0 = official_sample_tokens(mask_logits, temperature=temperature, top_p=top_p,
                                                        top_k=top_k, margin_confidence=True)
            elif alg == "entropy":
                confidence, x0 = official_sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k,
                                                        neg_entropy=True)
            else:
                raise RuntimeError(f"Unknown alg: {alg}")
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, device=x.device, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
                x_ = torch.zeros_like(x, device=x.device, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_prompt(B=2, Lp=5, seed=1):
    return np.random.default_rng(seed).integers(0, V - 1, size=(B, Lp)).astype(np.int64)


def masks_per_call(calls, B):
    """Number of mask tokens per conditional row at each recorded model call."""
    return [(c[:B] == MASK).sum(axis=1) for c in calls]


# ------------------------------------------------------------------------------------------------
# LLaDA: exact agreement at temperature 0
# ------------------------------------------------------------------------------------------------

LLADA_COMBOS = [
    # steps, gen_length, block_length
    (8, 8, 8),     # one token per step
    (4, 8, 8),     # two per step
    (3, 8, 8),     # remainder: 3, 3, 2
    (8, 16, 4),    # 4 blocks, 2 steps per block
    (10, 12, 6),   # 2 blocks, 5 steps for 6 masks: 2, 1, 1, 1, 1
    (16, 8, 4),    # more steps than masks in a block: zero-budget steps
]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5, 0.7])
@pytest.mark.parametrize("steps,gen_length,block_length", LLADA_COMBOS)
def test_llada_greedy_matches_official(steps, gen_length, block_length, cfg_scale):
    model = FakeModel(seed=3)
    prompt = make_prompt(B=2, Lp=5)
    ours = llada_generate(model, prompt, mask_id=MASK, steps=steps, gen_length=gen_length,
                          block_length=block_length, cfg_scale=cfg_scale)
    ref = official_llada_generate(torch_model(model), torch.from_numpy(prompt), steps=steps,
                                  gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale,
                                  mask_id=MASK).numpy()
    assert ours.dtype == np.int64 and ours.shape == (2, 5 + gen_length)
    np.testing.assert_array_equal(ours, ref)
    assert not (ours == MASK).any()


def test_llada_greedy_matches_official_other_models():
    for seed in range(4):
        model = FakeModel(seed=100 + seed, scale=3.0)
        prompt = make_prompt(B=3, Lp=4, seed=seed)
        ours = llada_generate(model, prompt, mask_id=MASK, steps=6, gen_length=12, block_length=4)
        ref = official_llada_generate(torch_model(model), torch.from_numpy(prompt), steps=6, gen_length=12,
                                      block_length=4, mask_id=MASK).numpy()
        np.testing.assert_array_equal(ours, ref)


def test_num_transfer_tokens_matches_official():
    rng = np.random.default_rng(0)
    for _ in range(50):
        B, L = rng.integers(1, 5), rng.integers(1, 40)
        steps = int(rng.integers(1, 50))
        m = rng.random((B, L)) < rng.random()
        ours = get_num_transfer_tokens(m, steps)
        ref = official_get_num_transfer_tokens(torch.from_numpy(m), steps).numpy()
        np.testing.assert_array_equal(ours, ref)
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours.sum(axis=1), m.sum(axis=1))


# ------------------------------------------------------------------------------------------------
# LLaDA: stochastic paths (properties)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(remasking="random"),
    dict(temperature=1.0),
    dict(temperature=0.7, remasking="random", cfg_scale=0.5),
])
def test_llada_stochastic_properties(kwargs):
    prompt = make_prompt(B=2, Lp=5)
    steps, gen_length, block_length = 6, 12, 4
    model = FakeModel(seed=5)
    a = llada_generate(model, prompt, mask_id=MASK, steps=steps, gen_length=gen_length,
                       block_length=block_length, seed=11, **kwargs)
    b = llada_generate(FakeModel(seed=5), prompt, mask_id=MASK, steps=steps, gen_length=gen_length,
                       block_length=block_length, seed=11, **kwargs)
    c = llada_generate(FakeModel(seed=5), prompt, mask_id=MASK, steps=steps, gen_length=gen_length,
                       block_length=block_length, seed=12, **kwargs)
    np.testing.assert_array_equal(a, b)          # same seed, same output
    assert not np.array_equal(a, c)              # different seed, different output
    np.testing.assert_array_equal(a[:, :5], prompt)  # prompt untouched
    assert not (a == MASK).any()                 # every mask filled

    # tokens committed per step follow the schedule, block by block, and never outside the block
    calls = model.calls
    assert len(calls) == steps
    canvases = [c[:2] for c in calls] + [a]
    per_block = steps // (gen_length // block_length)
    for i in range(steps):
        before, after = canvases[i], canvases[i + 1]
        committed = (before == MASK) & (after != MASK)
        changed = before != after
        np.testing.assert_array_equal(changed, committed)  # nothing committed is ever remasked/changed
        nb = i // per_block
        lo, hi = 5 + nb * block_length, 5 + (nb + 1) * block_length
        assert not committed[:, :lo].any() and not committed[:, hi:].any()
        expected = get_num_transfer_tokens(np.ones((2, block_length), bool), per_block)[:, i % per_block]
        np.testing.assert_array_equal(committed.sum(axis=1), expected)
    if kwargs.get("cfg_scale"):
        for c in calls:  # unconditional half: prompt masked, generated part identical
            assert (c[2:, :5] == MASK).all()
            np.testing.assert_array_equal(c[2:, 5:], c[:2, 5:])


def peaked_model(token: int, gap: float = 30.0):
    def fn(ids):
        out = np.zeros(ids.shape + (V,), dtype=np.float32)
        out[..., token] = gap
        return out
    return fn


def test_llada_temperature_picks_dominant_token():
    prompt = make_prompt(B=2, Lp=3)
    out = llada_generate(peaked_model(7), prompt, mask_id=MASK, steps=4, gen_length=8, block_length=4,
                         temperature=1.0, seed=3)
    assert (out[:, 3:] == 7).all()
    out = llada_generate(peaked_model(7), prompt, mask_id=MASK, steps=4, gen_length=8, block_length=4,
                         temperature=2.0, remasking="random", seed=4)
    assert (out[:, 3:] == 7).all()


def test_llada_huge_logits_do_not_overflow():
    # exp(800) overflows float64 in the official expression; the log form picks the right token
    out = llada_generate(peaked_model(9, gap=800.0), make_prompt(B=1, Lp=2), mask_id=MASK, steps=2,
                         gen_length=4, block_length=4, temperature=1.0)
    assert (out[:, 2:] == 9).all()


def order_revealing_model(ids):
    """Same logits at every position (exact ties); the preferred token is the number of tokens
    already committed, so the output reveals the order in which positions were committed."""
    filled = (ids != MASK).sum(axis=1)  # [B]
    out = np.zeros(ids.shape + (V,), dtype=np.float32)
    out[np.arange(ids.shape[0]), :, filled % (V - 1)] = 5.0
    return out


def test_llada_ties_break_lowest_position_first():
    prompt = np.zeros((2, 3), dtype=np.int64) + 40
    out = llada_generate(order_revealing_model, prompt, mask_id=MASK, steps=8, gen_length=8, block_length=8)
    np.testing.assert_array_equal(out[:, 3:], np.tile(np.arange(3, 11), (2, 1)))
    # two per step: positions (0,1) at step 0, (2,3) at step 1, ...
    out = llada_generate(order_revealing_model, prompt, mask_id=MASK, steps=4, gen_length=8, block_length=8)
    np.testing.assert_array_equal(out[0, 3:], [3, 3, 5, 5, 7, 7, 9, 9])


def test_llada_progress_and_validation():
    seen = []
    llada_generate(FakeModel(), make_prompt(B=1), mask_id=MASK, steps=4, gen_length=8, block_length=4,
                   progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(QdllmError, match="multiple of block_length"):
        llada_generate(FakeModel(), make_prompt(), mask_id=MASK, steps=4, gen_length=10, block_length=4)
    with pytest.raises(QdllmError, match="number of blocks"):
        llada_generate(FakeModel(), make_prompt(), mask_id=MASK, steps=5, gen_length=8, block_length=4)
    with pytest.raises(QdllmError, match="remasking"):
        llada_generate(FakeModel(), make_prompt(), mask_id=MASK, steps=4, gen_length=8, remasking="x")
    with pytest.raises(QdllmError, match="2-D"):
        llada_generate(FakeModel(), np.arange(3), mask_id=MASK, steps=4, gen_length=8)
    with pytest.raises(QdllmError, match="logits_fn returned shape"):
        llada_generate(lambda ids: np.zeros((1, 2, 3), np.float32), make_prompt(), mask_id=MASK, steps=2,
                       gen_length=2, block_length=2)


# ------------------------------------------------------------------------------------------------
# Dream: exact agreement at temperature 0
# ------------------------------------------------------------------------------------------------


def test_dream_timesteps_match_torch_linspace():
    for eps in (1e-3, 1e-2, 0.05, 1e-4, 0.3):
        for steps in list(range(1, 300)) + [511, 512, 1000, 1024]:
            np.testing.assert_array_equal(dream_timesteps(steps, eps),
                                          torch.linspace(1, eps, steps + 1).numpy())


DREAM_CASES = [
    # alg, steps, max_new_tokens, extra
    ("maskgit_plus", 12, 12, {}),
    ("maskgit_plus", 5, 12, {}),
    ("topk_margin", 12, 12, {}),
    ("topk_margin", 4, 10, {}),
    ("entropy", 12, 12, {}),
    ("entropy", 6, 16, {}),
    # top-p / top-k: a flatter model (scale 0.5) so that several tokens survive the filter at every
    # position; a single survivor has confidence exactly 1 (or 0 entropy), and such exact ties are
    # broken differently by torch.topk (unspecified) and by us (lowest position first).
    ("maskgit_plus", 6, 12, {"top_k": 5}),
    ("entropy", 6, 12, {"top_p": 0.9, "scale": 0.5}),
    ("topk_margin", 8, 12, {"top_p": 0.8, "top_k": 7, "eps": 0.05, "scale": 0.5}),
    ("maskgit_plus", 5, 12, {"top_p": 0.7, "scale": 0.5}),
    ("maskgit_plus", 3, 12, {"alg_temp": 0.0}),
]


@pytest.mark.parametrize("alg,steps,max_new_tokens,extra", DREAM_CASES)
def test_dream_greedy_matches_official(alg, steps, max_new_tokens, extra):
    extra = dict(extra)
    raw = FakeModel(seed=7, scale=extra.pop("scale", 1.5))  # unshifted: the official code shifts
    prompt = make_prompt(B=2, Lp=4, seed=2)
    ours = dream_generate(lambda ids: shift_right(raw(ids)), prompt, mask_id=MASK, max_new_tokens=max_new_tokens,
                          steps=steps, alg=alg, **extra)
    ref = official_dream_sample(
        torch_model(raw), torch.from_numpy(prompt), max_length=4 + max_new_tokens, mask_token_id=MASK,
        steps=steps, alg=alg, **extra).numpy()
    assert ours.dtype == np.int64 and ours.shape == (2, 4 + max_new_tokens)
    np.testing.assert_array_equal(ours, ref)
    assert not (ours == MASK).any()


def test_dream_greedy_matches_official_other_models():
    for seed in range(3):
        raw = FakeModel(seed=200 + seed, scale=2.5)
        prompt = make_prompt(B=3, Lp=3, seed=seed)
        for alg in ("maskgit_plus", "topk_margin", "entropy"):
            ours = dream_generate(lambda ids: shift_right(raw(ids)), prompt, mask_id=MASK, max_new_tokens=10,
                                  steps=7, alg=alg)
            ref = official_dream_sample(torch_model(raw), torch.from_numpy(prompt), max_length=13,
                                        mask_token_id=MASK, steps=7, alg=alg).numpy()
            np.testing.assert_array_equal(ours, ref)


def test_dream_uneven_rows_batch_averaged_count_matches_official():
    # A mask token inside row 0's prompt gives the rows different mask counts: the official code
    # averages the count over the batch (and may leave a mask in the fuller row); we do the same.
    raw = FakeModel(seed=8)
    prompt = make_prompt(B=2, Lp=5, seed=4)
    prompt[0, 2] = MASK
    for alg, steps in (("maskgit_plus", 6), ("entropy", 12), ("topk_margin", 5)):
        ours = dream_generate(lambda ids: shift_right(raw(ids)), prompt, mask_id=MASK, max_new_tokens=10,
                              steps=steps, alg=alg)
        ref = official_dream_sample(torch_model(raw), torch.from_numpy(prompt), max_length=15, mask_token_id=MASK,
                                    steps=steps, alg=alg).numpy()
        np.testing.assert_array_equal(ours, ref)


def test_llada_mask_in_prompt_matches_official():
    model = FakeModel(seed=12)
    prompt = make_prompt(B=2, Lp=5, seed=6)
    prompt[1, 3] = MASK
    for cfg in (0.0, 1.0):
        ours = llada_generate(model, prompt, mask_id=MASK, steps=6, gen_length=12, block_length=4, cfg_scale=cfg)
        ref = official_llada_generate(torch_model(model), torch.from_numpy(prompt), steps=6, gen_length=12,
                                      block_length=4, cfg_scale=cfg, mask_id=MASK).numpy()
        np.testing.assert_array_equal(ours, ref)


def test_dream_ties_break_lowest_position_first():
    prompt = np.zeros((1, 2), dtype=np.int64) + 40
    out = dream_generate(order_revealing_model, prompt, mask_id=MASK, max_new_tokens=8, steps=8,
                         alg="maskgit_plus")
    gen = out[0, 2:]
    assert gen[0] == 2 and (np.diff(gen) >= 0).all()  # committed left to right


# ------------------------------------------------------------------------------------------------
# Dream: stochastic paths (properties)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(alg="origin"),
    dict(alg="origin", temperature=0.8, top_p=0.95),
    dict(alg="maskgit_plus", alg_temp=0.5),
    dict(alg="entropy", temperature=0.5, top_k=10, alg_temp=0.2),
    dict(alg="topk_margin", temperature=1.0),
])
def test_dream_stochastic_properties(kwargs):
    prompt = make_prompt(B=2, Lp=4, seed=2)
    steps, n_new = 8, 12
    raw = FakeModel(seed=9)
    calls = []

    def fn(ids):
        calls.append(ids.copy())
        return shift_right(raw(ids))

    a = dream_generate(fn, prompt, mask_id=MASK, max_new_tokens=n_new, steps=steps, seed=21, **kwargs)
    b = dream_generate(lambda ids: shift_right(raw(ids)), prompt, mask_id=MASK, max_new_tokens=n_new, steps=steps,
                       seed=21, **kwargs)
    c = dream_generate(lambda ids: shift_right(raw(ids)), prompt, mask_id=MASK, max_new_tokens=n_new, steps=steps,
                       seed=22, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :4], prompt)
    assert not (a == MASK).any()

    canvases = calls + [a]
    for before, after in zip(canvases[:-1], canvases[1:]):
        np.testing.assert_array_equal(before != after, (before == MASK) & (after != MASK))
    if kwargs["alg"] != "origin":
        # per-step commits follow int(n_mask * (1 - s/t)), all remaining at the last step
        ts = dream_timesteps(steps, 1e-3)
        n_mask = n_new
        expected = []
        for i in range(steps):
            n = int(np.float32(n_mask) * (np.float32(1) - ts[i + 1] / ts[i])) if i < steps - 1 else n_mask
            if n:
                expected.append(n)
            n_mask -= n
        got = [int(((b_ == MASK) & (a_ != MASK)).sum(axis=1)[0]) for b_, a_ in zip(canvases[:-1], canvases[1:])]
        assert got == expected
        for b_, a_ in zip(canvases[:-1], canvases[1:]):
            counts = ((b_ == MASK) & (a_ != MASK)).sum(axis=1)
            assert counts[0] == counts[1]


def test_dream_temperature_picks_dominant_token():
    prompt = make_prompt(B=2, Lp=3)
    for alg in ("origin", "maskgit_plus", "entropy"):
        out = dream_generate(peaked_model(11), prompt, mask_id=MASK, max_new_tokens=8, steps=4, alg=alg,
                             temperature=1.0, alg_temp=0.3 if alg != "origin" else None, seed=5)
        assert (out[:, 3:] == 11).all()


def test_dream_top_k_one_is_greedy_even_with_temperature():
    raw = FakeModel(seed=4)
    fn = lambda ids: shift_right(raw(ids))  # noqa: E731
    prompt = make_prompt(B=2, Lp=4)
    greedy = dream_generate(fn, prompt, mask_id=MASK, max_new_tokens=8, steps=8, alg="maskgit_plus", top_k=1)
    sampled = dream_generate(fn, prompt, mask_id=MASK, max_new_tokens=8, steps=8, alg="maskgit_plus",
                             temperature=1.3, top_k=1, seed=8)
    np.testing.assert_array_equal(greedy, sampled)


def test_dream_progress_and_validation():
    seen = []
    dream_generate(FakeModel(), make_prompt(B=1), mask_id=MASK, max_new_tokens=4, steps=3, alg="entropy",
                   progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(QdllmError, match="alg must be one of"):
        dream_generate(FakeModel(), make_prompt(), mask_id=MASK, max_new_tokens=4, steps=2, alg="greedy")
    with pytest.raises(QdllmError, match="at least one token"):
        dream_generate(FakeModel(), np.zeros((1, 0), np.int64), mask_id=MASK, max_new_tokens=4, steps=2)
    with pytest.raises(QdllmError, match="top_p"):
        dream_generate(FakeModel(), make_prompt(), mask_id=MASK, max_new_tokens=4, steps=2, top_p=1.5)
    with pytest.raises(QdllmError, match="eps"):
        dream_generate(FakeModel(), make_prompt(), mask_id=MASK, max_new_tokens=4, steps=2, eps=0.0)
