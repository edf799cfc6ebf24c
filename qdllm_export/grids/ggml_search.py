"""Candidate searches inside the ggml grids' fits (``grids.ggml``): each sub-block's best continuous scale
(symmetric types) or scale and offset (affine types) over a list of candidates, evaluated in chunks so a
temporary ``[K, n, S, L]`` stays within ``CHUNK`` elements; the first least error wins across chunks."""

from __future__ import annotations

from typing import Callable

import torch

SUB_RATIOS = torch.linspace(0.6, 1.3, 29).tolist()  # symmetric sub-block candidates: max|x| -> ratio * extreme level
CHUNK = 1 << 23  # elements of one candidate batch [K, n, S, L] (32 MB of float32 per temporary)
CHUNK_CUDA = 1 << 26  # on a GPU (256 MB a temporary): a linear of 8B's shapes gets several candidates a launch


def chunks(k: int, per: int, device: torch.device | None = None) -> list[tuple[int, int]]:
    """Candidate ranges ``[k0, k1)`` of at most ``CHUNK / per`` candidates each (``CHUNK_CUDA`` on a GPU:
    each candidate is computed alone and the first least error wins across chunks, so only the number of
    launches changes)."""
    step = max(1, (CHUNK_CUDA if device is not None and device.type == "cuda" else CHUNK) // max(per, 1))
    return [(k0, min(k, k0 + step)) for k0 in range(0, k, step)]


def pick(cands: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Per row, the candidate [K, n] of least error [K, n] (the first on ties) -> [n]."""
    return cands.gather(0, err.argmin(0, keepdim=True))[0]


def wsum(a: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Weighted sum over sub-blocks and elements: ``[n, S, L]`` -> ``[n]``."""
    return (a * wt).sum((1, 2))


def sym_sub_fit(lev: torch.Tensor, nearest: Callable[..., torch.Tensor], X: torch.Tensor,
                wt: torch.Tensor) -> torch.Tensor:
    """Best continuous signed scale [n, S] per sub-block of a symmetric type (value = s * lev): the largest
    value mapped to a ratio of either extreme level, each candidate re-solved by least squares. ``lev``: the
    type's levels (ascending); ``nearest(X, s, o)``: the grid's code indices."""
    xm = X.gather(-1, X.abs().argmax(-1, keepdim=True))[..., 0]  # signed largest value [n, S]
    sxx = (wt * X * X).sum(-1)
    ends = [L * r for L in (float(lev[0]), float(lev[-1])) for r in SUB_RATIOS]
    best_e, best_s = sxx, torch.zeros_like(sxx)  # s = 0
    for k0, k1 in chunks(len(ends), X.numel(), X.device):
        s = xm / torch.tensor(ends[k0:k1], device=X.device)[:, None, None]  # [K, n, S]
        v = lev[nearest(X, s[..., None], torch.zeros_like(s)[..., None])]
        svv, svx = (wt * v * v).sum(-1), (wt * v * X).sum(-1)
        ok = svv > 0
        e = torch.where(ok, sxx - svx * svx / svv.clamp_min(1e-30), sxx)
        s_ls = torch.where(ok, svx / svv.clamp_min(1e-30), 0.0)
        k = e.argmin(0, keepdim=True)
        e, s_ls = e.gather(0, k)[0], s_ls.gather(0, k)[0]
        better = e < best_e
        best_e, best_s = torch.where(better, e, best_e), torch.where(better, s_ls, best_s)
    return best_s


def affine_sub_fit(X: torch.Tensor, wt: torch.Tensor, nq: int, clamp_min: bool,
                   rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36) -> tuple[torch.Tensor, torch.Tensor]:
    """Best continuous (scale, offset) [n, S] per sub-block, value = s * q - o, q in 0..nq (llama.cpp's
    ``make_qkx3_quants`` search, vectorised over candidates). ``clamp_min``: the offset is a min of the
    block (o >= 0)."""
    mn = X.amin(-1)
    if clamp_min:
        mn = mn.clamp(max=0.0)
    span = X.amax(-1) - mn
    flat = span <= 0
    span = torch.where(flat, 1.0, span)
    Xm = X - mn[..., None]
    sw, sx = wt.sum(-1).expand_as(mn), (wt * X).sum(-1)
    best_e = torch.full_like(mn, float("inf"))
    best_s, best_o = torch.zeros_like(mn), -mn
    steps = [nq + rmin + rdelta * k for k in range(nstep + 1)]
    for k0, k1 in chunks(len(steps), X.numel(), X.device):
        iscale = torch.tensor(steps[k0:k1], device=X.device)[:, None, None] / span  # [K, n, S]
        q = torch.round(iscale[..., None] * Xm).clamp_(0, nq)
        wq = wt * q
        sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), (wq * X).sum(-1)
        D = sw * sqq - sq * sq
        ok = D > 0
        Ds = torch.where(ok, D, 1.0)
        s = (sw * sqx - sx * sq) / Ds
        m = (sqq * sx - sq * sqx) / Ds
        if clamp_min:
            pos = m > 0
            s = torch.where(pos, sqx / sqq.clamp_min(1e-30), s)
            m = torch.where(pos, 0.0, m)
        e = torch.where(ok, (wt * (s[..., None] * q + m[..., None] - X).square()).sum(-1), float("inf"))
        k = e.argmin(0, keepdim=True)
        e, s, m = e.gather(0, k)[0], s.gather(0, k)[0], m.gather(0, k)[0]
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s, best_o = torch.where(better, s, best_s), torch.where(better, -m, best_o)
    best_s = torch.where(flat, 0.0, best_s.clamp_min(0.0))
    return best_s, best_o
