"""Quant-dLLM's DAQ (data-aware any-order quantizer) with GPTQ-style block error compensation.

Per ``G``-column block ``B`` (``K`` planes; ``K`` from ABMP):

    W_hat_B = sum_k (ar_k ac_k^T) * S_k,   S_k in {-1,+1}^{n_out x G}, ar_k [n_out], ac_k [G]

1. greedy residual init (ARB-RC): on the residual R (from W_B), ``ar = mean_j |R_ij|``,
   ``ac = mean_i |R_ij / ar_i|``, ``S = sign(R)``, ``R -= ar ac^T * S``;
2. ``iters`` times: for each plane k, on the target ``T = W_B - sum_{l != k} plane_l``, the exact
   weighted least-squares row update then column update (RSR, weights ``A = Lambda^2``), then a
   JOINT re-rounding of all signs (per element the best of the ``2^K`` sign combinations);
3. balance ``ar``/``ac`` per plane (same product), round both to fp16, re-round the signs once more
   against the fp16 scales: the stored values are what the block reports and hands on;
4. compensation (GPTQ/OBS, with ``U^T U = H^-1``): ``Err = (W_B - W_hat_B) U_BB^-1`` ("exact", the
   optimal update of the later columns for a jointly quantized block) or
   ``(W_B - W_hat_B) / diag(U_BB)`` ("diag", BiLLM/ARB-LLM), then ``W[:, end:] -= Err U[B, end:]``.

Data-aware weighting (DOR): importance ``Z_ij = W_ij^2 d_j`` with a column factor ``d``
(``hdiag``: ``H_jj``; ``obs``: ``1 / U_jj^2``; ``schur``: ``diag((U_BB^T U_BB)^-1)``, the block's
Hessian after optimal compensation of the later columns). Outliers ``Pi = |Z - mean| > sigma*std``
(stats over the layer or the block); ``A = (d_j / mean d if dor_base else 1) * (1 + c Pi)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from . import graphs
from .abmp import abmp_assign, uniform_planes
from .common import PlaneCollector, to_fp16_checked
from .config import QuantConfig
from .hessian import inverse_hessian_factor
from ..timing import phase

# ---------------------------------------------------------------------------------------------
# block-level math (all torch, float32, [n, G] blocks)


def planes_sum(rs: torch.Tensor, cs: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``sum_k (rs_k cs_k^T) * S_k``, summed in plane order from 0 (as QuantizedTensor.dequantize)."""
    out = torch.zeros(S.shape[1:], dtype=torch.float32, device=S.device)
    for k in range(S.shape[0]):
        out = out + (rs[k][:, None] * cs[k][None, :]) * S[k]
    return out


def weighted_loss(W: torch.Tensor, A: torch.Tensor, Q: torch.Tensor) -> float:
    return float((A.double() * (W.double() - Q.double()) ** 2).sum())


def rsr_row_update(T: torch.Tensor, A: torch.Tensor, S: torch.Tensor, ac: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """argmin over ``ar`` of ``sum A (T - (ar ac^T) * S)^2`` (closed form; rows with no weight keep ``old``)."""
    num = (A * T * S) @ ac
    den = A @ (ac * ac)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), old)


def rsr_col_update(T: torch.Tensor, A: torch.Tensor, S: torch.Tensor, ar: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """argmin over ``ac`` of ``sum A (T - (ar ac^T) * S)^2``."""
    num = (A * T * S).t() @ ar
    den = A.t() @ (ar * ar)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), old)


def rsr_row_update_full(T: torch.Tensor, M: torch.Tensor, S: torch.Tensor, ac: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """argmin over ``ar`` of ``sum_i (T_i - ar_i v_i) M (T_i - ar_i v_i)^T`` with ``v_i = ac * S_i`` (full metric ``M [G, G]``)."""
    V = S * ac[None, :]
    num = ((T @ M) * V).sum(dim=1)
    den = ((V @ M) * V).sum(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), old)


