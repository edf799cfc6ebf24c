"""Quantizer configuration: one dataclass shared by the CLI, the pipeline and the matrix quantizers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from formats.errors import QdllmError
from formats.qtensor import MAX_PLANES

METHODS = ("quant-dllm", "rtn", "gptq")
IMPORTANCE = ("hdiag", "obs", "schur")
OUTLIER_SCOPES = ("layer", "block")
COMPENSATIONS = ("exact", "diag")
METRICS = ("diag", "full")
ABMP_POOLS = ("block", "group", "linear")
INBLOCK = ("none", "gptq", "gptq-act")


@dataclass
class QuantConfig:
    """Settings of one quantization run. ``__post_init__`` validates (``QdllmError`` on bad values).

    Paper-given settings: ``method``, ``bits`` (the mean planes per block), ``group_size``,
    ``abmp``/``abmp_ratio``, ``data_aware`` (DOR), ``outlier_sigma`` (3-sigma rule), ``percdamp``.
    Settings the paper leaves open were chosen by measured layer output error (docs/quantizer.md):
    ``iters``, ``outlier_weight``, ``importance``, ``dor_base``, ``outlier_scope``, ``compensation``.
    """

    method: str = "quant-dllm"
    bits: float = 2.0  # quant-dllm: mean planes per block (1.5, 2, 2.5, 3 ...); rtn/gptq: integer bits
    group_size: int = 128
    abmp: bool = True
    abmp_ratio: float = 0.05
    data_aware: bool = True
    iters: int = 15
    outlier_sigma: float = 3.0
    outlier_weight: float = 0.0  # Lambda^2 = 1 + outlier_weight on 3-sigma outliers of Z (0: chosen by NLL, docs/quantizer.md)
    importance: str = "schur"  # column factor d_j of Z_ij = W_ij^2 d_j (see docs/quantizer.md)
    dor_base: bool = True  # A_ij = d_j (1 + c Pi_ij) instead of (1 + c Pi_ij)
    outlier_scope: str = "layer"  # mean/std of Z for the 3-sigma rule: whole layer or per block
    compensation: str = "exact"  # block error propagation: exact (Delta U_BB^-1) or diag (BiLLM)
    metric: str = "diag"  # DAQ scale refits: diag (weights A) or full (in-block quadratic form)
    inblock: str = "gptq-act"  # DAQ signs: none (joint elementwise re-rounding), gptq (column by column with OBS feedback), gptq-act (the same, columns by decreasing H_jj)
    abmp_pool: str = "block"  # ABMP ranks the blocks of: every linear of a transformer block | each true-sequential group | each linear
    act_order: bool = False  # GPTQ: columns by decreasing H_jj (GPTQModel desc_act; implies static groups)
    static_groups: bool = False  # GPTQ: every group's grid fixed from the weights before any update
    percdamp: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise QdllmError(f"quantization config: {msg}")

        if self.method not in METHODS:
            bad(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits):
            bad(f"bits must be a number, got {self.bits!r}")
        self.bits = float(self.bits)
        if self.method in ("rtn", "gptq"):
            if self.bits != int(self.bits) or not 1 <= self.bits <= MAX_PLANES:
                bad(f"method {self.method} needs an integer bits in 1..{MAX_PLANES}, got {self.bits:g}")
        else:
            if not 1 <= self.bits <= MAX_PLANES:
                bad(f"bits (mean binary planes per block) must be in [1, {MAX_PLANES}], got {self.bits:g}")
            if not self.abmp and self.bits != int(self.bits):
                bad(f"bits={self.bits:g} is not an integer; a fractional budget needs abmp on")
        for f in ("act_order", "static_groups"):
            if getattr(self, f) is True and self.method != "gptq":
                bad(f"{f} is an option of method gptq, not {self.method}"
                    + (" (quant-dllm already visits each block's columns by decreasing H_jj)" if f == "act_order"
                       and self.method == "quant-dllm" else ""))
        if self.inblock not in INBLOCK:
            bad(f"inblock {self.inblock!r} is not one of {', '.join(INBLOCK)}")
        if self.abmp_pool not in ABMP_POOLS:
            bad(f"abmp_pool {self.abmp_pool!r} is not one of {', '.join(ABMP_POOLS)}")
        for f in ("abmp", "data_aware", "dor_base", "act_order", "static_groups"):
            if not isinstance(getattr(self, f), bool):
                bad(f"{f} must be true or false, got {getattr(self, f)!r}")
        for f in ("group_size", "iters", "seed"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{f} must be an integer, got {v!r}")
        if self.group_size <= 0 or self.group_size % 8:
            bad(f"group_size must be a positive multiple of 8, got {self.group_size}")
        if self.iters < 0:
            bad(f"iters must be >= 0, got {self.iters}")
        for f, lo, hi in (("abmp_ratio", 0.0, 0.5), ("percdamp", 0.0, 10.0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                bad(f"{f} must be a number in [{lo}, {hi}], got {v!r}")
        for f in ("outlier_sigma", "outlier_weight"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{f} must be a finite number >= 0, got {v!r}")
        if self.outlier_sigma == 0:
            bad("outlier_sigma must be > 0")
        if self.importance not in IMPORTANCE:
            bad(f"importance {self.importance!r} is not one of {', '.join(IMPORTANCE)}")
        if self.outlier_scope not in OUTLIER_SCOPES:
            bad(f"outlier_scope {self.outlier_scope!r} is not one of {', '.join(OUTLIER_SCOPES)}")
        if self.metric not in METRICS:
            bad(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.compensation not in COMPENSATIONS:
            bad(f"compensation {self.compensation!r} is not one of {', '.join(COMPENSATIONS)}")

    @property
    def int_bits(self) -> int:
        """``bits`` as an integer (rtn/gptq, or quant-dllm with abmp off)."""
        return int(round(self.bits))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if not isinstance(d, dict):
            raise QdllmError(f"quantization config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QdllmError(f"quantization config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)
