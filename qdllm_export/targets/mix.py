"""Per-tensor grid choice under a bits-per-weight budget: the ``auto`` outtypes of GGUF and ONNX.

ABMP's idea (spend bits where the error costs most) at the granularity a stock runtime supports, one
type per tensor:

1. ``measure_sensitivity``: stream the float model block by block on MCS calibration windows; for each
   linear ``W`` (input statistics ``H``) and each candidate grid, fit the grid with importance
   weighting (no compensation, so it is fast) and record the output error ``tr(D H D^T)``
   (``D = W - W_hat``) and the grid's bits per weight. Rows are independent in every grid, so a linear
   taller than ``max_rows`` is measured on ``max_rows`` evenly spaced rows and the error scaled up.
2. ``allocate``: minimise the summed error subject to ``sum_i bits_i n_i <= budget * sum_i n_i``
   (``n_i`` weights of tensor ``i``) by greedy upgrades along each tensor's lower convex hull of
   (bits, error): the Lagrangian solution of the knapsack, exact at the hull's vertices.

The errors are absolute (not relative to ``tr(W H W^T)``), so a linear whose outputs are large and
whose error travels further (the residual stream) weighs more; both bundled families were used to
check this choice (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from formats.errors import QdllmError
from formats.tensors import HFTensors
from qdllm_export.calib import CalibConfig
from qdllm_export.grids import Grid, GridConfig, grid_quantize
from qdllm_export.quant.common import output_error
from qdllm_export.timing import phase

GridFactory = Callable[[int], Grid]  # n_in -> grid (with the type's fallback for widths it cannot take)


@dataclass
class Sensitivity:
    """``errors[name][candidate]`` = ``tr(D H D^T)``; ``bits[name][candidate]`` = bits per weight;
    ``sizes[name]`` = ``n_out * n_in``; ``actual[name][candidate]`` = the type the grid used (fallbacks)."""

    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    bits: dict[str, dict[str, float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    actual: dict[str, dict[str, str]] = field(default_factory=dict)

    def reachable(self) -> tuple[float, float]:
        """(lowest, highest) mean bits per weight any assignment reaches."""
        n = sum(self.sizes.values())
        lo = sum(min(self.bits[k].values()) * s for k, s in self.sizes.items()) / n
        hi = sum(max(self.bits[k].values()) * s for k, s in self.sizes.items()) / n
        return lo, hi


def measure_sensitivity(model_dir: str | Path, candidates: dict[str, GridFactory], ccfg: CalibConfig, *,
                        device: str = "cpu", batch: int = 8, on_layer: Callable[[int, int, str], None] | None = None,
                        max_rows: int = 1024) -> Sensitivity:
    """Output error of every candidate grid on every linear of the float model (see module doc)."""
    from qdllm_export.block_pass import collect_hessians, load_block, run_block
    from qdllm_export.pipeline import _calibration

    src = HFTensors(model_dir)
    hp = src.hparams
    calib = _calibration(src, Path(model_dir), ccfg, device, batch)
    sens = Sensitivity()
    cfg = GridConfig(rounding="importance", refit=True)
    for i in range(hp.n_layers):
        block = load_block(src, i, device, pass_name="sensitivity")
        linears = block.linears()
        Hs = collect_hessians(block, list(linears), calib.x, calib.cos, calib.sin, batch)
        for r, m in linears.items():
            name = f"blk.{i}.{r}.weight"
            if on_layer:
                on_layer(i, hp.n_layers, f"measuring {name}")
            sens.sizes[name] = m.weight.numel()
            W = _row_sample(m.weight.data, max_rows)
            scale = m.weight.shape[0] / W.shape[0]
            sens.errors[name], sens.bits[name], sens.actual[name] = {}, {}, {}
            for cand, make in candidates.items():
                grid = make(W.shape[1])
                with phase("sens:" + cand):
                    res = grid_quantize(W, Hs[r], grid, cfg, name=name)
                    sens.errors[name][cand] = scale * output_error(W, res.w_hat, Hs[r])[0]
                sens.bits[name][cand] = float(res.stored.bits_per_weight())
                sens.actual[name][cand] = grid.name
        del Hs
        run_block(block, calib.x, calib.cos, calib.sin, batch)
        del block
    return sens


def _row_sample(W, max_rows: int):
    """At most ``max_rows`` evenly spaced rows of ``W [n_out, n_in]``."""
    if W.shape[0] <= max_rows:
        return W
    import torch

    idx = torch.linspace(0, W.shape[0] - 1, max_rows, device=W.device).round().long()
    return W[idx]


def _hull(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Lower convex hull of (bits, error, candidate), by increasing bits, errors strictly decreasing."""
    pts = sorted(points)
    best: list[tuple[float, float, str]] = []
    for p in pts:
        if best and p[1] >= best[-1][1]:
            continue  # more bits, no less error: never chosen
        while len(best) >= 2:
            (b0, e0, _), (b1, e1, _) = best[-2], best[-1]
            if (e1 - e0) * (p[0] - b0) >= (p[1] - e0) * (b1 - b0):  # best[-1] lies on or above the chord
                best.pop()
            else:
                break
        best.append(p)
    return best


