"""runtime_ref.likelihood: masks, stratification, the estimator's math, and a brute-force check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.errors import QdllmError
from runtime_ref.likelihood import NLLResult, make_masks, masked_nll, text_windows, window_masks

V = 20
MASK = V - 1


def random_windows(N=5, L=16, seed=0):
    return np.random.default_rng(seed).integers(0, MASK, size=(N, L)).astype(np.int64)


class RecordingModel:
    """Random linear-ish logits that depend on the whole input; records every input it sees."""

    def __init__(self, seed=0, vocab=V, d=8, max_len=64):
        rng = np.random.default_rng(seed)
        self.E = rng.normal(size=(vocab, d))
        self.P = rng.normal(size=(max_len, d))
        self.W = rng.normal(size=(d, vocab)) * 2.0
        self.seen: list[np.ndarray] = []

    def __call__(self, ids):
        self.seen.append(np.asarray(ids).copy())
        h = self.E[ids] + self.P[: ids.shape[1]][None]
        h = np.tanh(h + h.mean(axis=1, keepdims=True))
        return (h @ self.W).astype(np.float32)


def uniform_model(ids):
    return np.zeros(ids.shape + (V,), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def test_masks_identical_regardless_of_model():
    windows = random_windows(N=4, L=12)
    m1, m2 = RecordingModel(seed=1), RecordingModel(seed=2)
    r1 = masked_nll(m1, windows, mask_id=MASK, n_mc=6, seed=3, batch_size=5)
    r2 = masked_nll(m2, windows, mask_id=MASK, n_mc=6, seed=3, batch_size=5)
    seen1 = np.concatenate(m1.seen)
    seen2 = np.concatenate(m2.seen)
    np.testing.assert_array_equal(seen1, seen2)  # byte-identical inputs to both models
    expected = make_masks(4, 12, 6, seed=3).reshape(24, 12)
    np.testing.assert_array_equal(seen1 == MASK, expected)
    np.testing.assert_array_equal(seen1[~expected], windows.repeat(6, axis=0)[~expected])
    assert r1.nll != r2.nll
    # a different seed gives different masks
    assert not np.array_equal(make_masks(4, 12, 6, seed=3), make_masks(4, 12, 6, seed=4))


def test_masks_depend_only_on_seed_window_and_shapes():
    a = make_masks(6, 20, 5, seed=9)
    b = make_masks(3, 20, 5, seed=9)
    np.testing.assert_array_equal(a[:3], b)  # a window's masks do not depend on how many windows
    np.testing.assert_array_equal(a[4], window_masks(4, 20, 5, 9))
    np.testing.assert_array_equal(a, make_masks(6, 20, 5, seed=9))
    assert a.dtype == bool and a.shape == (6, 5, 20)


@settings(max_examples=60, deadline=None)
@given(L=st.integers(2, 40), n_mc=st.integers(1, 40), seed=st.integers(0, 2**32 - 1), protect=st.booleans())
def test_stratified_mask_counts(L, n_mc, seed, protect):
    masks = make_masks(3, L, n_mc, seed=seed, protect_first=protect)
    L_eff = L - 1 if protect else L
    counts = masks.sum(axis=2)  # [3, n_mc]
    assert counts.min() >= 1 and counts.max() <= L_eff
    if protect:
        assert not masks[:, :, 0].any()
    for w in range(3):
        ks = np.sort(counts[w])
        if n_mc <= L_eff:
            assert len(set(ks.tolist())) == n_mc  # distinct, spread evenly over 1..L_eff
            gaps = np.diff(np.concatenate([ks, [ks[0] + L_eff]]))  # circular gaps
            assert gaps.min() >= math.floor(L_eff / n_mc) - 1 and gaps.max() <= math.ceil(L_eff / n_mc) + 1
        if n_mc == L_eff:
            np.testing.assert_array_equal(ks, np.arange(1, L_eff + 1))


def test_mask_counts_cover_all_levels_when_n_mc_equals_length():
    masks = make_masks(5, 10, 10, seed=0)
    for w in range(5):
        assert sorted(masks[w].sum(axis=1).tolist()) == list(range(1, 11))
    masks = make_masks(5, 11, 10, seed=0, protect_first=True)
    assert not masks[..., 0].any()
    for w in range(5):
        assert sorted(masks[w].sum(axis=1).tolist()) == list(range(1, 11))


def test_positions_are_uniform_given_count():
    # each position is masked about equally often (the permutation draws positions uniformly)
    masks = make_masks(400, 8, 4, seed=1, protect_first=True)
    freq = masks[..., 1:].mean(axis=(0, 1))
    assert np.all(np.abs(freq - freq.mean()) < 0.05)


# ------------------------------------------------------------------------------------------------
# the estimator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protect_first", [False, True])
def test_uniform_logits_give_log_v(protect_first):
    # every masked token has CE = log V, so sum_masked CE / (k / L) / L = log V for every sample
    r = masked_nll(uniform_model, random_windows(N=3, L=9), mask_id=MASK, n_mc=7, seed=2,
                   protect_first=protect_first)
    assert r.nll == pytest.approx(math.log(V), rel=1e-12)
    assert r.stderr == pytest.approx(0.0, abs=1e-12)
    assert r.n_windows == 3 and r.n_mc == 7
    assert r.n_tokens == 3 * (8 if protect_first else 9)
    assert r.ppl == pytest.approx(V, rel=1e-10)


@pytest.mark.parametrize("p", [0.9, 0.5, 0.05])
def test_probability_p_on_the_right_token_gives_minus_log_p(p):
    L = 12
    pattern = np.arange(L) % MASK
    windows = np.tile(pattern, (4, 1)).astype(np.int64)
    logp_right = math.log(p)
    logp_other = math.log((1 - p) / (V - 1))

    def model(ids):
        out = np.full(ids.shape + (V,), logp_other, dtype=np.float32)
        out[:, np.arange(L), pattern] = logp_right
        return out + 3.0  # an offset: log-softmax must remove it

    r = masked_nll(model, windows, mask_id=MASK, n_mc=5, seed=0, batch_size=3)
    assert r.nll == pytest.approx(-math.log(p), rel=1e-6)  # float32 logits: ~1e-7 relative


def brute_force(logits_fn, windows, masks, mask_id, protect_first):
    N, n_mc, L = masks.shape
    L_eff = L - 1 if protect_first else L
    per_window = []
    for w in range(N):
        vals = []
        for m in range(n_mc):
            ids = [mask_id if masks[w, m, i] else int(windows[w, i]) for i in range(L)]
            logits = logits_fn(np.array([ids], dtype=np.int64))[0]
            total = 0.0
            k = 0
            for i in range(L):
                if not masks[w, m, i]:
                    continue
                row = [float(v) for v in logits[i]]
                mx = max(row)
                lse = mx + math.log(sum(math.exp(v - mx) for v in row))
                total += lse - row[int(windows[w, i])]
                k += 1
            p_mask = k / L_eff
            vals.append(total / p_mask / L_eff)
        per_window.append(sum(vals) / n_mc)
    return sum(per_window) / N, per_window


@pytest.mark.parametrize("protect_first", [False, True])
def test_matches_brute_force_loop(protect_first):
    windows = random_windows(N=3, L=10, seed=5)
    model = RecordingModel(seed=7)
    for bs in (1, 4, 100):
        r = masked_nll(model, windows, mask_id=MASK, n_mc=4, seed=11, batch_size=bs, protect_first=protect_first)
        masks = make_masks(3, 10, 4, seed=11, protect_first=protect_first)
        ref, ref_pw = brute_force(model, windows, masks, MASK, protect_first)
        assert r.nll == pytest.approx(ref, rel=1e-12)
        np.testing.assert_allclose(r.per_window, ref_pw, rtol=1e-12)
        assert r.stderr == pytest.approx(np.std(ref_pw, ddof=1) / math.sqrt(3), rel=1e-9)


def test_result_fields_and_progress():
    seen = []
    r = masked_nll(RecordingModel(), random_windows(N=2, L=8), mask_id=MASK, n_mc=3, batch_size=4,
                   progress=lambda d, t: seen.append((d, t)))
    assert isinstance(r, NLLResult)
    assert seen == [(4, 6), (6, 6)]
    assert r.per_window.shape == (2,) and np.isfinite(r.stderr)
    one = masked_nll(RecordingModel(), random_windows(N=1, L=8), mask_id=MASK, n_mc=1)
    assert math.isnan(one.stderr)


def test_logits_dtype_does_not_matter_for_ce_precision():
    # huge offsets in float32 logits: the float64 log-softmax stays exact
    def model(ids):
        return (np.zeros(ids.shape + (V,), dtype=np.float32) + 1e4)

    r = masked_nll(model, random_windows(N=2, L=6), mask_id=MASK, n_mc=3)
    assert r.nll == pytest.approx(math.log(V), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# errors and windows
# ------------------------------------------------------------------------------------------------


def test_text_windows():
    ids = np.arange(103)
    w = text_windows(ids, 10)
    assert w.shape == (10, 10) and w.dtype == np.int64
    np.testing.assert_array_equal(w.ravel(), np.arange(100))
    assert text_windows(ids, 10, max_windows=3).shape == (3, 10)
    assert text_windows(ids, 103).shape == (1, 103)


def test_short_text_raises():
    with pytest.raises(QdllmError, match=r"too short.*7 tokens.*seq_len = 16"):
        text_windows(np.arange(7), 16)
    with pytest.raises(QdllmError, match="too short"):
        text_windows(np.array([], dtype=np.int64), 4)


def test_bad_inputs_raise():
    w = random_windows(N=2, L=6)
    bad = w.copy()
    bad[0, 2] = MASK
    with pytest.raises(QdllmError, match="mask token"):
        masked_nll(uniform_model, bad, mask_id=MASK)
    with pytest.raises(QdllmError, match="vocabulary"):
        masked_nll(lambda ids: np.zeros(ids.shape + (5,), np.float32), w + 0, mask_id=MASK + 50)
    with pytest.raises(QdllmError, match="logits_fn returned shape"):
        masked_nll(lambda ids: np.zeros((1, 2, V), np.float32), w, mask_id=MASK)
    with pytest.raises(QdllmError, match="2-D"):
        masked_nll(uniform_model, w[0], mask_id=MASK)
    with pytest.raises(QdllmError, match="1-D"):
        text_windows(w, 3)
