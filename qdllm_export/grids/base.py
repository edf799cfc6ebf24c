"""A weight grid a runtime executes natively, and the one driver that fits any grid to data (DESIGN section 9).

A *grid* is how a runtime stores a linear weight ``W [n_out, n_in]``: ggml's ``q2_k`` / ``iq2_xs`` /
..., onnxruntime's ``MatMulNBits`` codes. Along the input dimension it is cut into blocks of
``grid.block`` columns that share parameters (scales, mins) per row. The driver walks those blocks
left to right:

1. ``state = grid.init(Wb, imp)``: the block's parameters, fitted to the current (error-compensated)
   block ``Wb [n_out, block]`` with column importance ``imp [block]`` (None: no data, plain fit);
2. GPTQ inside the block, ``grid.unit`` columns at a time: ``q = grid.round(state, c, w)`` picks the
   stored values nearest to the updated columns ``w [n_out, unit]`` (recording the codes in ``state``),
   and the OBS update ``Err = (w - q) U_uu^-1`` moves the block's later columns;
3. ``Q = grid.refit(state, T, imp)``: optional closed-form refit of the parameters with the codes fixed
   (``T`` holds each column as it was when rounded); returns the block's final stored values;
4. compensation of the later blocks with the exact block update ``Err = (W_start - Q) U_BB^-1``,
   ``W[:, end:] -= Err U[B, end:]`` (the update Quant-dLLM's DAQ uses), valid whatever ``refit`` did.

``grid.pack(states, shape, name)`` turns the blocks' states into the stored tensor (``formats``
dataclass) whose ``dequantize()`` equals the returned ``w_hat`` exactly (the stored values are the truth).

Modes (``GridConfig.rounding``): ``"rtn"`` (no data: plain fit, no compensation), ``"importance"``
(importance-weighted fit, no compensation) and ``"gptq"`` (importance + steps 2-4). All torch,
device-agnostic, vectorised over rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from formats.errors import QdllmError
from qdllm_export.quant import graphs
from qdllm_export.quant.hessian import inverse_hessian_factor
from qdllm_export.grids.threads import on_free_cores
from qdllm_export.timing import phase

ROUNDINGS = ("rtn", "importance", "gptq")
IMPORTANCES = ("hdiag", "schur")


class Grid(Protocol):
    """A runtime's weight grid. ``block``: columns sharing parameters; ``unit``: columns rounded jointly
    (1 for scalar grids; ``block`` when the grid quantizes a whole block at once, e.g. a lattice
    encoder called through ctypes)."""

    name: str
    block: int
    unit: int

    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> Any:
        """Parameters of one block from ``Wb [n_out, block]`` float32 and column importance ``imp [block]``."""
        ...

    def round(self, state: Any, c: int, w: torch.Tensor) -> torch.Tensor:
        """Stored values ``[n_out, unit]`` nearest to columns ``c .. c+unit-1`` of the block, ``w [n_out, unit]``;
        records the chosen codes in ``state``."""
        ...

    # optional: ``round_plain(state, Wb)``: the codes ``round`` would record for every column of ``Wb [n_out, block]``
    # when nothing is compensated between them (``rtn``, ``importance``), recorded at once (the same codes; a
    # grid whose ``init`` already recorded them does nothing). Without it the driver calls ``round`` unit by unit.

    def refit(self, state: Any, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        """Final stored values ``[n_out, block]`` of the block; with ``refit`` the parameters are first
        re-solved in closed form for the targets ``T`` with the codes fixed."""
        ...

    def pack(self, states: list[Any], shape: tuple[int, int], name: str) -> Any:
        """The stored tensor (a ``formats`` dataclass with ``dequantize()`` and ``bits_per_weight()``)."""
        ...

    def bits_per_weight(self, n_in: int) -> float:
        """Stored bits per weight of a linear with ``n_in`` columns (every scale and code counted)."""
        ...


@dataclass
class GridConfig:
    """How a grid is fitted to one linear. ``rounding``: rtn | importance | gptq (see module doc);
    ``importance``: column factor from ``H`` (``hdiag`` = H_jj as llama.cpp's imatrix, ``schur`` =
    diag((U_BB^T U_BB)^-1), the block's Hessian after optimal compensation of later columns);
    ``refit``: closed-form parameter refit after rounding; ``percdamp``: GPTQ damping; ``act_order``:
    inside each block, round the columns by decreasing ``H_jj`` (scalar grids; the block's parameters and
    layout are unchanged, only the order in which errors are fed forward)."""

    rounding: str = "gptq"
    importance: str = "hdiag"
    refit: bool = True
    percdamp: float = 0.01
    act_order: bool = True  # gptq, scalar grids: round each block's columns by decreasing H_jj

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise QdllmError(f"grid rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if self.importance not in IMPORTANCES:
            raise QdllmError(f"grid importance {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if not 0.0 <= self.percdamp <= 10.0:
            raise QdllmError(f"percdamp must be in [0, 10], got {self.percdamp}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GridResult:
    stored: Any  # the formats dataclass of the grid (GGMLTensor, NBitsTensor, ...); None with pack=False
    w_hat: torch.Tensor  # float32 [n_out, n_in] on W's device, == stored.dequantize()
    states: list[Any] | None = None  # pack=False: every block's state, for pack_rows
    targets: torch.Tensor | None = None  # keep_targets: [n_out, n_in] each column as it was when rounded


def column_factor(H: torch.Tensor, U: torch.Tensor | None, kind: str, block: int) -> torch.Tensor:
    """Column importance ``[n_in]`` float32 from ``H`` (``hdiag``) or ``U`` (``schur``, per ``block`` columns)."""
    if kind == "hdiag" or U is None:
        return torch.diag(H).to(torch.float32).clone()
    n = U.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=U.device)
    eye = torch.eye(block, dtype=torch.float32, device=U.device)
    for c0 in range(0, n, block):
        Ub = U[c0 : c0 + block, c0 : c0 + block]
        out[c0 : c0 + block] = torch.linalg.solve_triangular(Ub, eye[: Ub.shape[0], : Ub.shape[0]], upper=True).pow(2).sum(1)
    return out


def _check(W: torch.Tensor, grid: Grid, name: str) -> None:
    if W.ndim != 2:
        raise QdllmError(f"tensor {name}: expected a 2-D weight, got shape {tuple(W.shape)}")
    if W.shape[1] % grid.block:
        raise QdllmError(f"tensor {name}: n_in={W.shape[1]} is not a multiple of {grid.name}'s block of {grid.block} columns")
    if not bool(torch.isfinite(W).all()):
        raise QdllmError(f"tensor {name}: the weight holds NaN or inf values")


@torch.no_grad()
@on_free_cores
def grid_quantize(W: torch.Tensor, H: torch.Tensor | None, grid: Grid, cfg: GridConfig, name: str = "",
                  refit_rows: torch.Tensor | None = None, pack: bool = True, keep_targets: bool = False) -> GridResult:
    """Fit ``grid`` to ``W [n_out, n_in]`` with layer-input Hessian ``H [n_in, n_in]`` (None: no data).

    ``refit_rows`` (bool ``[n_out]``): the rows whose blocks get the closed-form refit, the others none
    (default: every row when ``cfg.refit``). Rows are independent, so stacking a matrix twice with half the
    rows refitted fits both variants in one walk over the columns (``targets.ggml.StockGridTarget``).
    ``pack=False``: no stored tensor, the blocks' states instead (``pack_rows`` packs the rows kept).
    ``keep_targets``: also the GPTQ-updated columns the codes were rounded from (block-output tuning starts there)."""
    _check(W, grid, name)
    W = W.detach().to(torch.float32).clone()
    n_out, n_in = W.shape
    data = H is not None and cfg.rounding != "rtn"
    H = H.to(W.device) if data else None
    # act-order: the driver works in block-locally permuted coordinates; the grid sees original columns
    perm = _block_order(H, grid.block) if data and cfg.rounding == "gptq" and cfg.act_order and grid.unit == 1 else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = None
    with phase("grid:factor"):
        if data and (cfg.rounding == "gptq" or cfg.importance == "schur"):
            U = inverse_hessian_factor(H, W, cfg.percdamp, name)  # zeroes dead columns of W
        imp = column_factor(H, U, cfg.importance, grid.block) if data else None
    if imp is not None:
        imp = imp / imp.mean().clamp_min(1e-30)
    if cfg.rounding != "gptq":
        U = None
    W_hat = torch.empty_like(W)
    targets = torch.empty_like(W) if keep_targets else None
    states = []
    for c0 in range(0, n_in, grid.block):
        c1 = c0 + grid.block
        lp = None if perm is None else perm[c0:c1] - c0  # position -> original column of the block
        inv = None if lp is None else torch.argsort(lp)
        W_start = W[:, c0:c1].clone()
        orig = W_start if inv is None else W_start[:, inv]
        ib = None if imp is None else imp[c0:c1] if inv is None else imp[c0:c1][inv]
        with phase("grid:init"):
            state = grid.init(orig, ib)
        with phase("grid:loop"):
            T = _round_block(grid, state, W_start, None if U is None else U[c0:c1, c0:c1], lp)
        with phase("grid:refit"):
            Tb = T if inv is None else T[:, inv]
            Q = grid.refit(state, Tb, ib, cfg.refit) if refit_rows is None else _refit_rows(grid, state, Tb, ib, refit_rows)
        Qp = Q if lp is None else Q[:, lp]
        W_hat[:, c0:c1] = Qp
        if targets is not None:
            targets[:, c0:c1] = T
        states.append(state)
        if U is not None and c1 < n_in:
            with phase("grid:compensate"):
                Err = torch.linalg.solve_triangular(U[c0:c1, c0:c1], W_start - Qp, upper=True, left=False)
                W[:, c1:] -= Err @ U[c0:c1, c1:]
    if perm is not None:
        W_hat = W_hat[:, torch.argsort(perm)]
        targets = None if targets is None else targets[:, torch.argsort(perm)]
    if not pack:
        return GridResult(stored=None, w_hat=W_hat, states=states, targets=targets)
    with phase("grid:pack"):
        stored = grid.pack(states, (n_out, n_in), name)
    return GridResult(stored=stored, w_hat=W_hat, states=states, targets=targets)


def states_rows(states: list[Any], rows: torch.Tensor, n: int) -> list[Any]:
    """Copies of the blocks' ``states`` of a fit of ``n`` rows holding only rows ``rows`` (long ``[k]``)."""
    idx = rows.cpu().numpy()

    def take(a: Any, key: str) -> Any:
        if key in PER_BLOCK or not a.ndim or a.shape[0] != n:
            return a
        return a[rows.to(a.device)] if isinstance(a, torch.Tensor) else a[idx]

    return [_map_state(st, take) for st in states]


def pack_rows(grid: Grid, states: list[Any], rows: torch.Tensor, shape: tuple[int, int], name: str = "") -> Any:
    """The stored tensor of rows ``rows`` (long ``[k]``) of a fit of ``shape`` made with
    ``grid_quantize(pack=False)``: bit for bit those rows of what ``grid.pack`` makes of every row."""
    with phase("grid:pack"):
        return grid.pack(states_rows(states, rows, shape[0]), (int(rows.shape[0]), shape[1]), name)


def _refit_rows(grid: Grid, state: Any, T: torch.Tensor, imp: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``grid.refit`` of one block with the refit applied only where ``rows`` (bool ``[n]``): values ``[n, block]``
    and ``state`` exactly as a refitted run gives them on those rows and an unrefitted one on the others."""
    plain = grid.refit(state, T, imp, False)  # the values as rounded; the state is left as it is
    before = _map_state(state, lambda a, _: a.clone() if isinstance(a, torch.Tensor) else a.copy())
    refitted = grid.refit(state, T, imp, True)
    n, keep = rows.shape[0], rows.cpu().numpy()

    def pick(new: Any, old: Any, key: str) -> Any:
        if key in PER_BLOCK:
            return new
        if isinstance(new, torch.Tensor) and new.ndim and new.shape[0] == n:
            return torch.where(rows.view(n, *([1] * (new.ndim - 1))), new, old)
        if isinstance(new, np.ndarray) and new.ndim and new.shape[0] == n:
            return np.where(keep.reshape(n, *([1] * (new.ndim - 1))), new, old)
        return new  # per block, not per row (column weights, caches): the refit leaves it as it was

    _merge_state(state, before, pick)
    return torch.where(rows[:, None], refitted, plain)


# fields of a grid state that hold one value per column of the block, not per row (lattice and libggml weights)
PER_BLOCK = ("wt", "imp")


def _map_state(state: Any, fn: Any) -> Any:
    """A copy of a grid state (a dataclass or a dict) with ``fn(value, field name)`` applied to its tensor and
    array fields."""
    items = state.items() if isinstance(state, dict) else ((f.name, getattr(state, f.name)) for f in fields(state))
    out = {k: fn(v, k) if isinstance(v, (torch.Tensor, np.ndarray)) else v for k, v in items}
    return out if isinstance(state, dict) else replace(state, **out)


def _merge_state(state: Any, other: Any, pick: Any) -> None:
    """``state``'s fields set in place to ``pick(state's, other's)``."""
    if isinstance(state, dict):
        state.update({k: pick(v, other[k], k) for k, v in state.items()})
        return
    for f in fields(state):
        setattr(state, f.name, pick(getattr(state, f.name), getattr(other, f.name), f.name))


def _block_order(H: torch.Tensor, block: int) -> torch.Tensor:
    """Column order with each ``block`` sorted by decreasing ``H_jj`` (blocks stay in place)."""
    d = torch.diag(H).reshape(-1, block)
    local = torch.argsort(d, dim=1, descending=True, stable=True)
    return (local + torch.arange(0, H.shape[0], block, device=H.device)[:, None]).reshape(-1)


def _round_block(grid: Grid, state: Any, Wb: torch.Tensor, Ubb: torch.Tensor | None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ inside one block: rounds ``grid.unit`` columns at a time; returns the columns as they were
    when rounded (the targets of the refit). Without ``Ubb`` it is plain rounding. ``cols`` (unit 1):
    the block's original column index of each position (act-order), else positions are columns."""
    W1 = Wb.clone()
    if Ubb is None and cols is None and hasattr(grid, "round_plain"):
        grid.round_plain(state, W1)  # nothing to compensate: every column at once (rtn, importance)
        return W1
    if Ubb is not None and grid.unit == 1 and hasattr(grid, "column_params"):
        P = grid.column_params(state, cols)  # each position's parameters, gathered once
        T, codes = graphs.run(("gptq-walk", grid.name), partial(_gptq_walk, grid.round_column), [Wb, Ubb, *P])
        grid.record_codes(state, cols, codes)
        return T
    B, u = Wb.shape[1], grid.unit
    idx = None if cols is None else cols.tolist()
    for c in range(0, B, u):
        w = W1[:, c : c + u]
        q = grid.round(state, c if idx is None else idx[c], w)
        if Ubb is not None and c + u < B:
            if u == 1:
                err = (w - q) / Ubb[c, c]
            else:
                err = torch.linalg.solve_triangular(Ubb[c : c + u, c : c + u], w - q, upper=True, left=False)
            W1[:, c + u :] -= err @ Ubb[c : c + u, c + u :]
    return W1


def _gptq_walk(round_column: Any, Wb: torch.Tensor, Ubb: torch.Tensor, *P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ inside one block of a scalar grid (``unit`` 1), position by position: ``round_column(params, w)``
    rounds column ``w [n, 1]`` under the position's parameters (``p[c]`` of each ``P [B, n]``) to ``(code [n],
    value [n, 1])``. Returns the columns as they were when rounded ``[n, B]`` and the codes ``[B, n]``, in
    position order: the same arithmetic, in the same order, as ``grid.round`` in :func:`_round_block`'s loop.
    A pure function of its tensors (``graphs.run`` replays it as one CUDA graph)."""
    W1 = Wb.clone()
    B = W1.shape[1]
    codes = None
    for c in range(B):
        w = W1[:, c : c + 1]
        code, q = round_column(tuple(p[c] for p in P), w)
        if codes is None:
            codes = torch.empty((B, *code.shape), dtype=code.dtype, device=code.device)
        codes[c] = code
        if c + 1 < B:
            err = (w - q) / Ubb[c, c]
            W1[:, c + 1 :] -= err @ Ubb[c : c + 1, c + 1 :]
    return W1, codes