def rsr_col_update_full(T: torch.Tensor, M: torch.Tensor, S: torch.Tensor, ar: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """argmin over ``ac`` of ``sum_i (T_i - ar_i (ac * S_i)) M (...)^T``: the ``G x G`` normal equations
    ``(M o S^T diag(ar^2) S) ac = sum_i ar_i S_i o (M T_i^T)``."""
    A = M * (S.t() @ (S * (ar * ar)[:, None]))
    b = ((T @ M) * S * ar[:, None]).sum(dim=0)
    A = A + torch.eye(A.shape[0], dtype=A.dtype, device=A.device) * (1e-9 * A.diagonal().mean().clamp_min(1e-30))
    sol = torch.linalg.solve(A.double(), b.double()).to(torch.float32)
    return torch.where(torch.isfinite(sol), sol, old)


def joint_reround(W: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """Signs ``[K, n, G]`` (+-1 float) minimising ``|W - sum_k s_k rs_k cs_k|`` per element over all
    ``2^K`` combinations (ties: the lowest combination index, bit k set = +1 for plane k)."""
    K = rs.shape[0]
    C = rs[:, :, None] * cs[:, None, :]
    best_err = None
    best_idx = torch.zeros(W.shape, dtype=torch.int64, device=W.device)
    for idx in range(2**K):
        val = torch.zeros_like(W)
        for k in range(K):
            val = val + (C[k] if (idx >> k) & 1 else -C[k])
        err = (W - val).abs()
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_idx = torch.where(better, torch.full_like(best_idx, idx), best_idx)
    return torch.stack([((best_idx >> k) & 1).to(torch.float32) * 2 - 1 for k in range(K)])


def gptq_reround(W: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor, Ubb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs chosen column by column with the rounding error of each column fed forward to the block's
    later columns by the OBS update (GPTQ on the per-element grid of the ``2^K`` sign combinations).

    ``W [n, G]`` float32, scales ``rs [K, n]``, ``cs [K, G]``, ``Ubb [G, G]`` the block's upper factor
    of ``H^-1``. Returns signs ``[K, n, G]`` (+-1 float) and the targets ``T [n, G]``: each column as it
    was when rounded (what a refit of the scales should fit)."""
    K = rs.shape[0]
    n, G = W.shape
    combos = sign_combos(K, W.device)  # [2^K, K]
    W1 = W.clone()
    S = torch.empty(K, n, G, dtype=torch.float32, device=W.device)
    for c in range(G):
        vals = combos @ (rs * cs[:, c : c + 1])  # [2^K, n]
        best = (W1[:, c][None, :] - vals).abs().argmin(dim=0)  # ties: lowest combination index
        S[:, :, c] = combos[best].t()
        q = vals.gather(0, best[None, :])[0]
        if c + 1 < G:
            err = (W1[:, c] - q) / Ubb[c, c]
            W1[:, c + 1 :] -= err[:, None] * Ubb[c, c + 1 :][None, :]
    return S, W1


_COMBOS: dict[tuple[int, torch.device], torch.Tensor] = {}


def sign_combos(K: int, device: torch.device) -> torch.Tensor:
    """``[2^K, K]`` float32: row ``idx`` holds +1 for plane k where bit k of ``idx`` is set, else -1 (cached per
    device, so a CUDA graph capture finds it made)."""
    key = (K, torch.device(device))
    if key not in _COMBOS:
        _COMBOS[key] = torch.tensor([[1.0 if (idx >> k) & 1 else -1.0 for k in range(K)] for idx in range(2**K)],
                                    dtype=torch.float32, device=device)
    return _COMBOS[key]


def greedy_init(W: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ARB-RC residual initialisation: ``(rs [K, n], cs [K, G], S [K, n, G])``."""
    R = W.clone()
    rs, cs, S = [], [], []
    for _ in range(K):
        ar = R.abs().mean(dim=1)
        ac = (R.abs() / ar.clamp_min(1e-30)[:, None]).mean(dim=0)
        s = torch.where(R >= 0, 1.0, -1.0)
        R = R - (ar[:, None] * ac[None, :]) * s
        rs.append(ar)
        cs.append(ac)
        S.append(s)
    return torch.stack(rs), torch.stack(cs), torch.stack(S)


def rsr_sweep(W: torch.Tensor, A: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor, S: torch.Tensor,
              M: torch.Tensor | None = None) -> None:
    """One pass of row-then-column rescaling over every plane (in place), signs fixed. With ``M [G, G]``
    the refits minimise the full in-block quadratic form ``tr(D M D^T)`` instead of ``sum A D^2``."""
    K = S.shape[0]
    for k in range(K):
        others = torch.zeros_like(W)
        for l in range(K):
            if l != k:
                others = others + (rs[l][:, None] * cs[l][None, :]) * S[l]
        T = W - others
        if M is None:
            rs[k] = rsr_row_update(T, A, S[k], cs[k], rs[k])
            cs[k] = rsr_col_update(T, A, S[k], rs[k], cs[k])
        else:
            rs[k] = rsr_row_update_full(T, M, S[k], cs[k], rs[k])
            cs[k] = rsr_col_update_full(T, M, S[k], rs[k], cs[k])


def balance_scales(rs: torch.Tensor, cs: torch.Tensor) -> None:
    """Per plane, move a common factor between ``rs`` and ``cs`` so their RMS are equal (same product)."""
    for k in range(rs.shape[0]):
        r = rs[k].pow(2).mean().sqrt()
        c = cs[k].pow(2).mean().sqrt()
        if float(r) > 0 and float(c) > 0:
            t = (c / r).sqrt()
            rs[k] = rs[k] * t
            cs[k] = cs[k] / t


@dataclass
class DaqBlock:
    rs: torch.Tensor  # [K, n] fp16-representable (when fp16=True)
    cs: torch.Tensor  # [K, G]
    S: torch.Tensor  # [K, n, G] +-1
    Q: torch.Tensor  # [n, G] = planes_sum(rs, cs, S)
    losses: list[float] = field(default_factory=list)  # weighted loss after init and each iteration


def daq_block(
    W: torch.Tensor, A: torch.Tensor | None, K: int, iters: int, fp16: bool = True, track: bool = False, name: str = "",
    M: torch.Tensor | None = None, Ubb: torch.Tensor | None = None, rounds: int = 2,
) -> DaqBlock:
    """DAQ of one block ``W [n, G]`` with element weights ``A`` (None = uniform) and ``K`` planes;
    ``M [G, G]``: full metric for the scale refits (``QuantConfig.metric == "full"``). With ``Ubb``
    (``QuantConfig.inblock == "gptq"``) the signs are finally chosen by :func:`gptq_reround`,
    alternating ``rounds`` times with a refit of the scales to its targets, and once more against the
    fp16 scales."""
    W = W.to(torch.float32)
    if A is None:
        A = torch.ones_like(W)
    graph = not track and M is None  # pure tensor functions: replayed as CUDA graphs on a GPU (quant.graphs)
    with phase("daq:iters"):
        if graph:
            rs, cs, S = graphs.run(("daq-iters", K, iters), partial(_iterate, K=K, iters=iters), [W, A])
            losses = []
        else:
            rs, cs, S = greedy_init(W, K)
            losses = [weighted_loss(W, A, planes_sum(rs, cs, S))] if track else []
            for _ in range(iters):
                rsr_sweep(W, A, rs, cs, S, M)
                S = joint_reround(W, rs, cs)
                if track:
                    losses.append(weighted_loss(W, A, planes_sum(rs, cs, S)))
    if Ubb is not None and rounds > 0:
        with phase("daq:gptq"):
            if graph:
                rs, cs, S = graphs.run(("daq-gptq", K, rounds), partial(_gptq_rounds, rounds=rounds), [W, A, rs, cs, Ubb])
            else:
                for _ in range(rounds):
                    S, T = gptq_reround(W, rs, cs, Ubb)
                    rsr_sweep(T, A, rs, cs, S, M)
    if fp16:
        balance_scales(rs, cs)
        rs = to_fp16_checked(rs, "a row scale", name)
        cs = to_fp16_checked(cs, "a column scale", name)
        if Ubb is None:
            S = joint_reround(W, rs, cs)
        else:
            with phase("daq:gptq"):
                S = graphs.run(("daq-reround", K), _final_reround, [W, rs, cs, Ubb])[0] if graph \
                    else gptq_reround(W, rs, cs, Ubb)[0]
    return DaqBlock(rs=rs, cs=cs, S=S, Q=planes_sum(rs, cs, S), losses=losses)


def _iterate(W: torch.Tensor, A: torch.Tensor, K: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2 of the module doc on ``W [n, G]`` with weights ``A [n, G]``: ``(rs [K, n], cs [K, G], S [K, n, G])``."""
    rs, cs, S = greedy_init(W, K)
    for _ in range(iters):
        rsr_sweep(W, A, rs, cs, S)
        S = joint_reround(W, rs, cs)
    return rs, cs, S


def _gptq_rounds(W: torch.Tensor, A: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor, Ubb: torch.Tensor,
                 rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rounds`` times: signs by :func:`gptq_reround`, then the scales refitted to its targets (``rs``, ``cs``
    updated in place and returned with the last signs)."""
    for _ in range(rounds):
        S, T = gptq_reround(W, rs, cs, Ubb)
        rsr_sweep(T, A, rs, cs, S)
    return rs, cs, S


def _final_reround(W: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor, Ubb: torch.Tensor) -> tuple[torch.Tensor]:
    """The signs of :func:`gptq_reround` against the fp16 scales."""
    return (gptq_reround(W, rs, cs, Ubb)[0],)


# ---------------------------------------------------------------------------------------------
# layer level


def column_importance(H: torch.Tensor | None, U: torch.Tensor | None, kind: str, G: int) -> torch.Tensor | None:
    """Column factor ``d [n_in]`` of the importance ``Z = W^2 d`` (None without H)."""
    if H is None:
        return None
    if kind == "hdiag":
        return torch.diag(H).to(torch.float32).clone()
    if kind == "obs":
        return 1.0 / torch.diag(U).pow(2)
    if kind == "schur":
        n = U.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=U.device)
        eye = torch.eye(G, dtype=torch.float32, device=U.device)
        for c0 in range(0, n, G):
            Ub = U[c0 : c0 + G, c0 : c0 + G]
            Uinv = torch.linalg.solve_triangular(Ub, eye, upper=True)
            out[c0 : c0 + G] = Uinv.pow(2).sum(dim=1)
        return out
    raise ValueError(kind)


@dataclass
class LayerContext:
    """What DAQ needs for a layer besides the weight: ``U``, the column factor, the Z statistics."""

    U: torch.Tensor | None
    d: torch.Tensor | None  # [n_in] column factor, normalised to mean 1
    z_mean: float
    z_std: float
    scores: np.ndarray  # [n_blocks] ABMP block scores sum_{block} Z


def layer_context(
    W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig, name: str = "", need_u: bool = True
) -> LayerContext:
    """Prepare ``U`` (zeroing dead columns of ``W`` in place), ``d``, Z statistics and block scores.

    With ``need_u=False`` and ``importance="hdiag"`` the Cholesky factorisation is skipped (scores only).
    """
    G = cfg.group_size
    U = None
    if H is not None and (need_u or cfg.importance != "hdiag"):
        U = inverse_hessian_factor(H.to(W.device), W, cfg.percdamp, name)
    d = column_importance(H.to(W.device) if H is not None else None, U, cfg.importance, G)
    if d is not None:
        m = d.mean()
        d = d / m if float(m) > 0 else torch.ones_like(d)
    Z = W.square()
    if d is not None:
        Z = Z * d[None, :]
    z_mean, z_std = float(Z.mean()), float(Z.std()) if Z.numel() > 1 else 0.0
    scores = Z.reshape(W.shape[0], -1, G).sum(dim=(0, 2)).double().cpu().numpy()
    return LayerContext(U=U, d=d, z_mean=z_mean, z_std=z_std, scores=scores)


def dor_weights(Wb: torch.Tensor, db: torch.Tensor | None, cfg: QuantConfig, ctx: LayerContext) -> torch.Tensor:
    """Element weights ``A = Lambda^2`` of one block."""
    Z = Wb.square()
    if db is not None:
        Z = Z * db[None, :]
    if cfg.outlier_scope == "block":
        m, s = float(Z.mean()), float(Z.std())
    else:
        m, s = ctx.z_mean, ctx.z_std
    A = torch.ones_like(Wb)
    if s > 0 and cfg.outlier_weight > 0:
        A = A + cfg.outlier_weight * ((Z - m).abs() > cfg.outlier_sigma * s).to(torch.float32)
    if cfg.dor_base and db is not None:
        A = A * db[None, :]
    return A


def block_metric(Ubb: torch.Tensor) -> torch.Tensor:
    """``(U_BB^T U_BB)^-1`` normalised to mean diagonal 1: the block's Hessian after the later columns
    are optimally compensated (its diagonal is the ``schur`` column factor)."""
    eye = torch.eye(Ubb.shape[0], dtype=torch.float32, device=Ubb.device)
    Ui = torch.linalg.solve_triangular(Ubb, eye, upper=True)
    M = Ui @ Ui.t()
    return M / M.diagonal().mean().clamp_min(1e-30)


def block_order(H: torch.Tensor | None, G: int) -> torch.Tensor | None:
    """Act-order inside each ``G``-column block: column indices sorted by decreasing ``H_jj`` within their
    block (the block structure, and so the stored layout, is unchanged). None without ``H``."""
    if H is None:
        return None
    d = torch.diag(H).reshape(-1, G)
    local = torch.argsort(d, dim=1, descending=True, stable=True)
    return (local + torch.arange(0, H.shape[0], G, device=H.device)[:, None]).reshape(-1)


def daq_quantize(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig, planes: np.ndarray | None = None, name: str = ""):
    """Quant-dLLM on one weight. Returns ``(QuantizedTensor, W_hat fp32 torch, planes)``.

    With ``cfg.inblock == "gptq-act"`` the columns of every block are visited by decreasing ``H_jj`` (the
    weight and ``H`` are permuted inside each block, quantized, and the result permuted back exactly)."""
    perm = block_order(H.to(W.device), cfg.group_size) if cfg.inblock == "gptq-act" and H is not None else None
    if perm is None:
        return _daq_quantize(W, H, cfg, planes, name)
    inv = torch.argsort(perm)
    G = cfg.group_size
    local = inv.view(-1, G) - torch.arange(0, W.shape[1], G, device=inv.device)[:, None]  # [nb, G]
    qt, W_hat, planes = _daq_quantize(W[:, perm], H.to(W.device)[perm][:, perm], cfg, planes, name, local)
    return qt, W_hat[:, inv], planes


def permute_block_columns(qt, perm: np.ndarray):
    """``qt`` with columns reordered inside their blocks (``perm`` maps new column -> old column and never
    leaves a block): signs and column scales move, every value is kept."""
    from formats.qtensor import QuantizedTensor, pack_signs, unpack_signs

    G = qt.group_size
    local = perm.reshape(-1, G) - np.arange(0, qt.shape[1], G)[:, None]  # [nb, G]
    idx = np.asarray([j for _, j in qt.plane_index()])  # block of every stored plane
    signs = unpack_signs(qt.signs, np.int8)  # [P, n_out, G]
    signs = np.take_along_axis(signs, local[idx][:, None, :], axis=2)
    col = np.take_along_axis(qt.col_scale, local[idx], axis=1)
    return QuantizedTensor(qt.shape, G, qt.planes, pack_signs(signs), qt.row_scale, np.ascontiguousarray(col), qt.mu,
                           qt.name, dict(qt.meta))


def _daq_quantize(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig, planes: np.ndarray | None = None, name: str = "",
                  local: torch.Tensor | None = None):
    """DAQ of ``W`` block by block. ``local`` (long ``[nb, G]``): the stored tensor's column ``c`` of block ``j``
    is the quantized block's column ``local[j, c]`` (act-order's inverse permutation, applied to the signs and
    column scales on ``W``'s device before they are collected; what :func:`permute_block_columns` does to a
    whole tensor)."""
    W = W.detach().to(torch.float32).clone()
    n_out, n_in = W.shape
    G = cfg.group_size
    nb = n_in // G
    with phase("daq:context"):
        ctx = layer_context(W, H, cfg, name)
    if planes is None:
        if cfg.abmp:
            planes = abmp_assign(ctx.scores, cfg.bits, cfg.abmp_ratio, what=name)
        else:
            planes = uniform_planes(nb, cfg.bits, what=name)
    planes = np.asarray(planes, np.uint8)
    col = PlaneCollector((n_out, n_in), G, planes)
    W_hat = torch.empty_like(W)
    U = ctx.U
    for j in range(nb):
        c0, c1 = j * G, (j + 1) * G
        Wb = W[:, c0:c1]
        db = ctx.d[c0:c1] if ctx.d is not None else None
        A = dor_weights(Wb, db, cfg, ctx) if cfg.data_aware else None
        M = block_metric(U[c0:c1, c0:c1]) if cfg.metric == "full" and cfg.data_aware and U is not None else None
        Ubb = U[c0:c1, c0:c1] if cfg.inblock != "none" and U is not None else None
        blk = daq_block(Wb, A, int(planes[j]), cfg.iters, fp16=True, name=name, M=M, Ubb=Ubb)
        W_hat[:, c0:c1] = blk.Q
        if local is None:
            col.add_block(j, blk.rs, blk.cs, blk.S > 0)
        else:
            lj = local[j].to(W.device)
            col.add_block(j, blk.rs, blk.cs[:, lj], blk.S[:, :, lj] > 0)
        if U is not None and c1 < n_in:
            with phase("daq:compensate"):
                D = Wb - blk.Q
                Ub = U[c0:c1, c0:c1]
                if cfg.compensation == "exact":
                    Err = torch.linalg.solve_triangular(Ub, D, upper=True, left=False)
                else:
                    Err = D / torch.diag(Ub)[None, :]
                W[:, c1:] -= Err @ U[c0:c1, c1:]
    meta = {"method": "quant-dllm", "bits": cfg.bits}
    qt = col.build(mu=None, name=name, meta=meta)
    return qt, W_hat, planes


def block_scores(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig, name: str = "") -> np.ndarray:
    """ABMP scores ``s_j = sum_{block j} Z`` of one weight (for pooling with abmp_assign_pooled)."""
    W = W.detach().to(torch.float32).clone()
    if H is not None:
        W[:, torch.diag(H) == 0] = 0.0  # as the quantizer sees it (dead inputs zeroed)
    return layer_context(W, H, cfg, name, need_u=False).scores
