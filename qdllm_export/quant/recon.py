"""Block-output reconstruction: after every linear of a transformer block has its per-layer fit, the rounding
of each stored code is tuned to minimise the error of the whole block's output (AutoRound's signed-gradient
descent on rounding offsets, over any grid).

Each linear offers a :class:`Tunable`: a starting point ``S [n_out, n_in]`` (the columns its codes were rounded
from), a step ``[n_out, n_in]`` (the spacing of neighbouring stored values) and ``nearest(X)``, the stored
values nearest to ``X`` with every scale of the fit held fixed. The tuned weight is
``Q(S + V * step)`` with ``V`` in ``[-bound, bound]``, differentiated straight through ``Q``; the loss is the
mean square error of the block's output, on inputs from the already quantized earlier blocks, against the
float model's block output. Only codes move, so ``commit()`` returns a tensor the grid's own encoder packs:
the bytes decode to the tuned weights exactly. Per block, the tuned codes are kept only if the loss over the first
``CHECK_WINDOWS`` calibration windows is lower than with the per-layer fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import torch

from formats.errors import QdllmError
from qdllm_export.timing import phase

TARGETS = ("float", "local")
# steps per block when ReconConfig.iters is None, by what is tuned (docs/benchmarks.md "recon": on both bundled
# families 50 steps matched 100 for the grids; planes gained from 100)
DEFAULT_ITERS = {"grid": 50, "planes": 100}
# windows the keep-or-drop check compares the block's loss on (the first ones; all when fewer)
CHECK_WINDOWS = 32


@dataclass
class ReconConfig:
    """``iters``: signed-gradient steps per block (0: off; None: ``DEFAULT_ITERS`` of what is tuned); ``lr``:
    first step, in units of each tunable's ``step`` times its ``lr_scale``, falling linearly to 0 (default
    ``1 / iters``, AutoRound's); ``batch``: calibration windows per step (docs/benchmarks.md "recon": 1 window of
    256 tokens matched 4 for q2_k, not for int2 and planes); ``target``: ``float`` (the float model's block output
    on the float model's inputs) or ``local`` (the float block on the quantized inputs)."""

    iters: int | None = None
    lr: float | None = None  # default 1 / iters (AutoRound's)
    batch: int = 4
    target: str = "float"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters is not None and self.iters < 0:
            raise QdllmError(f"--tune-iters must be >= 0, got {self.iters}")
        if self.batch < 1:
            raise QdllmError(f"block-output tuning needs at least 1 window a step, got {self.batch}")
        if self.target not in TARGETS:
            raise QdllmError(f"reconstruction target {self.target!r} is not one of {', '.join(TARGETS)}")

    @property
    def on(self) -> bool:
        return self.iters is None or self.iters > 0

    def steps_for(self, tunables: dict[str, "Tunable"]) -> int:
        """The steps of one block: ``iters``, else the largest default of its tunables' kinds."""
        return self.iters if self.iters is not None else max(DEFAULT_ITERS[t.kind] for t in tunables.values())

    def step_size(self, iters: int) -> float:
        return self.lr if self.lr is not None else 1.0 / max(iters, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tunable(Protocol):
    kind: str  # "grid" | "planes": the key of DEFAULT_ITERS
    start: torch.Tensor  # [n_out, n_in] float32
    step: torch.Tensor  # [n_out, n_in] float32
    bound: float  # |V| <= bound
    lr_scale: float  # multiplies ReconConfig's step size

    def nearest(self, X: torch.Tensor, record: bool = False) -> torch.Tensor:
        """Stored values ``[n_out, n_in]`` nearest to ``X`` (scales fixed); ``record``: keep those codes."""
        ...

    def commit(self, X: torch.Tensor) -> Any:
        """The stored tensor whose codes are the nearest to ``X`` (bit for bit ``nearest(X)`` once decoded)."""
        ...


class GridTunable:
    """A grid fit (``grids.base.GridResult`` with states and targets) as a :class:`Tunable`."""

    kind = "grid"
    bound = 0.5
    lr_scale = 1.0  # first step 1 / iters: V can travel the whole bound

    def __init__(self, grid: Any, states: list[Any], start: torch.Tensor, name: str):
        self.grid, self.states, self.name = grid, states, name
        self.start = start.detach().to(torch.float32)
        self.step = torch.cat([grid.steps(st) for st in states], dim=1).to(self.start.device)

    def nearest(self, X: torch.Tensor, record: bool = False) -> torch.Tensor:
        B = self.grid.block
        return torch.cat([self.grid.requant(st, X[:, j * B : (j + 1) * B], record) for j, st in enumerate(self.states)], 1)

    def commit(self, X: torch.Tensor) -> Any:
        self.nearest(X, record=True)
        return self.grid.pack(self.states, tuple(X.shape), self.name)


def tunable_grid(grid: Any) -> bool:
    """Whether block-output tuning can move ``grid``'s codes (scalar ggml and MatMulNBits grids)."""
    return hasattr(grid, "requant") and hasattr(grid, "steps")


# ------------------------------------------------------------------------------------------ the tuning
@dataclass
class ReconReport:
    loss_before: float
    loss_after: float
    kept: bool
    tuned: tuple[str, ...]
    iters: int


def _block_loss(run: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor], weights: dict[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Mean square error of the block's output over the first ``CHECK_WINDOWS`` windows of ``x [N, L, d]`` against
    ``y``."""
    tot = 0.0
    x, y = x[:CHECK_WINDOWS], y[:CHECK_WINDOWS]
    with torch.no_grad(), phase("recon:loss"):
        for s in range(0, x.shape[0], batch):
            tot += float((run(x[s : s + batch], weights) - y[s : s + batch]).square().sum())
    return tot / y.numel()


class _Stack:
    """Tunables tuned as one matrix ``[sum n_out, n_in]``: the rows of every member in order. Members on one
    grid that can stack its states (``stack_states``: the ggml scalar types, MatMulNBits) are rounded in one
    ``requant`` a step, each member's column blocks taken as further rows of one merged state (a mixture's
    experts and a wide linear's blocks would otherwise cost a few small kernels each, every step); any other
    tunable (planes, the lattice types) is a stack of one that rounds through its own ``nearest``. Rounding is
    row-wise, so the values are those of each member's ``nearest``, bit for bit."""

    def __init__(self, members: list[tuple[str, Tunable]]):
        ts = [t for _, t in members]
        self.roles, self.sizes = [r for r, _ in members], [t.start.shape[0] for t in ts]
        self.start = ts[0].start if len(ts) == 1 else torch.cat([t.start for t in ts])
        self.step = ts[0].step if len(ts) == 1 else torch.cat([t.step for t in ts])
        for t, a, b in zip(ts, self.start.split(self.sizes), self.step.split(self.sizes)):
            t.start, t.step = a, b  # views of the stacked rows: no second copy on the device
        self.bound, self.lr_scale, self.only = ts[0].bound, ts[0].lr_scale, ts[0] if len(ts) == 1 else None
        self.grid = getattr(ts[0], "grid", None)
        if hasattr(self.grid, "stack_states"):
            self.nb = len(ts[0].states)
            self.state = self.grid.stack_states([t.states[j] for j in range(self.nb) for t in ts])
            self.only = None

    @staticmethod
    def key(role: str, t: Tunable) -> tuple:
        g = getattr(t, "grid", None)
        if not hasattr(g, "stack_states"):
            return ("own", role)
        return (type(g), g.name, g.block, len(t.states), t.bound, t.lr_scale)

    def nearest(self, X: torch.Tensor) -> torch.Tensor:
        if self.only is not None:
            return self.only.nearest(X)
        N, B = X.shape[0], self.grid.block
        Y = self.grid.requant(self.state, X.reshape(N, self.nb, B).transpose(0, 1).reshape(self.nb * N, B))
        return Y.view(self.nb, N, B).transpose(0, 1).reshape(N, self.nb * B)

    def split(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.roles, torch.split(W, self.sizes)))


def _stacks(tunables: dict[str, Tunable]) -> list[_Stack]:
    groups: dict[tuple, list[tuple[str, Tunable]]] = {}
    for r, t in tunables.items():
        k = _Stack.key(r, t)
        groups.setdefault(k, []).append((r, t))
    return [_Stack(m) for m in groups.values()]


def reconstruct(run: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor], tunables: dict[str, Tunable],
                fitted: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: ReconConfig
                ) -> tuple[dict[str, torch.Tensor] | None, ReconReport]:
    """Tune the codes of ``tunables`` (role -> Tunable) to minimise ``||run(x, W) - y||^2``.

    ``run(x_batch, weights)``: the block's output ``[b, L, d]`` with the weights of ``weights`` (role -> float32
    ``[n_out, n_in]``) in place of its own; ``fitted``: role -> the per-layer fit's stored values; ``x``, ``y``
    ``[N, L, d]``: block inputs (from the quantized earlier blocks) and targets. Returns (role -> tuned point
    ``X`` to ``commit``, or None when the tuned codes do not lower the loss over the first ``CHECK_WINDOWS`` windows
    of ``x``; the report)."""
    roles = list(tunables)
    batch = min(cfg.batch, x.shape[0])
    before = _block_loss(run, fitted, x, y, batch)
    stacks = _stacks(tunables)
    V = [torch.zeros_like(st.start, requires_grad=True) for st in stacks]
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    iters = cfg.steps_for(tunables)
    lr0 = cfg.step_size(iters)
    for it in range(iters):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g).to(x.device)
        weights = dict(fitted)
        with phase("recon:nearest"):
            for st, v in zip(stacks, V):
                X = st.start + v * st.step
                weights.update(st.split(X + (st.nearest(X.detach()) - X).detach()))  # straight through the rounding
        with phase("recon:grad"):
            loss = (run(x[idx], weights) - y[idx]).square().mean()
            # an expert no token of this minibatch is routed to has no gradient (zero where stacked)
            grads = torch.autograd.grad(loss, V, allow_unused=True)
        lr = lr0 * (1.0 - it / iters)
        with torch.no_grad():
            for st, v, gr in zip(stacks, V, grads):
                if gr is not None:
                    v.sub_(lr * st.lr_scale * torch.sign(gr)).clamp_(-st.bound, st.bound)
    with torch.no_grad():
        points = {r: X for st, v in zip(stacks, V) for r, X in st.split(st.start + v * st.step).items()}
        tuned = {**fitted, **{r: tunables[r].nearest(points[r]) for r in roles}}
        after = _block_loss(run, tuned, x, y, batch)
    kept = after < before
    return (points if kept else None), ReconReport(before, after, kept, tuple(roles), iters)


