"""What every target promises the streaming pipeline (``qdllm_export.pipeline``), and the grid target.

A target answers three questions for each transformer block:

* ``needs_data``: whether calibration activations change its result (RTN's never do, so the
  pipeline skips calibration for it);
* ``plan_block(i, weights, Hs)``: per-linear choices made once per transformer block from the float
  block's statistics (Quant-dLLM's ABMP planes, pooled over the block's linears); ``plan_needs_hessians``
  says whether it reads ``Hs`` of every linear (else the pipeline passes those of the first group only);
* ``quantize(name, W, H, plan)``: one linear -> ``(stored tensor, W_hat float32 torch, stats)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from qdllm_export.grids import Grid, GridConfig, grid_quantize
from qdllm_export.grids.base import states_rows
from qdllm_export.quant import error_stats
from qdllm_export.timing import phase


class Target(Protocol):
    needs_data: bool
    plan_needs_hessians: bool

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        ...

    def quantize(self, name: str, W: torch.Tensor, H: torch.Tensor | None, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        ...

    def record(self) -> dict[str, Any]:
        ...


@dataclass
class GridTarget:
    """A runtime grid per linear: ``grid_of(name, n_in) -> Grid`` (a fixed type, a fallback for widths the
    type's block does not divide, or a per-tensor mix chosen beforehand), fitted by ``grid_quantize``."""

    grid_of: Callable[[str, int], Grid]
    cfg: GridConfig
    kind: str  # "ggml" | "nbits"
    describe: dict[str, Any] = field(default_factory=dict)  # e.g. {"outtype": "q2_k"} or the auto plan
    tune: bool = False  # offer each fit as a quant.recon.Tunable (stats["tunable"]) for block-output tuning

    @property
    def needs_data(self) -> bool:
        return self.cfg.rounding != "rtn"

    plan_needs_hessians = False  # plan_block reads no statistics: the pipeline computes each group's H once

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        return {r: None for r in weights}

    def quantize(self, name: str, W: torch.Tensor, H: torch.Tensor | None, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        t0 = time.perf_counter()
        grid = self.grid_of(name, int(W.shape[1]))
        res = grid_quantize(W, H, grid, self.cfg, name=name, keep_targets=self.tune)
        with phase("stats"):
            stats = error_stats(W.detach().to(torch.float32), res.w_hat, H)
        stats.update(method=f"grid-{self.cfg.rounding}", grid=grid.name, bits_per_weight=res.stored.bits_per_weight(),
                     seconds=time.perf_counter() - t0)
        offer_tunable(stats, self.tune, grid, res.states, res.targets, name)
        return res.stored, res.w_hat, stats

    def quantize_stacked(self, names: list[str], Ws: list[torch.Tensor], H: torch.Tensor | None
                         ) -> list[tuple[Any, torch.Tensor, dict[str, Any]]] | None:
        """Linears that read the same input and get the same grid, fitted as one matrix of their stacked
        rows (a grid's rows are independent, so the result is the same; on a GPU the per-column work is
        paid once). None when their grids differ (the caller then quantizes one at a time)."""
        grids = [self.grid_of(n, int(W.shape[1])) for n, W in zip(names, Ws)]
        if len({g.name for g in grids}) != 1 or len({int(W.shape[1]) for W in Ws}) != 1:
            return None
        t0 = time.perf_counter()
        res = grid_quantize(torch.cat(Ws), H, grids[0], self.cfg, name="+".join(names), keep_targets=self.tune)
        n = res.w_hat.shape[0]
        out, a = [], 0
        for lin, W in zip(names, Ws):
            b = a + W.shape[0]
            stored, w_hat = res.stored.rows(a, b, name=lin), res.w_hat[a:b]
            with phase("stats"):
                stats = error_stats(W.detach().to(torch.float32), w_hat, H)
            stats.update(method=f"grid-{self.cfg.rounding}", grid=grids[0].name, bits_per_weight=stored.bits_per_weight(),
                         seconds=(time.perf_counter() - t0) / len(names))
            if self.tune:
                rows = torch.arange(a, b, device=w_hat.device)
                offer_tunable(stats, True, grids[0], states_rows(res.states, rows, n), res.targets[a:b], lin)
            out.append((stored, w_hat, stats))
            a = b
        return out

    def record(self) -> dict[str, Any]:
        return {"target": self.kind, "method": f"grid-{self.cfg.rounding}", "grid": self.cfg.to_dict(), **self.describe}


def offer_tunable(stats: dict[str, Any], tune: bool, grid: Grid, states: list[Any] | None, targets: torch.Tensor | None,
                  name: str) -> None:
    """``stats["tunable"]``: the fit as a ``quant.recon.GridTunable`` when tuning is on and the grid can be tuned."""
    from qdllm_export.quant.recon import GridTunable, tunable_grid

    if tune and states is not None and targets is not None and tunable_grid(grid):
        stats["tunable"] = GridTunable(grid, states, targets, name)
