"""LLaDA and Dream samplers in NumPy, written once and driven by any backend's logits function.

Both samplers see the model only through ``logits_fn(ids int64 [B, T]) -> float32 [B, T, V]``,
*aligned* (row ``i`` scores token ``i``; Dream backends have already applied their shift, see
:mod:`runtime_ref.backend`). They follow the official algorithms:

* :func:`llada_generate` is ML-GSAI/LLaDA ``generate.py`` (``generate`` +
  ``get_num_transfer_tokens`` + ``add_gumbel_noise``): semi-autoregressive blocks, a fixed number
  of tokens committed per step, low-confidence or random remasking, classifier-free guidance.
* :func:`dream_generate` is Dream's ``generation_utils.DreamGenerationMixin._sample`` (+
  ``sample_tokens``, ``top_p_logits``, ``top_k_logits``) without an attention mask: ``origin``,
  ``maskgit_plus``, ``topk_margin`` and ``entropy``.

At temperature 0 (and ``alg_temp`` None/0, Dream ``alg != "origin"``) both are deterministic and
commit exactly the tokens the official code commits, given the same logits. Randomness comes only
from a ``numpy.random.Generator`` seeded with ``seed``; the official code draws from torch's RNG,
which cannot be reproduced, so stochastic runs match it in distribution, not token for token.

Precision and tie rules (the only places where bit-for-bit agreement with torch can differ, and only
for near-ties): confidences are computed in float64 from the float32 logits (the official code uses
float64 for LLaDA's Gumbel noise and the model's dtype for the rest), and every top-k is a stable
sort on ``-confidence``, so equal confidences commit the lowest position first.

Deliberate departures, none of which changes a greedy result:

* a step that cannot commit anything (LLaDA: a zero budget because ``steps_per_block`` exceeds the
  block's masks; Dream: ``int(n_mask * (1 - s/t)) == 0``, or no mask left) skips the model call;
* LLaDA's Gumbel-max takes the argmax of ``l - T * log(-log u)``, the log of the official
  ``exp(l) / (-log u) ** T`` (same token, no float64 overflow for logits above ~709);
* Dream's ``alg_temp > 0`` draws positions by Gumbel-top-k on ``confidence / alg_temp``, the same
  distribution as ``multinomial(softmax(.), n)`` without replacement, immune to underflow;
* Dream's top-p / top-k write ``-inf`` where the official code writes ``finfo.min`` (probability 0
  either way);
* Dream caps the per-row count at the row's masked count (the official code, when rows have drifted
  apart, would write the mask id over committed tokens);
* no attention mask / padding (all prompts in a batch have one length), and LLaDA's optional
  ``logits_eos_inf`` / ``confidence_eos_eot_inf`` tricks are not offered.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from formats.errors import QdllmError

LogitsFn = Callable[[np.ndarray], np.ndarray]
Progress = Optional[Callable[[int, int], None]]

__all__ = [
    "llada_generate",
    "dream_generate",
    "get_num_transfer_tokens",
    "dream_timesteps",
    "LLADA_REMASKING",
    "DREAM_ALGS",
]

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _check_prompt(prompt: np.ndarray, mask_id: int) -> np.ndarray:
    arr = np.asarray(prompt)
    if arr.ndim == 1:
        raise QdllmError(
            f"prompt must be a 2-D int array [batch, prompt_len], got shape {arr.shape}; "
            "wrap a single prompt as prompt[None, :]"
        )
    if arr.ndim != 2:
        raise QdllmError(f"prompt must be a 2-D int array [batch, prompt_len], got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise QdllmError("prompt has an empty batch (shape[0] == 0)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise QdllmError(f"prompt must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise QdllmError(f"prompt holds a negative token id ({int(arr.min())})")
    if isinstance(mask_id, bool) or not isinstance(mask_id, (int, np.integer)) or mask_id < 0:
        raise QdllmError(f"mask_id must be a non-negative int, got {mask_id!r}")
    return arr.astype(np.int64, copy=False)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QdllmError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise QdllmError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value, minimum: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QdllmError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < minimum:
        raise QdllmError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return v


def _call_logits(logits_fn: LogitsFn, x: np.ndarray) -> np.ndarray:
    """Run the backend and check its answer: float32 ``[B, T, V]`` with no NaN."""
    out = np.asarray(logits_fn(x))
    if out.ndim != 3 or out.shape[:2] != x.shape:
        raise QdllmError(
            f"logits_fn returned shape {out.shape} for ids of shape {x.shape}; "
            f"expected ({x.shape[0]}, {x.shape[1]}, vocab)"
        )
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    if np.isnan(out).any():
        raise QdllmError("logits_fn returned NaN logits; the backend or the model weights are broken")
    return out


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Stable float64 log-softmax over the last axis (``-inf`` entries stay ``-inf``)."""
    z = logits.astype(np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
    return z - lse


def _top_indices(conf_row: np.ndarray, k: int) -> np.ndarray:
    """``torch.topk(conf_row, k).indices`` with a deterministic tie rule: lowest position first."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.argsort(-conf_row, kind="stable")[:k]


def _report(progress: Progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


# --------------------------------------------------------------------------------------------
# LLaDA
# --------------------------------------------------------------------------------------------


def get_num_transfer_tokens(mask_index: np.ndarray, steps: int) -> np.ndarray:
    """LLaDA's per-step token budget for one block.

    ``mask_index``: bool ``[B, L]`` (masked positions of the block); returns int64 ``[B, steps]``:
    each row spreads its mask count over ``steps`` evenly, ``base = n // steps`` per step and the
    remainder ``n % steps`` given one extra token each to the first steps.
    """
    mask_num = np.asarray(mask_index).sum(axis=1).astype(np.int64)  # [B]
    base = mask_num // steps
    remainder = mask_num % steps
    out = np.broadcast_to(base[:, None], (mask_num.shape[0], steps)).copy()
    out += (np.arange(steps)[None, :] < remainder[:, None]).astype(np.int64)
    return out


def llada_generate(
    logits_fn: LogitsFn,
    prompt: np.ndarray,
    *,
    mask_id: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    seed: int = 0,
    progress: Progress = None,
) -> np.ndarray:
    """LLaDA reverse diffusion (official ``generate.py``), semi-autoregressive over blocks.

    Args:
        logits_fn: ``ids int64 [B', T] -> float32 [B', T, V]`` (aligned, no shift for LLaDA).
            Called once per step with ``B' = B`` (or ``2B`` with ``cfg_scale > 0``: conditional rows
            then unconditional rows) and ``T = Lp + gen_length``.
        prompt: int64 ``[B, Lp]`` token ids; all rows have the same length (no padding support).
        mask_id: the ``[MASK]`` token id (126336 for LLaDA-8B).
        steps: total sampling steps, a multiple of the number of blocks.
        gen_length: number of generated tokens, a multiple of ``block_length``.
        block_length: semi-autoregressive block size (``== gen_length``: one block).
        temperature: 0 is greedy argmax; > 0 samples with Gumbel-max noise in float64.
        cfg_scale: classifier-free guidance; the unconditional copy has every prompt position set
            to ``mask_id`` and ``logits = un + (cfg_scale + 1) * (cond - un)``.
        remasking: ``"low_confidence"`` (commit the tokens with the highest softmax probability of
            the un-noised logits) or ``"random"`` (commit uniformly random positions).
        seed: seeds the ``numpy.random.Generator`` used for Gumbel noise and random remasking.
        progress: optional ``progress(step_done, total_steps)`` called after every step.

    Returns:
        int64 ``[B, Lp + gen_length]``: the prompt followed by the generated tokens. Committed tokens
        are never remasked; the prompt is returned unchanged (unless it contains ``mask_id`` itself,
        which the official code also treats as a position to fill).
    """
    prompt = _check_prompt(prompt, mask_id)
    steps = _check_int("steps", steps, 1)
    gen_length = _check_int("gen_length", gen_length, 1)
    block_length = _check_int("block_length", block_length, 1)
    temperature = _check_float("temperature", temperature)
    cfg_scale = _check_float("cfg_scale", cfg_scale)
    if remasking not in LLADA_REMASKING:
        raise QdllmError(f"remasking must be one of {', '.join(LLADA_REMASKING)}; got {remasking!r}")
    if gen_length % block_length != 0:
        raise QdllmError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
            f"e.g. block_length={gen_length} for a single block"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise QdllmError(
            f"steps ({steps}) must be a multiple of the number of blocks "
            f"({num_blocks} = gen_length {gen_length} / block_length {block_length})"
        )
    steps_per_block = steps // num_blocks
    seed = _check_int("seed", seed, 0)

    rng = np.random.default_rng(seed)
    B, Lp = prompt.shape
    T = Lp + gen_length
    x = np.full((B, T), mask_id, dtype=np.int64)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id
    cfg = np.float32(cfg_scale + 1.0)

    done = 0
    for num_block in range(num_blocks):
        b0 = Lp + num_block * block_length
        b1 = b0 + block_length
        num_transfer = get_num_transfer_tokens(x[:, b0:b1] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            if not num_transfer[:, i].any():
                # Nothing can be committed this step (more steps than masks): the official code
                # still runs the model, but the canvas cannot change, so we skip the call.
                done += 1
                _report(progress, done, steps)
                continue
            mask_index = x == mask_id
            # Only masked positions of the current block (and before it) can be committed: the
            # official code computes x0 and the confidence everywhere and then sets the rest to
            # x / -inf; we compute them only where they can matter (the same result, less memory).
            cand = mask_index.copy()
            cand[:, b1:] = False
            r, c = np.nonzero(cand)
            if cfg_scale > 0.0:
                un_x = x.copy()
                un_x[prompt_index] = mask_id
                both = _call_logits(logits_fn, np.concatenate([x, un_x], axis=0))
                cond, un = both[:B][r, c], both[B:][r, c]
                logits = un + cfg * (cond - un)  # float32, as the official code computes it
            else:
                logits = _call_logits(logits_fn, x)[r, c]  # [M, V]

            if temperature == 0.0:
                x0c = np.argmax(logits, axis=-1)
            else:
                # Official: argmax of exp(l) / (-log u) ** T in float64. We take the argmax of its
                # log, l - T * log(-log u): the same token (log is monotonic) without overflowing
                # exp for large logits.
                u = rng.random(logits.shape)
                with np.errstate(divide="ignore"):
                    g = np.log(-np.log(u))
                x0c = np.argmax(logits.astype(np.float64) - temperature * g, axis=-1)

            if remasking == "low_confidence":
                # softmax probability of the chosen token, of the un-noised logits
                logp = _log_softmax64(logits)
                pc = np.exp(logp[np.arange(logits.shape[0]), x0c])
            else:
                pc = rng.random(r.shape[0])

            x0 = x.copy()
            x0[r, c] = x0c
            confidence = np.full((B, T), -np.inf)
            confidence[r, c] = pc
            for j in range(B):
                sel = _top_indices(confidence[j], int(num_transfer[j, i]))
                x[j, sel] = x0[j, sel]
            done += 1
            _report(progress, done, steps)
    return x


# --------------------------------------------------------------------------------------------
# Dream
# --------------------------------------------------------------------------------------------


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
    """``torch.linspace(1, eps, steps + 1)`` in float32, bit for bit.

    torch computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for the
    second, in float32 with a fused multiply-add; a product of a float32 and a small integer is exact
    in float64, so doing the sum in float64 and rounding once reproduces the FMA.
    """
    n = steps + 1
    start = np.float32(1.0)
    end = np.float32(eps)
    if n == 1:
        return np.array([start], dtype=np.float32)
    step = np.float32((end - start) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(start) + np.float64(step) * i
    hi = np.float64(end) - np.float64(step) * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def _filter_logits(logits: np.ndarray, temperature: float, top_p, top_k) -> np.ndarray:
    """Dream ``sample_tokens`` preprocessing in float64: temperature, then top-p, then top-k.

    Removed entries become ``-inf`` (the official code writes ``finfo.min``; both get probability 0).
    """
    z = logits.astype(np.float64)
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        order = np.argsort(-z, axis=-1, kind="stable")
        sorted_z = np.take_along_axis(z, order, axis=-1)
        cum = np.cumsum(np.exp(_log_softmax64(sorted_z)), axis=-1)
        remove_sorted = cum > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].copy()
        remove_sorted[..., 0] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        z = np.where(remove, -np.inf, z)
    if top_k is not None:
        k = min(int(top_k), z.shape[-1])
        kth = np.partition(z, z.shape[-1] - k, axis=-1)[..., z.shape[-1] - k : z.shape[-1] - k + 1]
        z = np.where(z < kth, -np.inf, z)
    return z


def _sample_tokens(
    logits: np.ndarray,
    temperature: float,
    top_p,
    top_k,
    rng: np.random.Generator,
    confidence_kind: str = "prob",
) -> tuple[np.ndarray, np.ndarray]:
    """Dream ``sample_tokens`` on ``[M, V]`` float32 logits -> (confidence float64 [M], x0 int64 [M]).

    ``confidence_kind``: ``"prob"`` (probability of the chosen token; ``maskgit_plus``),
    ``"margin"`` (top-1 minus top-2 probability; ``topk_margin``) or ``"neg_entropy"``
    (``sum p log(p + 1e-10)``; ``entropy``).
    """
    M, V = logits.shape
    z = _filter_logits(logits, temperature, top_p, top_k)
    logp = _log_softmax64(z)
    probs = np.exp(logp)
    if temperature > 0:
        # Categorical(probs).sample() via Gumbel-max on the log-probabilities.
        g = rng.gumbel(size=logp.shape) if M else np.zeros_like(logp)
        x0 = np.argmax(logp + g, axis=-1)
    else:
        x0 = np.argmax(logp, axis=-1)
    x0 = x0.astype(np.int64)
    if confidence_kind == "prob":
        conf = np.take_along_axis(probs, x0[:, None], axis=-1)[:, 0]
    elif confidence_kind == "margin":
        if V < 2:
            conf = probs[:, 0].copy()
        else:
            top2 = np.partition(probs, V - 2, axis=-1)[:, V - 2 :]
            conf = top2[:, 1] - top2[:, 0]
    elif confidence_kind == "neg_entropy":
        conf = np.sum(probs * np.log(probs + 1e-10), axis=-1)
    else:  # pragma: no cover - internal
        raise ValueError(confidence_kind)
    return conf, x0


_CONFIDENCE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


def dream_generate(
    logits_fn: LogitsFn,
    prompt: np.ndarray,
    *,
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: Optional[float] = None,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: int = 0,
    progress: Progress = None,
) -> np.ndarray:
    """Dream reverse diffusion (official ``DreamGenerationMixin._sample``, no attention mask).

    Args:
        logits_fn: ``ids int64 [B, T] -> float32 [B, T, V]``, *aligned* (the Dream backend has
            already shifted its logits right by one), ``T = Lp + max_new_tokens``.
        prompt: int64 ``[B, Lp]``, ``Lp >= 1`` (row 0 of Dream's shifted logits is a dummy).
        mask_id: the mask token id (151666 for Dream-v0-7B).
        max_new_tokens: number of generated tokens.
        steps: number of diffusion steps; the timesteps are ``linspace(1, eps, steps + 1)``.
        eps: final timestep.
        alg: ``"origin"`` (each masked token is revealed with probability ``1 - s/t``, all at the
            last step), or ``"maskgit_plus"`` / ``"topk_margin"`` / ``"entropy"`` (commit the
            ``int(n_mask * (1 - s/t))`` most confident masked tokens, all remaining at the last
            step, where ``n_mask`` is the mask count averaged over the batch as in the official code).
        alg_temp: None or 0 commits the top-confidence positions; > 0 samples the positions without
            replacement from ``softmax(confidence / alg_temp)``.
        temperature, top_p, top_k: token sampling (``sample_tokens``); temperature 0 takes the argmax
            of the (top-p / top-k filtered) distribution.
        seed: seeds the ``numpy.random.Generator`` (token sampling, ``origin`` reveals, ``alg_temp``).
        progress: optional ``progress(step_done, total_steps)`` called after every step.

    Returns:
        int64 ``[B, Lp + max_new_tokens]``.
    """
    prompt = _check_prompt(prompt, mask_id)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    steps = _check_int("steps", steps, 1)
    eps = _check_float("eps", eps)
    if not 0.0 < eps < 1.0:
        raise QdllmError(f"eps must be in (0, 1), got {eps}")
    if alg not in DREAM_ALGS:
        raise QdllmError(f"alg must be one of {', '.join(DREAM_ALGS)}; got {alg!r}")
    if alg_temp is not None:
        alg_temp = _check_float("alg_temp", alg_temp)
    temperature = _check_float("temperature", temperature)
    if top_p is not None:
        top_p = _check_float("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise QdllmError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 1)
    if prompt.shape[1] < 1:
        raise QdllmError(
            "Dream needs a prompt of at least one token (its shifted logits have no prediction for "
            "position 0)"
        )
    seed = _check_int("seed", seed, 0)

    rng = np.random.default_rng(seed)
    B, Lp = prompt.shape
    T = Lp + max_new_tokens
    x = np.full((B, T), mask_id, dtype=np.int64)
    x[:, :Lp] = prompt
    timesteps = dream_timesteps(steps, eps)
    one = np.float32(1.0)

    for i in range(steps):
        mask_index = x == mask_id
        n_masked = int(mask_index.sum())
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            if n_masked == 0:
                _report(progress, i + 1, steps)
                continue
            logits = _call_logits(logits_fn, x)
            r, c = np.nonzero(mask_index)  # row-major, like torch's boolean indexing
            p_transfer = float(one - s / t) if i < steps - 1 else 1.0
            transfer = rng.random(r.shape[0]) < p_transfer
            if transfer.any():
                _, x0 = _sample_tokens(logits[r[transfer], c[transfer]], temperature, top_p, top_k, rng)
                x[r[transfer], c[transfer]] = x0
        else:
            # float32 arithmetic exactly as the official code (0-dim float32 tensors, then int()).
            num_mask_token = np.float32(n_masked) / np.float32(B)
            if i < steps - 1:
                n_transfer = int(num_mask_token * (one - s / t))
            else:
                n_transfer = int(num_mask_token)
            if n_transfer <= 0:
                # The official code runs the model and commits nothing; skip the call.
                _report(progress, i + 1, steps)
                continue
            logits = _call_logits(logits_fn, x)
            r, c = np.nonzero(mask_index)
            conf, x0 = _sample_tokens(logits[r, c], temperature, top_p, top_k, rng, _CONFIDENCE[alg])
            full_conf = np.full((B, T), -np.inf, dtype=np.float64)
            full_conf[r, c] = conf
            x_ = np.full((B, T), mask_id, dtype=np.int64)
            x_[r, c] = x0
            row_masked = mask_index.sum(axis=1)
            for j in range(B):
                # The official code takes n_transfer positions in every row; where a row has fewer
                # masked positions than that (rows drifted apart because the model predicted the
                # mask token) it would write the mask id over committed tokens. We cap at the row's
                # masked count instead.
                k = min(n_transfer, int(row_masked[j]))
                if k == 0:
                    continue
                if not alg_temp:
                    sel = _top_indices(full_conf[j], k)
                else:
                    # torch.multinomial(softmax(conf / alg_temp), k) without replacement ==
                    # Gumbel-top-k on conf / alg_temp (same distribution; immune to underflow).
                    keys = np.full(T, -np.inf)
                    m = mask_index[j]
                    keys[m] = full_conf[j, m] / alg_temp + rng.gumbel(size=int(m.sum()))
                    sel = _top_indices(keys, k)
                x[j, sel] = x_[j, sel]
        _report(progress, i + 1, steps)
    return x
