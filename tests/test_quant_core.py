"""DAQ core math, Hessian accumulation, configuration and input checks of qdllm_export.quant."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from formats.errors import QdllmError
from qdllm_export.quant import HessianAccumulator, QuantConfig, daq_block, quantize_weight
from qdllm_export.quant.daq import (
    joint_reround,
    planes_sum,
    rsr_col_update,
    rsr_row_update,
    rsr_sweep,
    weighted_loss,
)

from tests.test_quant_helpers import naive_dequant, synthetic



def _rand(seed, n=7, m=16, K=2):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(n, m, generator=g, dtype=torch.float64)
    A = torch.rand(n, m, generator=g, dtype=torch.float64) * 3 + 0.1
    S = torch.where(torch.randn(K, n, m, generator=g, dtype=torch.float64) >= 0, 1.0, -1.0).to(torch.float64)
    rs = torch.rand(K, n, generator=g, dtype=torch.float64) + 0.1
    cs = torch.rand(K, m, generator=g, dtype=torch.float64) + 0.1
    return T, A, S, rs, cs


@pytest.mark.parametrize("seed", range(4))
def test_row_and_column_update_equal_weighted_lstsq(seed):
    T, A, S, rs, cs = _rand(seed, K=1)
    ar = rsr_row_update(T, A, S[0], cs[0], rs[0]).numpy()
    Tn, An, Sn, csn = T.numpy(), A.numpy(), S[0].numpy(), cs[0].numpy()
    for i in range(T.shape[0]):
        w = np.sqrt(An[i])
        x, *_ = np.linalg.lstsq((w * Sn[i] * csn)[:, None], w * Tn[i], rcond=None)
        assert ar[i] == pytest.approx(x[0], rel=1e-10, abs=1e-12)
    ac = rsr_col_update(T, A, S[0], torch.from_numpy(ar), cs[0]).numpy()
    for j in range(T.shape[1]):
        w = np.sqrt(An[:, j])
        x, *_ = np.linalg.lstsq((w * Sn[:, j] * ar)[:, None], w * Tn[:, j], rcond=None)
        assert ac[j] == pytest.approx(x[0], rel=1e-10, abs=1e-12)


def test_sweep_leaves_last_plane_column_scales_optimal():
    """After a sweep, the last column update is the LS solution for the residual of the other planes."""
    T, A, S, rs, cs = _rand(7, n=9, m=24, K=3)
    rs, cs = rs.clone(), cs.clone()
    rsr_sweep(T, A, rs, cs, S)
    k = 2
    others = sum((rs[l][:, None] * cs[l][None, :]) * S[l] for l in range(3) if l != k)
    R = (T - others).numpy()
    An, Sn, ar = A.numpy(), S[k].numpy(), rs[k].numpy()
    for j in range(T.shape[1]):
        w = np.sqrt(An[:, j])
        x, *_ = np.linalg.lstsq((w * Sn[:, j] * ar)[:, None], w * R[:, j], rcond=None)
        assert cs[k][j].item() == pytest.approx(x[0], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_joint_reround_is_elementwise_bruteforce_optimum(K):
    g = torch.Generator().manual_seed(K)
    n, m = 6, 16
    W = torch.randn(n, m, generator=g)
    rs = torch.randn(K, n, generator=g)  # negative scales allowed
    cs = torch.randn(K, m, generator=g)
    S = joint_reround(W, rs, cs)
    assert set(torch.unique(S).tolist()) <= {-1.0, 1.0}
    got = np.abs(W.numpy() - planes_sum(rs, cs, S).numpy())
    C = rs.numpy()[:, :, None].astype(np.float64) * cs.numpy()[:, None, :]
    best = np.full((n, m), np.inf)
    for signs in itertools.product((-1.0, 1.0), repeat=K):
        val = sum(s * C[k] for k, s in enumerate(signs))
        best = np.minimum(best, np.abs(W.numpy() - val))
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-5)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_daq_iterations_never_increase_weighted_loss(K):
    W, H = synthetic(64, 128, 256, seed=K)
    g = torch.Generator().manual_seed(0)
    A = 1 + 3 * (torch.rand(64, 128, generator=g) > 0.97).float()
    blk = daq_block(W, A, K, iters=12, fp16=False, track=True)
    L = np.array(blk.losses)
    assert len(L) == 13
    assert np.all(np.diff(L) <= 1e-6 * L[0]), L
    assert L[-1] < L[0]
    assert weighted_loss(W, A, blk.Q) == pytest.approx(L[-1], rel=1e-6)


def test_daq_block_fp16_scales_and_stored_value():
    W, _ = synthetic(32, 128, 64, seed=3)
    blk = daq_block(W, None, 2, iters=5)
    assert torch.equal(blk.rs, blk.rs.half().float()) and torch.equal(blk.cs, blk.cs.half().float())
    assert torch.equal(blk.Q, planes_sum(blk.rs, blk.cs, blk.S))


@pytest.mark.parametrize("bits,abmp", [(2, False), (2, True), (1.5, True), (3, True)])
def test_daq_dequantizes_to_its_own_math(bits, abmp):
    W, H = synthetic(48, 512, 512, seed=11)
    cfg = QuantConfig(bits=bits, abmp=abmp, abmp_ratio=0.25, iters=4)
    r = quantize_weight(W, H, cfg, name="blk.0.ffn_up")
    qt = r.qt
    assert qt.mu is None and qt.name == "blk.0.ffn_up" and qt.shape == (48, 512)
    assert qt.mean_planes() == pytest.approx(bits, abs=0)
    ref = naive_dequant(qt)
    np.testing.assert_allclose(qt.dequantize(), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r.w_hat.numpy(), qt.dequantize(), rtol=1e-6, atol=1e-7)
    # the reported errors are those of the stored tensor
    Wn = W.numpy().astype(np.float64)
    assert r.stats["rel_weight_err"] == pytest.approx(((Wn - ref) ** 2).sum() / (Wn**2).sum(), rel=1e-5)
    Hn = H.numpy().astype(np.float64)
    D = Wn - ref
    assert r.stats["rel_output_err"] == pytest.approx(np.trace(D @ Hn @ D.T) / np.trace(Wn @ Hn @ Wn.T), rel=1e-5)
    assert r.stats["bits_per_weight"] == qt.bits_per_weight()


def test_daq_without_hessian_runs_and_is_deterministic():
    W, _ = synthetic(32, 256, 64, seed=5)
    cfg = QuantConfig(iters=3)
    a = quantize_weight(W, None, cfg, name="x")
    b = quantize_weight(W, None, cfg, name="x")
    assert a.stats["rel_output_err"] is None
    assert a.qt.equal(b.qt)
    assert a.stats["rel_weight_err"] < 0.5


def test_hessian_accumulator_matches_direct_average():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 16, generator=g, dtype=torch.float64), torch.randn(7, 16, generator=g, dtype=torch.float64),
          torch.randn(1, 16, generator=g, dtype=torch.float64).float()]
    acc = HessianAccumulator(16, dtype=torch.float64)
    for x in xs:
        acc.add_batch(x)
    X = torch.cat([x.reshape(-1, 16).double() for x in xs])
    assert acc.count == X.shape[0] == 23
    torch.testing.assert_close(acc.H, 2.0 / X.shape[0] * X.T @ X, rtol=1e-12, atol=1e-12)
    acc32 = HessianAccumulator(16)
    acc32.add_batch(X.to(torch.bfloat16))
    assert acc32.H.dtype == torch.float32
    with pytest.raises(QdllmError):
        acc.add_batch(torch.zeros(2, 15))
    with pytest.raises(QdllmError):
        _ = HessianAccumulator(4).H


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hessian_and_quantizer_on_cuda():
    W, H = synthetic(64, 256, 256, seed=1)
    acc = HessianAccumulator(256)
    acc.add_batch(torch.randn(4, 32, 256, device="cuda"))
    assert acc.H.device.type == "cuda"
    for m in ("quant-dllm", "gptq", "rtn"):
        r_gpu = quantize_weight(W.cuda(), H.cuda(), QuantConfig(method=m, bits=2, iters=3), name="w")
        r_cpu = quantize_weight(W, H, QuantConfig(method=m, bits=2, iters=3), name="w")
        assert r_gpu.w_hat.device.type == "cuda"
        assert r_gpu.stats["rel_output_err"] == pytest.approx(r_cpu.stats["rel_output_err"], rel=0.05)


# ------------------------------------------------------------------ config and bad input


def test_config_roundtrip_and_validation():
    cfg = QuantConfig(method="gptq", bits=3, group_size=64, seed=5)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig().to_dict()["method"] == "quant-dllm"
    bad = [
        dict(method="awq"),
        dict(method="rtn", bits=2.5),
        dict(method="gptq", bits=9),
        dict(bits=0.5),
        dict(bits=float("nan")),
        dict(bits=2.5, abmp=False),
        dict(group_size=100),
        dict(group_size=0),
        dict(abmp_ratio=0.7),
        dict(abmp_ratio=-0.1),
        dict(iters=-1),
        dict(outlier_sigma=0),
        dict(outlier_weight=-1),
        dict(percdamp=-0.01),
        dict(abmp="yes"),
        dict(importance="magic"),
        dict(compensation="none"),
        dict(outlier_scope="row"),
        dict(seed=1.5),
        dict(act_order=True),  # GPTQ's options: quant-dllm orders its columns itself
        dict(method="rtn", bits=2, static_groups=True),
    ]
    for kw in bad:
        with pytest.raises(QdllmError):
            QuantConfig(**kw)
    with pytest.raises(QdllmError, match="unknown keys"):
        QuantConfig.from_dict({"method": "rtn", "bitz": 2})


@pytest.mark.parametrize("method", ["quant-dllm", "rtn", "gptq"])
def test_bad_inputs_name_the_tensor(method):
    cfg = QuantConfig(method=method, bits=2, iters=1)
    W, H = synthetic(16, 256, 64, seed=0)
    with pytest.raises(QdllmError, match="blk.3.attn_q.*not divisible by the group size 128"):
        quantize_weight(torch.zeros(16, 200), None, cfg, name="blk.3.attn_q")
    for bad in (float("nan"), float("inf")):
        W2 = W.clone()
        W2[3, 7] = bad
        with pytest.raises(QdllmError, match="blk.1.ffn_down.*NaN or inf"):
            quantize_weight(W2, H, cfg, name="blk.1.ffn_down")
    with pytest.raises(QdllmError, match="blk.0.w.*Hessian has shape"):
        quantize_weight(W, H[:128, :128], cfg, name="blk.0.w")
    H2 = H.clone()
    H2[0, 0] = float("nan")
    with pytest.raises(QdllmError, match="blk.0.w.*Hessian holds NaN"):
        quantize_weight(W, H2, cfg, name="blk.0.w")
    with pytest.raises(QdllmError, match="blk.0.w"):
        quantize_weight(W[0], H, cfg, name="blk.0.w")
    with pytest.raises(QdllmError):
        quantize_weight(W, H, cfg.to_dict(), name="blk.0.w")


def test_gptq_needs_hessian_and_planes_checked():
    W, H = synthetic(16, 256, 64, seed=0)
    with pytest.raises(QdllmError, match="w1.*needs the layer-input Hessian"):
        quantize_weight(W, None, QuantConfig(method="gptq"), name="w1")
    with pytest.raises(QdllmError, match="w2.*planes"):
        quantize_weight(W, H, QuantConfig(), planes=np.array([2, 2, 2]), name="w2")
    with pytest.raises(QdllmError, match="w3.*planes"):
        quantize_weight(W, H, QuantConfig(), planes=np.array([0, 4]), name="w3")
    with pytest.raises(QdllmError, match="w4"):
        quantize_weight(W, H, QuantConfig(method="rtn"), planes=np.array([1, 3]), name="w4")
    with pytest.raises(QdllmError, match="w5.*not an integer"):
        quantize_weight(torch.randn(8, 384), None, QuantConfig(bits=1.5), name="w5")  # 3 blocks x 1.5


def test_dead_input_columns_and_zero_weights():
    W, H = synthetic(32, 256, 128, seed=2)
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    for m in ("quant-dllm", "gptq"):
        r = quantize_weight(W, H, QuantConfig(method=m, iters=3), name="d")
        assert np.isfinite(r.qt.dequantize()).all()
        assert r.stats["rel_output_err"] < 0.5
    for m in ("quant-dllm", "gptq", "rtn"):
        r = quantize_weight(torch.zeros(8, 128), torch.eye(128), QuantConfig(method=m, iters=2), name="z")
        assert np.abs(r.qt.dequantize()).max() <= 2.0**-12