_EXPERT = re.compile(r"^(blk\.\d+\.\w+_exps)\.\d+(\.weight)$")  # formats.families' per-expert canonical names


def stacked_units(names) -> dict[str, list[str]]:
    """Unit -> tensor names: one unit per name, except a layer's experts of one role (``blk.N.ffn_up_exps.X.weight``),
    which llama.cpp stores as one 3-D tensor of one type (unit ``blk.N.ffn_up_exps.weight``)."""
    out: dict[str, list[str]] = {}
    for n in names:
        m = _EXPERT.match(n)
        out.setdefault(m.group(1) + m.group(2) if m else n, []).append(n)
    return out


def allocate(sens: Sensitivity, budget: float) -> dict[str, str]:
    """Candidate per tensor with mean bits per weight ``<= budget`` and least summed error. A layer's experts of
    one role are one unit (their errors and sizes summed; ``stacked_units``): they get one type.

    Raises ``QdllmError`` naming the reachable range when even the cheapest mix is over the budget.
    """
    units = stacked_units(sens.sizes)
    if any(len(v) > 1 for v in units.values()):
        pooled = Sensitivity(
            errors={u: {c: sum(sens.errors[n][c] for n in ns) for c in sens.errors[ns[0]]} for u, ns in units.items()},
            bits={u: dict(sens.bits[ns[0]]) for u, ns in units.items()},
            sizes={u: sum(sens.sizes[n] for n in ns) for u, ns in units.items()})
        choice = allocate(pooled, budget)
        return {n: choice[u] for u, ns in units.items() for n in ns}
    lo, hi = sens.reachable()
    if budget < lo - 1e-9:
        raise QdllmError(f"--bpw {budget:g} cannot be met: the cheapest mix of these types spends {lo:.3f} bits per "
                         f"weight on the linears (reachable: {lo:.3f} to {hi:.3f}); raise --bpw or add lower-bit types")
    hulls = {k: _hull([(sens.bits[k][c], sens.errors[k][c], c) for c in sens.bits[k]]) for k in sens.sizes}
    level = {k: 0 for k in hulls}
    total = sum(sens.sizes.values())
    spent = sum(hulls[k][0][0] * sens.sizes[k] for k in hulls)
    limit = budget * total + 1e-6 * total
    while True:
        best, best_gain = None, 0.0
        for k, h in hulls.items():
            j = level[k]
            if j + 1 >= len(h):
                continue
            extra = (h[j + 1][0] - h[j][0]) * sens.sizes[k]
            if spent + extra > limit:
                continue
            gain = (h[j][1] - h[j + 1][1]) / extra
            if gain > best_gain:
                best, best_gain = k, gain
        if best is None:
            break
        j = level[best]
        spent += (hulls[best][j + 1][0] - hulls[best][j][0]) * sens.sizes[best]
        level[best] = j + 1
    return {k: hulls[k][level[k]][2] for k in hulls}


def mean_bits(sens: Sensitivity, choice: dict[str, str]) -> float:
    """Mean bits per weight of the linears under ``choice``."""
    n = sum(sens.sizes.values())
    return sum(sens.bits[k][choice[k]] * s for k, s in sens.sizes.items()) / n


def plan_summary(sens: Sensitivity, choice: dict[str, str]) -> dict[str, object]:
    """What the record keeps of an ``auto`` plan: per-tensor type, mean bits, the count of each type."""
    counts: dict[str, int] = {}
    for c in choice.values():
        counts[c] = counts.get(c, 0) + 1
    return {"types": dict(choice), "bits_per_weight_linear_planned": mean_bits(sens, choice), "type_counts": counts}


__all__ = ["Sensitivity", "measure_sensitivity", "allocate", "mean_bits", "plan_summary"]
