"""Stock llama.cpp GGUF: a checkpoint quantized into ggml's own weight types (``gguf --outtype q2_k`` ...).

The same calibration as Quant-dLLM (MCS windows, true-sequential inside each block, ``qdllm_export.pipeline``)
drives the grid driver (``qdllm_export.grids``: importance-weighted block fits, GPTQ/OBS compensation between
ggml blocks) onto one ggml type per linear:

* a fixed type (``STOCK_TYPES``), with llama.cpp's fallback for a row length the type's block does not
  divide (``grids.registry.fallback_type``);
* ``auto``: per-tensor types under a bits-per-weight budget from measured MCS sensitivity
  (``qdllm_export.targets.mix``), chosen among ``AUTO_CANDIDATES``;
* ``imatrix``: a llama.cpp imatrix file as the (diagonal) importance instead of calibrating.

``token_embd`` and ``output`` are encoded by the pipeline (``targets.tables``, with ``tables.GridEncoder``; llama.cpp-like
defaults: ``formats.gguf_types.default_embed_types``). The result is a quantized checkpoint of ``GGMLTensor`` linears and
tables; ``formats.gguf`` writes their bytes unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from formats.errors import QdllmError
from formats.families import HParams
from formats.gguf_types import OUTTYPES, STOCK_TYPES
from formats.tensors import canonical_names, canonical_shape, is_linear
from qdllm_export.calib import CalibConfig
from qdllm_export.grids import GridConfig
from qdllm_export.grids.base import ROUNDINGS
from qdllm_export.grids.registry import fallback_type, grid_for

# candidates of --outtype auto, by bits per weight: iq2_xs 2.31, iq2_s 2.56, q2_k 2.63, q3_k / iq3_s 3.44,
# q4_k 4.5, q5_k 5.5, q6_k 6.56, q8_0 8.5
AUTO_CANDIDATES = ("iq2_xs", "iq2_s", "q2_k", "q3_k", "iq3_s", "q4_k", "q5_k", "q6_k", "q8_0")


@dataclass
class StockSpec:
    """What ``gguf`` produces for a stock outtype: ``outtype`` (a ``STOCK_TYPES`` key or ``auto``), ``bpw``
    (auto's budget: mean stored bits per weight of the block linears), ``rounding`` (gptq | importance |
    rtn, the ablation), ``true_sequential``, ``imatrix`` (a llama.cpp imatrix file used as the importance
    instead of calibrating)."""

    outtype: str
    bpw: float | None = None
    rounding: str = "gptq"
    true_sequential: bool = True
    imatrix: str | None = None

    def __post_init__(self) -> None:
        if self.outtype not in STOCK_TYPES and self.outtype != "auto":
            raise QdllmError(f"--outtype {self.outtype!r} is not a stock type; supported: {', '.join(OUTTYPES)}")
        if self.outtype == "auto" and self.bpw is None:
            raise QdllmError("--outtype auto needs a budget: --bpw B (mean bits per weight of the linears, e.g. 2.5)")
        if self.outtype != "auto" and self.bpw is not None:
            raise QdllmError(f"--bpw is the budget of --outtype auto; --outtype {self.outtype} has a fixed size")
        if self.rounding not in ROUNDINGS:
            raise QdllmError(f"--rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if self.imatrix and self.outtype == "auto":
            raise QdllmError("--imatrix sets the importance of a fixed type; --outtype auto calibrates to measure "
                             "sensitivity (drop --imatrix, or give a type such as --outtype q2_k)")
        if self.imatrix and self.rounding == "rtn":
            raise QdllmError("--imatrix and --rounding rtn exclude each other (rtn uses no importance)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_widths(hp: HParams) -> dict[str, tuple[int, int]]:
    """llama.cpp name -> (n_out, n_in) of every block linear."""
    return {n: canonical_shape(hp, n) for n in canonical_names(hp) if is_linear(hp, n)}


def type_bits(name: str, n_in: int) -> float:
    """Stored bits per weight of type ``name`` (after its fallback) on rows of ``n_in``."""
    return grid_for(name, n_in).bits_per_weight(n_in)


def reachable(hp: HParams, candidates: tuple[str, ...] = AUTO_CANDIDATES) -> tuple[float, float]:
    """(lowest, highest) mean bits per weight over the linears that a mix of ``candidates`` can reach."""
    shapes = linear_widths(hp).values()
    total = sum(o * i for o, i in shapes)
    bits = [[type_bits(c, i) for c in candidates] for _, i in shapes]
    lo = sum(min(b) * o * i for b, (o, i) in zip(bits, shapes)) / total
    hi = sum(max(b) * o * i for b, (o, i) in zip(bits, shapes)) / total
    return lo, hi


def check_budget(hp: HParams, bpw: float) -> None:
    """Refuse a budget no mix of ``AUTO_CANDIDATES`` meets, naming the nearest reachable one."""
    lo, hi = reachable(hp)
    up, down = math.ceil(lo * 1000) / 1000, math.floor(hi * 1000) / 1000  # printed budgets that are reachable
    if bpw < lo - 1e-9:
        raise QdllmError(f"--bpw {bpw:g} cannot be met: the cheapest mix ({AUTO_CANDIDATES[0]} everywhere) spends "
                         f"{lo:.4f} bits per weight on these linears; the nearest reachable budget is --bpw {up:.3f}")
    if bpw > hi + 1e-9:
        raise QdllmError(f"--bpw {bpw:g} is more than the largest mix spends ({AUTO_CANDIDATES[-1]} everywhere, "
                         f"{hi:.4f} bits per weight); the nearest reachable budget is --bpw {down:.3f} (or use --outtype f16)")


def fallbacks(hp: HParams, outtype: str) -> dict[str, str]:
    """Linears that cannot take ``outtype`` -> the type they get instead (llama-quantize's rule)."""
    out = {}
    for n, (_, n_in) in linear_widths(hp).items():
        t = fallback_type(outtype, n_in)
        if t != outtype:
            out[n] = t
    return out


def _fixed(outtype: str, name: str, n_in: int):
    return grid_for(outtype, n_in)


def _chosen(choice: dict[str, str], name: str, n_in: int):
    return grid_for(choice[name], n_in)


class StockGridTarget:
    """``targets.GridTarget`` whose ``gptq`` rounding fits each linear twice, with and without the grid's
    closed-form refit after rounding, and keeps the fit with the lower output error ``tr(dW H dW^T)``.

    Measured on tiny-llada, q2_k: the refit (a diagonal-importance least-squares fit of the scales to the
    GPTQ-updated columns) doubled the output error of most attention linears and cost +0.09 nats/token of
    NLL; on q3_k it helped (docs/benchmarks.md, llama.cpp section). Choosing per linear by the objective the
    driver minimises keeps the better of the two whatever the type."""

    def __init__(self, base: Any):
        self.base = base
        self.cfg, self.kind, self.describe, self.grid_of = base.cfg, base.kind, base.describe, base.grid_of

    @property
    def needs_data(self) -> bool:
        return self.base.needs_data

    @property
    def plan_needs_hessians(self) -> bool:
        return self.base.plan_needs_hessians

    @property
    def tune(self) -> bool:
        return self.base.tune

    @tune.setter
    def tune(self, on: bool) -> None:
        self.base.tune = on

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: Any) -> dict[str, Any]:
        return self.base.plan_block(i, weights, Hs)

    def quantize(self, name: str, W: torch.Tensor, H: Any, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        if H is None or self.cfg.rounding != "gptq" or not self.cfg.refit:
            return self.base.quantize(name, W, H, plan)
        return self._both([name], [W], H, self.grid_of(name, int(W.shape[1])))[0]

    def quantize_stacked(self, names: list[str], Ws: list[torch.Tensor], H: Any
                         ) -> list[tuple[Any, torch.Tensor, dict[str, Any]]] | None:
        """Linears of one input and one grid (q/k/v, gate/up) fitted together, both variants of each in
        one walk over the columns; None when their grids differ (the pipeline then quantizes one at a time)."""
        if H is None or self.cfg.rounding != "gptq" or not self.cfg.refit:
            return self.base.quantize_stacked(names, Ws, H)
        grids = [self.grid_of(n, int(W.shape[1])) for n, W in zip(names, Ws)]
        if len({g.name for g in grids}) != 1 or len({int(W.shape[1]) for W in Ws}) != 1:
            return None
        return self._both(names, Ws, H, grids[0])

    def _both(self, names: list[str], Ws: list[torch.Tensor], H: torch.Tensor, grid: Any
              ) -> list[tuple[Any, torch.Tensor, dict[str, Any]]]:
        """The rows of ``Ws`` stacked twice, fitted with (first copy) and without (second) the refit
        (``grid_quantize(refit_rows=...)``: rows are independent, so each copy is what its own fit gives);
        per linear the variant of lower output error, the refitted one on ties."""
        import time

        from qdllm_export.grids.base import grid_quantize, pack_rows, states_rows
        from qdllm_export.quant import error_stats
        from qdllm_export.targets.base import offer_tunable

        t0 = time.perf_counter()
        Wc = torch.cat([W.detach().to(torch.float32) for W in Ws])
        n = Wc.shape[0]
        rows = torch.arange(2 * n, device=Wc.device) < n
        res = grid_quantize(torch.cat([Wc, Wc]), H, grid, self.cfg, name="+".join(names), refit_rows=rows, pack=False,
                            keep_targets=self.tune)
        out, a = [], 0
        for name, W in zip(names, Ws):
            b = a + W.shape[0]
            fits = []
            for off in (0, n):  # the refitted rows, then the others
                stats = error_stats(W.detach().to(torch.float32), res.w_hat[off + a : off + b], H)
                stats.update(method=f"grid-{self.cfg.rounding}", grid=grid.name)
                fits.append((off, stats))
            off, stats = min(fits, key=lambda r: r[1]["rel_output_err"])  # the refitted one on ties
            kept = torch.arange(off + a, off + b)
            stored = pack_rows(grid, res.states, kept, (2 * n, Wc.shape[1]), name)
            stats.update(bits_per_weight=stored.bits_per_weight(), refit=off == 0,
                         seconds=(time.perf_counter() - t0) / len(names))
            if self.tune:
                offer_tunable(stats, True, grid, states_rows(res.states, kept, 2 * n), res.targets[off + a : off + b], name)
            out.append((stored, res.w_hat[off + a : off + b], stats))
            a = b
        return out

    def record(self) -> dict[str, Any]:
        return {**self.base.record(), "refit_choice": "per linear, lower output error"}


@dataclass
class ImatrixTarget:
    """A grid target whose importance is a llama.cpp imatrix (``diag(in_sum2 / counts)`` as ``H``) instead of
    calibration: importance-weighted fits, no compensation (an imatrix has no off-diagonal statistics)."""

    base: Any  # GridTarget
    importance: dict[str, np.ndarray]
    source: str
    needs_data: bool = False

    def plan_block(self, i: int, weights: dict[str, torch.Tensor], Hs: Any) -> dict[str, Any]:
        return self.base.plan_block(i, weights, Hs)

    def quantize(self, name: str, W: torch.Tensor, H: Any, plan: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        H = torch.diag(torch.from_numpy(self.importance[name]).to(device=W.device, dtype=torch.float32))
        return self.base.quantize(name, W, H, plan)

    def record(self) -> dict[str, Any]:
        return {**self.base.record(), "importance_from": "imatrix", "imatrix": self.source}


def auto_candidates(tuned: bool) -> tuple[str, ...]:
    """The types ``auto`` chooses among: with block-output tuning on, only those whose codes it can move
    (``quant.recon.tunable_grid``; libggml's iq2_s / iq3_s would ship untuned, and the sensitivities are of
    untuned fits: on both bundled families the tunable-only mix had the lower ΔNLL, docs/benchmarks.md "recon")."""
    from qdllm_export.quant.recon import tunable_grid

    return tuple(c for c in AUTO_CANDIDATES if not tuned or tunable_grid(grid_for(c, 256)))


def auto_sensitivity(model_dir: str | Path, ccfg: CalibConfig, *, device: str = "cpu",
                     on_layer: Callable[[int, int, str], None] | None = None, tuned: bool = False) -> Any:
    """Output error and bits of every ``auto_candidates(tuned)`` type on every linear (``qdllm_export.targets.mix``)."""
    from qdllm_export.targets.mix import measure_sensitivity

    cands = {c: partial(grid_for, c) for c in auto_candidates(tuned)}
    return measure_sensitivity(model_dir, cands, ccfg, device=device, on_layer=on_layer)


def stock_target(model_dir: str | Path, spec: StockSpec, ccfg: CalibConfig, *, device: str = "cpu",
                 on_layer: Callable[[int, int, str], None] | None = None, sensitivity: Any = None,
                 tuned: bool = False) -> Any:
    """The pipeline target of ``spec``; for ``auto`` this measures every candidate's error first (unless
    ``sensitivity``, from :func:`auto_sensitivity` on the same model and calibration, is given); ``tuned``:
    block-output tuning will follow the fits (``auto`` then mixes only the types it can tune)."""
    from formats.families import read_config
    from qdllm_export.targets.base import GridTarget

    _, hp, _ = read_config(Path(model_dir))
    describe: dict[str, Any] = {"outtype": spec.outtype, "true_sequential": spec.true_sequential}
    if spec.outtype == "auto":
        from qdllm_export.targets.mix import allocate, plan_summary

        check_budget(hp, spec.bpw)
        sens = sensitivity or auto_sensitivity(model_dir, ccfg, device=device, on_layer=on_layer, tuned=tuned)
        choice = allocate(sens, spec.bpw)
        grid_of: Callable = partial(_chosen, choice)
        describe.update(bpw=spec.bpw, **plan_summary(sens, choice))
    else:
        grid_of = partial(_fixed, spec.outtype)
        describe["fallbacks"] = fallbacks(hp, spec.outtype)
    rounding = "importance" if spec.imatrix else spec.rounding
    target: Any = StockGridTarget(GridTarget(grid_of, GridConfig(rounding=rounding), kind="ggml", describe=describe))
    if spec.imatrix:
        from formats.imatrix import check_imatrix, model_fingerprint, read_imatrix
        from formats.tensors import HFTensors
        from qdllm_export.imatrix import canonical_importance, model_widths

        im = read_imatrix(spec.imatrix)
        check_imatrix(im, model_widths(model_dir), f"--imatrix {spec.imatrix}", str(model_dir), optional=("output.weight",),
                      fingerprint=model_fingerprint(HFTensors(model_dir)))
        target = ImatrixTarget(target, canonical_importance(im, model_dir), str(spec.imatrix))
    return target


def quantize_stock(model_dir: str | Path, out_dir: str | Path, spec: StockSpec, ccfg: CalibConfig, *,
                   device: str = "cpu", force: bool = False, on_layer: Callable[[int, int, str], None] | None = None,
                   sensitivity: Any = None, tables: Any = None, **tuning: Any):
    """Quantize the block linears of a float checkpoint into ggml types (a quantized checkpoint of
    ``GGMLTensor`` linears at ``out_dir``; embedding and head in ``tables``, a ``targets.tables.TablesSpec``,
    default Q4_K / Q6_K; ``tuning``: ``recon`` / ``equalize`` of ``pipeline.quantize_checkpoint``); returns
    ``(PipelineResult, record)``."""
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant.recon import ReconConfig

    recon = tuning.get("recon") or ReconConfig()  # quantize_checkpoint's default
    tuned = recon.on and spec.rounding != "rtn" and not spec.imatrix
    target = stock_target(model_dir, spec, ccfg, device=device, on_layer=on_layer, sensitivity=sensitivity, tuned=tuned)
    return quantize_checkpoint(model_dir, out_dir, target, ccfg, tables=tables, device=device, force=force,
                               true_sequential=spec.true_sequential, on_layer=on_layer, **tuning)
