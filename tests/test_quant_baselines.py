"""RTN and GPTQ stored as binary planes: checked against a textbook uniform quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdllm_export.quant import QuantConfig, quantize_weight

from tests.test_quant_helpers import naive_dequant, naive_rtn, output_err, synthetic



@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_equals_textbook_uniform_quantizer(bits):
    W, H = synthetic(40, 384, 256, seed=bits)
    r = quantize_weight(W, H, QuantConfig(method="rtn", bits=bits), name="rtn")
    qt = r.qt
    G = 128
    assert qt.planes.tolist() == [bits] * 3 and qt.mu is not None
    assert np.all(qt.col_scale == np.float16(1))
    deq = qt.dequantize().astype(np.float64)
    np.testing.assert_allclose(deq, naive_dequant(qt), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(r.w_hat.numpy(), qt.dequantize(), rtol=0, atol=0)
    vals, codes, s16, frac = naive_rtn(W.numpy(), bits, G)
    # plane row scales are exactly s16 * 2^(k-1), highest bit first
    for p in range(qt.n_planes):
        k, j = qt.plane_index()[p]
        np.testing.assert_array_equal(qt.row_scale[p].astype(np.float64), s16[:, j] * 2.0 ** (bits - 2 - k))
    # mu = s16 ((2^b-1)/2 - z) up to fp16 rounding; values agree up to that rounding ...
    tol = np.repeat(np.abs(s16), G, axis=1) * 2.0**-10 * 2**bits + 1e-7
    close = np.abs(deq - vals) <= tol
    # ... except where w/s16 sits on a rounding tie, which the fp16 mu may tip either way
    near_tie = np.abs(frac - 0.5) < 2.0**-9 * 2**bits
    assert np.all(close | near_tie)
    assert close.mean() > 0.995
    # at most 2^b distinct values per row per group
    for j in range(3):
        for i in range(W.shape[0]):
            assert len(np.unique(deq[i, j * G : (j + 1) * G])) <= 2**bits
    # stats are the stored tensor's
    Wn = W.numpy().astype(np.float64)
    assert r.stats["rel_weight_err"] == pytest.approx(((Wn - deq) ** 2).sum() / (Wn**2).sum(), rel=1e-6)
    assert r.stats["rel_output_err"] == pytest.approx(output_err(Wn, deq, H.numpy()), rel=1e-5)


def test_rtn_error_falls_with_bits_and_bits_per_weight_exact():
    W, H = synthetic(64, 256, 256, seed=0)
    errs = []
    for b in (1, 2, 3, 4):
        r = quantize_weight(W, H, QuantConfig(method="rtn", bits=b), name="w")
        errs.append(r.stats["rel_weight_err"])
        # b planes per block: signs + fp16 row scale per plane/row + fp16 col scales + mu + K_j bytes
        n_out, n_in, nb, P = 64, 256, 2, 2 * b
        bits = P * n_out * 128 + 16 * P * (n_out + 128) + 16 * n_out * nb + 8 * nb
        assert r.stats["bits_per_weight"] == bits / (n_out * n_in)
        assert r.stats["mean_planes"] == b
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_beats_rtn_on_output_error(bits):
    W, H = synthetic(64, 512, 1024, seed=10 + bits)
    rtn = quantize_weight(W, H, QuantConfig(method="rtn", bits=bits), name="w")
    gptq = quantize_weight(W, H, QuantConfig(method="gptq", bits=bits), name="w")
    assert gptq.stats["rel_output_err"] < 0.8 * rtn.stats["rel_output_err"]
    # the reported error is the stored tensor's, computed independently
    deq = naive_dequant(gptq.qt)
    np.testing.assert_allclose(gptq.w_hat.numpy(), gptq.qt.dequantize(), rtol=0, atol=0)
    np.testing.assert_allclose(deq, gptq.qt.dequantize(), rtol=1e-6, atol=1e-8)
    assert gptq.stats["rel_output_err"] == pytest.approx(output_err(W.numpy(), deq, H.numpy()), rel=1e-5)
    # every group still has at most 2^b values per row
    for j in range(4):
        for i in range(0, 64, 7):
            assert len(np.unique(deq[i, j * 128 : (j + 1) * 128])) <= 2**bits


def test_gptq_with_identity_hessian_equals_rtn():
    W, _ = synthetic(32, 256, 64, seed=4)
    I = torch.eye(256)
    for b in (2, 3):
        rtn = quantize_weight(W, None, QuantConfig(method="rtn", bits=b), name="w")
        gptq = quantize_weight(W, I, QuantConfig(method="gptq", bits=b), name="w")
        assert gptq.qt.equal(rtn.qt)


def test_gptq_scales_from_error_updated_weights():
    """With a correlated H, group 2's scale comes from the compensated weights, not the originals."""
    W, H = synthetic(16, 256, 512, seed=6)
    rtn = quantize_weight(W, None, QuantConfig(method="rtn", bits=2), name="w")
    gptq = quantize_weight(W, H, QuantConfig(method="gptq", bits=2), name="w")
    p_first = [p for p, (k, j) in enumerate(gptq.qt.plane_index()) if j == 0]
    p_second = [p for p, (k, j) in enumerate(gptq.qt.plane_index()) if j == 1]
    np.testing.assert_array_equal(gptq.qt.row_scale[p_first], rtn.qt.row_scale[p_first])
    assert not np.array_equal(gptq.qt.row_scale[p_second], rtn.qt.row_scale[p_second])
