"""ABMP plane assignment: exact budgets, the top/bottom rule, pooling, and exact bits per weight."""

from __future__ import annotations

import math

import numpy as np
import pytest

from formats.errors import QdllmError
from qdllm_export.quant import QuantConfig, abmp_assign, abmp_assign_pooled, block_scores, quantize_weight

from tests.test_quant_helpers import synthetic



@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("n", [2, 4, 6, 20, 32, 96, 112])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25])
def test_mean_is_exactly_the_budget(budget, n, ratio):
    scores = np.random.default_rng(n).gamma(2.0, size=n)
    K = abmp_assign(scores, budget, ratio)
    assert K.dtype == np.uint8 and K.shape == (n,)
    assert int(K.sum()) == budget * n  # exact, as integers
    assert K.min() >= 1 and K.max() <= 8
    lo, hi = math.floor(budget), math.ceil(budget)
    assert K.min() >= lo - 1 and K.max() <= hi + 1


def test_budget_two_top_and_bottom_rule():
    rng = np.random.default_rng(0)
    n = 64
    s = rng.permutation(n).astype(float)  # distinct scores
    K = abmp_assign(s, 2, 0.05)
    k = math.floor(0.05 * n + 0.5)  # round(3.2) = 3
    order = np.argsort(-s)
    assert K[order[:k]].tolist() == [3] * k
    assert K[order[-k:]].tolist() == [1] * k
    assert set(K[order[k:-k]].tolist()) == {2}
    assert abmp_assign(s, 2, 0.1).tolist().count(3) == 6
    # too few blocks for 5%: all 2 (round(0.4) = 0); 18 blocks (a tiny model's pool): round(0.9) = 1 each way
    assert abmp_assign(s[:8], 2, 0.05).tolist() == [2] * 8
    assert sorted(abmp_assign(s[:18], 2, 0.05).tolist()) == [1] + [2] * 16 + [3]


def test_fractional_budgets_follow_score_rank():
    s = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    assert abmp_assign(s, 1.5, 0.05).tolist() == [2, 1, 2, 1, 2, 1]  # top half gets the extra plane
    assert abmp_assign(s, 2.5, 0.0).tolist() == [3, 2, 3, 2, 3, 2]
    K = abmp_assign(np.arange(20.0)[::-1], 2.5, 0.1)  # top 2 -> 4, bottom 2 -> 1
    assert K.tolist() == [4, 4] + [3] * 8 + [2] * 8 + [1, 1]
    assert abmp_assign(np.arange(20.0)[::-1], 3, 0.1).tolist() == [4, 4] + [3] * 16 + [2, 2]
    assert abmp_assign(np.arange(10.0), 1, 0.2).tolist() == [1] * 10  # no shift below 1 plane
    # ties break by index (stable)
    assert abmp_assign(np.ones(4), 1.5, 0).tolist() == [2, 2, 1, 1]


def test_impossible_budget_raises_naming_it():
    with pytest.raises(QdllmError, match=r"blk\.2.*1\.5.*5 blocks.*7\.5"):
        abmp_assign(np.ones(5), 1.5, 0.05, what="blk.2")
    with pytest.raises(QdllmError):
        abmp_assign(np.ones(4), 2.3, 0.05)
    with pytest.raises(QdllmError):
        abmp_assign(np.array([1.0, np.nan]), 2, 0.05)
    with pytest.raises(QdllmError):
        abmp_assign(np.ones(4), 9, 0.05)
    with pytest.raises(QdllmError):
        abmp_assign(np.ones(0), 2, 0.05)


def test_pooling_reaches_the_budget_over_the_pool():
    rng = np.random.default_rng(3)
    per_layer = [rng.gamma(2, size=n) * scale for n, scale in ((4, 1.0), (4, 100.0), (4, 1.0), (12, 5.0), (4, 0.01))]
    for budget in (2, 2.5, 3):
        Ks = abmp_assign_pooled(per_layer, budget, 0.1)
        assert [len(k) for k in Ks] == [4, 4, 4, 12, 4]
        total = np.concatenate(Ks)
        assert int(total.sum()) == budget * 28
        assert total.max() > math.ceil(budget) or budget != int(budget)  # round(0.1 * 28) = 3 promoted
    # normalised: a layer with 100x scores does not take all the extra planes
    Ks = abmp_assign_pooled(per_layer, 2, 0.1)
    assert (Ks[1] == 3).sum() < 2
    Ks_raw = abmp_assign_pooled(per_layer, 2, 0.1, normalize=False)
    assert (Ks_raw[1] == 3).sum() == 3
    # a list passed to abmp_assign is pooled too
    assert all(np.array_equal(a, b) for a, b in zip(abmp_assign(per_layer, 2, 0.1), abmp_assign_pooled(per_layer, 2, 0.1)))
    with pytest.raises(QdllmError, match="budget of 1.5.*5 blocks"):
        abmp_assign_pooled([np.ones(2), np.ones(3)], 1.5, 0.05)


def test_quantize_weight_uses_given_planes_and_counts_bits_exactly():
    W, H = synthetic(64, 512, 256, seed=1)
    planes = np.array([1, 3, 2, 2], np.uint8)
    r = quantize_weight(W, H, QuantConfig(iters=2), planes=planes, name="w")
    assert r.qt.planes.tolist() == [1, 3, 2, 2]
    P = 8
    bits = P * 64 * 128 + 16 * P * (64 + 128) + 8 * 4  # signs, fp16 row/col scales, K_j bytes; no mu
    assert r.stats["bits_per_weight"] == bits / (64 * 512) == r.qt.bits_per_weight()
    assert r.stats["mean_planes"] == 2.0
    # order-major plane layout: order 0 of every block, then order 1 of blocks 1,2,3, then order 2 of block 1
    assert r.qt.plane_index() == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1)]


@pytest.mark.parametrize("bits", [1.5, 2, 2.5, 3])
def test_quantize_weight_abmp_budgets(bits):
    W, H = synthetic(32, 1024, 256, seed=2)  # 8 blocks
    r = quantize_weight(W, H, QuantConfig(bits=bits, abmp_ratio=0.25, iters=2), name="w")
    assert r.qt.mean_planes() == bits
    assert int(r.qt.planes.sum()) == bits * 8
    scores = block_scores(W, H, QuantConfig(bits=bits))
    assert r.qt.planes.tolist() == abmp_assign(scores, bits, 0.25).tolist()
    # ABMP off: every block gets the (integer) budget
    if bits == int(bits):
        r = quantize_weight(W, H, QuantConfig(bits=bits, abmp=False, iters=2), name="w")
        assert r.qt.planes.tolist() == [int(bits)] * 8
