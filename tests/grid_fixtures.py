"""Weights and Hessians that reach the awkward paths of a weight grid (tests of the ggml and lattice grids)."""

from __future__ import annotations

import torch


def hard_rows(n_in: int, seed: int = 0, rows: int = 12) -> torch.Tensor:
    """``rows`` (>= 10) rows ``[rows, n_in]``: random, all-zero, all-positive, all-negative, one outlier,
    fp16-subnormal scale, half zero, skewed, underflowing, spiky; the rest random."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n_in, generator=g)
    W[1] = 0.0
    W[2] = W[2].abs() + 0.1
    W[3] = -W[3].abs()
    W[4, n_in // 3] = 60.0
    W[5] *= 3e-6  # d lands in fp16's subnormal range
    W[6, : n_in // 2] = 0.0  # zero sub-blocks next to live ones
    W[7] = torch.where(W[7] > 0, W[7] * 8, W[7] * 0.1)  # skewed
    W[8] *= 1e-9  # scales underflow fp16 to zero
    W[9, ::7] *= 20
    return W


def correlated_hessian(n_in: int, seed: int = 1, tokens_per_column: int = 4) -> torch.Tensor:
    """``H [n_in, n_in]`` of correlated activations with a few large input channels and a dead one."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens_per_column * n_in, n_in, generator=g) @ (
        torch.eye(n_in) + 0.2 * torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    X[:, :: n_in // 8] *= 10
    X[:, 5] = 0.0
    return X.T @ X / X.shape[0]