class PlanesTunable:
    """Binary planes (``formats.qtensor.QuantizedTensor``) as a :class:`Tunable`: the signs move, every scale and
    ``mu`` stay. Block ``j``'s values are ``mu + sum_k s_k rs_k cs_k`` over its ``K_j`` planes; ``nearest`` picks
    the sign vector of the ``2^K_j`` whose value is nearest. The start is the fitted weight, the step twice the
    smallest plane's amplitude (one flip of it)."""

    kind = "planes"
    bound = 1.0
    lr_scale = 3.0  # tiny-llada planes, 100 steps: lr 0.03 gave +0.153 ΔNLL, 0.01 +0.181 (start on the grid: flips need V > 0.5)

    def __init__(self, qt: Any, w_hat: torch.Tensor, name: str):
        import itertools

        import numpy as np

        self.qt, self.name = qt, name
        dev = w_hat.device
        n, n_in = qt.shape
        self.G, self.nb = qt.group_size, n_in // qt.group_size
        rs = torch.from_numpy(qt.row_scale.astype(np.float32)).to(dev)  # [P, n]
        cs = torch.from_numpy(qt.col_scale.astype(np.float32)).to(dev)  # [P, G]
        self.mu = None if qt.mu is None else torch.from_numpy(qt.mu.astype(np.float32)).to(dev)  # [n, nb]
        pidx = np.full((max(int(qt.planes.max(initial=0)), 1), self.nb), -1)
        for k, (blocks, sl) in enumerate(qt.order_slices()):
            pidx[k, blocks] = np.arange(sl.start, sl.stop)
        self.groups = []  # (K, blocks long [b], plane indices [K, b], amplitudes [K, n, b, G], sign combos [2^K, K])
        step = torch.zeros(n, self.nb, self.G, device=dev)
        for K in sorted(set(int(k) for k in qt.planes) - {0}):
            blocks = np.nonzero(qt.planes == K)[0]
            P = torch.from_numpy(pidx[:K, blocks]).to(dev)
            A = rs[P].permute(0, 2, 1)[..., None] * cs[P][:, None]  # [K, n, b, G] = rs * cs, as dequantize forms it
            S = torch.tensor(list(itertools.product((1.0, -1.0), repeat=K)), device=dev)
            self.groups.append((K, torch.from_numpy(blocks).to(dev), P, A, S))
            step[:, blocks] = 2.0 * A.abs().amin(0)
        self.start, self.step = w_hat.detach().to(torch.float32), step.view(n, n_in)
        self.signs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def nearest(self, X: torch.Tensor, record: bool = False) -> torch.Tensor:
        n = X.shape[0]
        Xv = X.reshape(n, self.nb, self.G)
        out = torch.zeros_like(Xv) if self.mu is None else self.mu[..., None].expand_as(Xv).clone()
        chosen = []
        for K, blocks, P, A, S in self.groups:
            levels = torch.einsum("sk,knbg->snbg", S, A)  # [2^K, n, b, G] offsets from mu
            x = Xv[:, blocks] - out[:, blocks]
            v, err = levels[0], (levels[0] - x).abs()
            best = torch.zeros(v.shape, dtype=torch.long, device=v.device) if record else None
            for j in range(1, len(S)):  # a running minimum: far faster than argmin over dim 0 on a CPU
                e = (levels[j] - x).abs_()
                closer = e < err  # ties keep the first combination, as argmin does
                v, err = torch.where(closer, levels[j], v), torch.minimum(e, err)
                if record:
                    best = torch.where(closer, j, best)
            out[:, blocks] += v
            if record:
                chosen.append((P, S[best]))  # signs [n, b, G, K]
        if record:
            self.signs = chosen
        return out.view(n, -1)

    def commit(self, X: torch.Tensor) -> Any:
        from dataclasses import replace

        from formats.qtensor import pack_signs

        self.nearest(X, record=True)
        signs = self.qt.signs.copy()
        for P, sg in self.signs:  # P [K, b] plane index of order k of block b; sg [n, b, G, K]
            bits = pack_signs(sg.permute(3, 1, 0, 2).cpu().numpy())  # [K, b, n, G // 8]
            signs[P.cpu().numpy().reshape(-1)] = bits.reshape(-1, *bits.shape[2:])
        return replace(self.qt, signs=signs)
