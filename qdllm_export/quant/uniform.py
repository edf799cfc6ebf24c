"""Uniform baselines (RTN and GPTQ), stored exactly as binary planes.

An asymmetric ``b``-bit code ``q in {0..2^b-1}`` with ``w = s (q - z)``: write ``q = sum_k 2^k h_k``
with bits ``h_k in {0,1}`` and signs ``b_k = 2 h_k - 1``. Then ``q = sum_k 2^(k-1) b_k + (2^b-1)/2``
and ``w = sum_k (s 2^(k-1)) b_k + s ((2^b-1)/2 - z)``: ``b`` planes with row scale ``s 2^(k-1)``
(stored highest bit first: plane order ``p`` holds bit ``b-1-p``), unit column scales, and
``mu = s ((2^b-1)/2 - z)``. ``s`` is rounded to fp16 first (and kept >= 2^-13 so ``s/2`` stays an
exact fp16 value), so the stored row scales are exactly ``s16 * 2^(k-1)``; ``mu`` is rounded to
fp16. Every weight is then rounded to the nearest point of the STORED grid
``mu16 + s16 (q - (2^b-1)/2)`` so the stored values are the truth (GPTQ feeds back the error of
exactly those values).

Scale/zero follow GPTQ's ``Quantizer`` (``perchannel``, ``sym=False``, no MSE search): per row of a
group, ``xmin = min(w.min(), 0)``, ``xmax = max(w.max(), 0)`` (``-1, +1`` if both are 0),
``s = (xmax - xmin) / (2^b - 1)``, ``z = round(-xmin / s)``.
"""

from __future__ import annotations

import numpy as np
import torch

from formats.errors import QdllmError

from .common import PlaneCollector, to_fp16_checked
from .hessian import inverse_hessian_factor

MIN_SCALE = 2.0**-13


