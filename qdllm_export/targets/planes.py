"""Binary planes (``formats.qtensor.QuantizedTensor``): Quant-dLLM (MCS + DAQ + ABMP), RTN and GPTQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qdllm_export.models import sequential_groups
from qdllm_export.quant import QuantConfig, abmp_assign_pooled, block_scores, quantize_weight
from qdllm_export.targets.base import Target


@dataclass
class PlanesTarget:
    """Binary planes (``formats.qtensor.QuantizedTensor``) by Quant-dLLM, RTN or GPTQ."""

    cfg: QuantConfig
    tune: bool = False  # offer each fit as a quant.recon.PlanesTunable (stats["tunable"]) for block-output tuning

    @property
    def needs_data(self) -> bool:
        return self.cfg.method != "rtn"

    @property
    def plan_needs_hessians(self) -> bool:
        """ABMP ranks every linear's blocks by the float block's statistics."""
        return self.cfg.method == "quant-dllm" and self.cfg.abmp

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
        if self.tune:
            from qdllm_export.quant.recon import PlanesTunable

            stats["tunable"] = PlanesTunable(res.qt, res.w_hat, name)
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
    return sequential_groups(roles)


def native_uniform_bits(bits: int, group_size: int) -> float:
    """Bits per weight of a uniform code in its own packing (GPTQ/RTN as GPTQModel and AutoRound ship
    it, counted as the issue defines it): ``bits`` per code plus an fp16 scale and an fp16 zero per row
    and group."""
    return bits + 32.0 / group_size


def as_target(t: "Target | QuantConfig") -> "Target":
    """A ``QuantConfig`` means binary planes; any other target is used as it is."""
    return PlanesTarget(t) if isinstance(t, QuantConfig) else t
