"""What the pipeline turns each linear into: binary planes (Quant-dLLM, RTN, GPTQ) or a runtime grid.

A target answers three questions for the streaming pipeline (``qdllm_export.pipeline``):

* ``needs_data``: whether calibration activations change its result (RTN's never do, so the
  pipeline skips calibration for it);
* ``plan_block(i, weights, Hs)``: per-linear choices made once per transformer block from the float
  block's statistics (Quant-dLLM's ABMP planes, pooled over the block's linears);
* ``quantize(name, W, H, plan)``: one linear -> ``(stored tensor, W_hat float32 torch, stats)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from qdllm_export.grids import Grid, GridConfig, grid_quantize
from qdllm_export.quant import QuantConfig, abmp_assign_pooled, block_scores, error_stats, quantize_weight


class Target(Protocol):
    needs_data: bool

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        ...

    def quantize(self, name: str, W: torch.Tensor, H: torch.Tensor | None, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        ...

    def record(self) -> dict[str, Any]:
        ...


@dataclass
class PlanesTarget:
    """Binary planes (``formats.qtensor.QuantizedTensor``) by Quant-dLLM, RTN or GPTQ."""

    cfg: QuantConfig

    @property
    def needs_data(self) -> bool:
        return self.cfg.method != "rtn"

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        roles = list(weights)
        if self.cfg.method != "quant-dllm" or not self.cfg.abmp:
            return {r: None for r in roles}
        scores = {r: block_scores(weights[r], None if Hs is None else Hs[r], self.cfg, name=f"blk.{i}.{r}.weight") for r in roles}
        plan: dict[str, Any] = {}
        for pool in abmp_pools(roles, self.cfg.abmp_pool):
            planes = abmp_assign_pooled([scores[r] for r in pool], self.cfg.bits, self.cfg.abmp_ratio, what=f"block {i} {'/'.join(pool)}")
            plan.update(zip(pool, planes))
        return plan

    def quantize(self, name: str, W: torch.Tensor, H: torch.Tensor | None, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        res = quantize_weight(W, H, self.cfg, planes=plan, name=name)
        stats = dict(res.stats)
        if self.cfg.method in ("rtn", "gptq"):
            stats["bits_per_weight_native"] = native_uniform_bits(self.cfg.int_bits, self.cfg.group_size)
        return res.qt, res.w_hat, stats

    def record(self) -> dict[str, Any]:
        return {"target": "planes", "method": self.cfg.method, "bits": self.cfg.bits, "group_size": self.cfg.group_size,
                "options": self.cfg.to_dict()}


def abmp_pools(roles: list[str], pool: str) -> list[list[str]]:
    """The linears ABMP ranks together: all of the block, each true-sequential group, or each linear."""
    if pool == "block":
        return [roles]
    if pool == "linear":
        return [[r] for r in roles]
    from qdllm_export.pipeline import sequential_groups

    return sequential_groups(roles)


def native_uniform_bits(bits: int, group_size: int) -> float:
    """Bits per weight of a uniform code in its own packing (GPTQ/RTN as GPTQModel and AutoRound ship
    it, counted as the issue defines it): ``bits`` per code plus an fp16 scale and an fp16 zero per row
    and group."""
    return bits + 32.0 / group_size


@dataclass
class GridTarget:
    """A runtime grid per linear: ``grid_of(name, n_in) -> Grid`` (a fixed type, a fallback for widths the
    type's block does not divide, or a per-tensor mix chosen beforehand), fitted by ``grid_quantize``."""

    grid_of: Callable[[str, int], Grid]
    cfg: GridConfig
    kind: str  # "ggml" | "nbits"
    describe: dict[str, Any] = field(default_factory=dict)  # e.g. {"outtype": "q2_k"} or the auto plan

    @property
    def needs_data(self) -> bool:
        return self.cfg.rounding != "rtn"

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        return {r: None for r in weights}

    def quantize(self, name: str, W: torch.Tensor, H: torch.Tensor | None, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        t0 = time.perf_counter()
        grid = self.grid_of(name, int(W.shape[1]))
        res = grid_quantize(W, H, grid, self.cfg, name=name)
        stats = error_stats(W.detach().to(torch.float32), res.w_hat, H)
        stats.update(method=f"grid-{self.cfg.rounding}", grid=grid.name, bits_per_weight=res.stored.bits_per_weight(),
                     seconds=time.perf_counter() - t0)
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
        res = grid_quantize(torch.cat(Ws), H, grids[0], self.cfg, name="+".join(names))
        out, a = [], 0
        for n, W in zip(names, Ws):
            b = a + W.shape[0]
            stored, w_hat = res.stored.rows(a, b, name=n), res.w_hat[a:b]
            stats = error_stats(W.detach().to(torch.float32), w_hat, H)
            stats.update(method=f"grid-{self.cfg.rounding}", grid=grids[0].name, bits_per_weight=stored.bits_per_weight(),
                         seconds=(time.perf_counter() - t0) / len(names))
            out.append((stored, w_hat, stats))
            a = b
        return out

    def record(self) -> dict[str, Any]:
        return {"target": self.kind, "method": f"grid-{self.cfg.rounding}", "grid": self.cfg.to_dict(), **self.describe}


def as_target(t: "Target | QuantConfig") -> "Target":
    return PlanesTarget(t) if isinstance(t, QuantConfig) else t

