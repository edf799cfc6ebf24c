"""Independent reference computations for the quantizer tests (no code shared with qdllm_export.quant)."""

from __future__ import annotations

import numpy as np
import torch


def naive_dequant(qt) -> np.ndarray:
    """Recompute W_hat from the stored fields with explicit loops and bit shifts (float64)."""
    n_out, n_in = qt.shape
    G = qt.group_size
    nb = n_in // G
    W = np.zeros((n_out, n_in))
    if qt.mu is not None:
        for j in range(nb):
            W[:, j * G : (j + 1) * G] += qt.mu[:, j].astype(np.float64)[:, None]
    p = 0
    for k in range(int(qt.planes.max())):
        for j in range(nb):
            if qt.planes[j] <= k:
                continue
            byts = qt.signs[p].astype(np.int64)  # [n_out, G/8]
            bits = np.zeros((n_out, G))
            for c in range(G):
                bits[:, c] = (byts[:, c // 8] >> (c % 8)) & 1
            sign = 2 * bits - 1
            rs = qt.row_scale[p].astype(np.float64)
            cs = qt.col_scale[p].astype(np.float64)
            W[:, j * G : (j + 1) * G] += rs[:, None] * cs[None, :] * sign
            p += 1
    assert p == qt.n_planes
    return W


def naive_rtn(W: np.ndarray, bits: int, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Textbook asymmetric min/max RTN per row per group with the scale rounded to fp16.

    Returns (values s16*(q-z), codes q, s16 per (row, group), fractional part of w/s16 (tie check)).
    """
    W = np.asarray(W, np.float64)
    n_out, n_in = W.shape
    maxq = 2**bits - 1
    vals = np.zeros_like(W)
    codes = np.zeros_like(W)
    frac = np.zeros_like(W)
    S = np.zeros((n_out, n_in // G))
    for j in range(n_in // G):
        g = W[:, j * G : (j + 1) * G].astype(np.float32)
        xmin = np.minimum(g.min(1), 0)
        xmax = np.maximum(g.max(1), 0)
        s = (xmax - xmin) / np.float32(maxq)
        z = np.round(-xmin / s)
        s16 = s.astype(np.float16).astype(np.float64)
        x = g / s16[:, None]
        q = np.clip(np.round(x) + z[:, None], 0, maxq)
        vals[:, j * G : (j + 1) * G] = s16[:, None] * (q - z[:, None])
        codes[:, j * G : (j + 1) * G] = q
        frac[:, j * G : (j + 1) * G] = x - np.floor(x)
        S[:, j] = s16
    return vals, codes, S, frac


def synthetic(n_out: int, n_in: int, n_tok: int, seed: int, outlier: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weights and correlated activations with outlier channels; H = 2/N X^T X (float32)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_t(4, size=(n_out, n_in)) * 0.02
    W[:, rng.choice(n_in, 4, replace=False)] *= 4
    r = max(4, n_in // 8)
    X = rng.normal(size=(n_tok, r)) @ rng.normal(size=(r, n_in)) / np.sqrt(r) + 0.5 * rng.normal(size=(n_tok, n_in))
    X *= np.exp(rng.normal(0, 0.5, size=(1, n_in)))
    X[:, rng.choice(n_in, 3, replace=False)] *= outlier
    H = 2.0 / n_tok * X.T @ X
    return torch.tensor(W, dtype=torch.float32), torch.tensor(H, dtype=torch.float32)


def output_err(W, W_hat, H) -> float:
    W = np.asarray(W, np.float64)
    D = W - np.asarray(W_hat, np.float64)
    H = np.asarray(H, np.float64)
    return float(np.trace(D @ H @ D.T) / np.trace(W @ H @ W.T))


# ------------------------------------------------------------------ the references checked by hand


def test_naive_dequant_on_a_hand_built_tensor():
    from formats.qtensor import QuantizedTensor, pack_signs

    G = 8
    s0 = np.array([[1, -1, 1, 1, -1, -1, 1, -1]] * 2, np.float32)  # block 0, plane order 0
    s1 = -s0  # block 1, order 0
    s2 = np.ones((2, 8), np.float32)  # block 1, order 1
    qt = QuantizedTensor(
        shape=(2, 16),
        group_size=G,
        planes=np.array([1, 2], np.uint8),
        signs=np.stack([pack_signs(s0), pack_signs(s1), pack_signs(s2)]),
        row_scale=np.array([[1, 2], [0.5, 0.5], [0.25, 4]], np.float16),
        col_scale=np.stack([np.full(8, 2.0), np.arange(8.0), np.ones(8)]).astype(np.float16),
        mu=np.array([[0, 1], [0, -1]], np.float16),
    )
    want = np.zeros((2, 16))
    want[:, :8] = np.array([[1.0], [2.0]]) * 2.0 * s0
    want[:, 8:] = np.array([[1.0], [-1.0]]) + 0.5 * np.arange(8.0) * s1 + np.array([[0.25], [4.0]]) * s2
    np.testing.assert_array_equal(naive_dequant(qt), want)


def test_naive_rtn_on_a_hand_example():
    # one row, group of 8, 2 bits: xmin -1, xmax 2 -> s = 1, z = 1; q = round(w) + 1 clipped to 0..3
    W = np.array([[-1.0, -0.4, 0.0, 0.6, 1.2, 2.0, 1.49, -0.51]])
    vals, codes, s16, _ = naive_rtn(W, 2, 8)
    assert s16.tolist() == [[1.0]]
    assert codes.tolist() == [[0, 1, 1, 2, 2, 3, 2, 0]]
    assert vals.tolist() == [[-1, 0, 0, 1, 1, 2, 1, -1]]