class GroupGrid:
    """The stored grid of one group: fp16-exact ``s [n]``, ``mu [n]`` and plane row scales ``rs [b, n]``."""

    def __init__(self, Wg: torch.Tensor, bits: int, name: str = ""):
        maxq = 2**bits - 1
        xmin = torch.clamp(Wg.min(dim=1).values, max=0.0)
        xmax = torch.clamp(Wg.max(dim=1).values, min=0.0)
        both = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both, torch.full_like(xmin, -1.0), xmin)
        xmax = torch.where(both, torch.full_like(xmax, 1.0), xmax)
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        self.bits = bits
        self.maxq = maxq
        self.half = maxq / 2.0
        self.s = torch.clamp(to_fp16_checked(scale, "a group scale", name), min=MIN_SCALE)
        self.zero = zero
        self.mu = to_fp16_checked(self.s * (self.half - zero), "a group offset", name)
        # plane p (order-major, p = 0 first) holds bit (b-1-p) with row scale s * 2^(b-2-p)
        self.rs = torch.stack([to_fp16_checked(self.s * 2.0 ** (bits - 2 - p), "a row scale", name) for p in range(bits)])

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest stored-grid code for ``w [n, m]`` (rows aligned with the grid), as float."""
        q = torch.round((w - self.mu[:, None]) / self.s[:, None] + self.half)
        return torch.clamp(q, 0, self.maxq)

    def values(self, q: torch.Tensor) -> torch.Tensor:
        """Dequantized values of codes ``q [n, m]``, summed in the same order as QuantizedTensor.dequantize."""
        qi = q.to(torch.int64)
        out = self.mu[:, None].expand_as(q).clone()
        for p in range(self.bits):
            sign = ((qi >> (self.bits - 1 - p)) & 1).to(torch.float32) * 2 - 1
            out = out + self.rs[p][:, None] * sign
        return out

    def plane_signs(self, q: torch.Tensor) -> torch.Tensor:
        """``[b, n, m]`` bool, plane order first (True = bit set = +1)."""
        qi = q.to(torch.int64)
        return torch.stack([((qi >> (self.bits - 1 - p)) & 1).bool() for p in range(self.bits)])


def _finish(collector: PlaneCollector, mus: list[torch.Tensor], name: str, meta: dict):
    mu = torch.stack(mus, dim=1).to(torch.float16).cpu().numpy()
    return collector.build(mu=np.ascontiguousarray(mu), name=name, meta=meta)


def _store_group(collector: PlaneCollector, j: int, grid: GroupGrid, q: torch.Tensor, G: int) -> None:
    ones = torch.ones(grid.bits, G, dtype=torch.float32, device=q.device)
    collector.add_block(j, grid.rs, ones, grid.plane_signs(q))


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = 128, name: str = ""):
    """Round-to-nearest asymmetric ``bits``-bit per group. Returns ``(QuantizedTensor, W_hat fp32)``."""
    W = W.detach().to(torch.float32)
    n_out, n_in = W.shape
    G = group_size
    nb = n_in // G
    col = PlaneCollector((n_out, n_in), G, np.full(nb, bits, np.uint8))
    W_hat = torch.empty_like(W)
    mus = []
    for j in range(nb):
        Wg = W[:, j * G : (j + 1) * G]
        grid = GroupGrid(Wg, bits, name)
        q = grid.codes(Wg)
        W_hat[:, j * G : (j + 1) * G] = grid.values(q)
        _store_group(col, j, grid, q, G)
        mus.append(grid.mu)
    qt = _finish(col, mus, name, {"method": "rtn", "bits": bits})
    return qt, W_hat


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, percdamp: float = 0.01, name: str = "",
    act_order: bool = False, static_groups: bool = False,
):
    """GPTQ (Frantar et al.; ``fasterquant`` with ``groupsize``, lazy batch updates over
    ``group_size``-column blocks). Each column is rounded to the stored fp16 grid of its group and the
    error of the stored value is fed back. A group's scale/zero is found when its first column is
    reached, from the error-updated weights; with ``static_groups`` every group's grid is fixed up front
    from the weights (GPTQModel's ``static_groups``). ``act_order`` (GPTQModel's ``desc_act``) visits
    columns by decreasing ``H_jj``; the binary-plane layout stores groups of contiguous columns, so
    act-order implies static groups here (as GPTQModel's ``desc_act`` + ``static_groups``).
    Returns ``(QuantizedTensor, W_hat fp32)``."""
    if H is None:
        raise QdllmError(f"tensor {name or '<unnamed>'}: GPTQ needs the layer-input Hessian H")
    W = W.detach().to(torch.float32).clone()
    n_out, n_in = W.shape
    G = group_size
    nb = n_in // G
    H = H.to(W.device)
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0
    static = static_groups or act_order
    grids: list[GroupGrid | None] = [GroupGrid(W[:, j * G : (j + 1) * G], bits, name) for j in range(nb)] if static else [None] * nb
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n_in, device=W.device)
    Wp = W[:, perm]
    U = inverse_hessian_factor(H[perm][:, perm], Wp, percdamp, name)
    codes = torch.zeros_like(W)
    W_hat = torch.empty_like(W)
    for i1 in range(0, n_in, G):
        i2 = i1 + G
        W1 = Wp[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(G):
            col = int(perm[i1 + i])
            j = col // G
            if grids[j] is None:  # first column of a group (identity order): params from the updated weights
                grids[j] = GroupGrid(W1[:, i : i + G], bits, name)
            w = W1[:, i : i + 1]
            q = grids[j].codes(w)
            v = grids[j].values(q)
            codes[:, col], W_hat[:, col] = q[:, 0], v[:, 0]
            err = (w[:, 0] - v[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]
    col = PlaneCollector((n_out, n_in), G, np.full(nb, bits, np.uint8))
    for j in range(nb):
        _store_group(col, j, grids[j], codes[:, j * G : (j + 1) * G], G)
    meta = {"method": "gptq", "bits": bits, "percdamp": percdamp, "act_order": act_order, "static_groups": static}
    qt = _finish(col, [g.mu for g in grids], name, meta)
    return qt, W_hat
