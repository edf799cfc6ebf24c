"""A checkpoint onto onnxruntime's MatMulNBits grid: the ``int2 | int4 | int8 | auto`` outtypes of ``onnx``.

``quantize_nbits(folder, out_dir, spec, ccfg)`` runs the streaming pipeline (``qdllm_export.pipeline``:
MCS calibration, true-sequential ``H``) with a MatMulNBits ``GridTarget``: each linear fitted by the grid
driver (``grids.base.grid_quantize``: importance-weighted fit of scale and zero point per block, GPTQ
rounding with compensation between blocks, closed-form refit; ``rounding="rtn"``: no data). ``auto``
first measures every linear's output error at 2, 4 and 8 bits and picks one per tensor under the
``bpw`` budget (``qdllm_export.targets.mix``). The quantized checkpoint it writes holds ``NBitsTensor``\\ s
(``formats.nbits``), which ``formats.onnx.write_onnx`` stores as MatMulNBits nodes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from formats.errors import QdllmError
from formats.families import HParams
from formats.nbits import stored_bits_per_weight
from formats.tensors import HFTensors, canonical_names, canonical_shape, is_linear
from qdllm_export.calib import CalibConfig

OUTTYPES = {"int2": (2,), "int4": (4,), "int8": (8,), "auto": (2, 4, 8)}  # outtype -> candidate bits
BLOCK_SIZES = (32, 64, 128)  # what the CLI offers (MatMulNBits takes any power of two >= 16)
ROUNDINGS = ("gptq", "rtn")  # grids.base.GridConfig roundings offered: calibrated, or no data

OnLayer = Callable[[int, int, str], None]


@dataclass
class NBitsSpec:
    """What to produce: ``outtype`` (int2 | int4 | int8 | auto), ``bpw`` (auto's budget: stored bits per
    weight of the linears, scales and zero points included), ``block_size`` (columns per scale),
    ``rounding`` (gptq: calibrated; rtn: no data)."""

    outtype: str = "int4"
    bpw: float | None = None
    block_size: int = 128
    rounding: str = "gptq"

    def __post_init__(self) -> None:
        if self.outtype not in OUTTYPES:
            raise QdllmError(f"--outtype {self.outtype!r} is not one of {', '.join(OUTTYPES)}")
        if self.block_size not in BLOCK_SIZES:
            raise QdllmError(f"--block-size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.outtype == "auto" and self.bpw is None:
            raise QdllmError("--outtype auto needs a budget: --bpw B (stored bits per weight of the linears, e.g. 2.5)")
        if self.outtype != "auto" and self.bpw is not None:
            raise QdllmError(f"--bpw is the budget of --outtype auto; --outtype {self.outtype} has a fixed size")
        if self.rounding not in ROUNDINGS:
            raise QdllmError(f"rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}")

    @property
    def bits(self) -> tuple[int, ...]:
        return OUTTYPES[self.outtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_block_size(hp: HParams, block_size: int, where: str | Path) -> None:
    """Every linear's input width must be a multiple of ``block_size``; the error names the first
    tensor that is not and the block sizes that fit every linear."""
    widths = {name: canonical_shape(hp, name)[1] for name in canonical_names(hp) if is_linear(hp, name)}
    bad = next((n for n, w in widths.items() if w % block_size), None)
    if bad is None:
        return
    fit = [b for b in BLOCK_SIZES if all(w % b == 0 for w in widths.values())]
    hint = f"block sizes that fit every linear: {', '.join(map(str, fit))}" if fit else \
        f"no offered block size ({', '.join(map(str, BLOCK_SIZES))}) fits every linear; export with --outtype f16"
    raise QdllmError(f"{where}: tensor {bad} has n_in={widths[bad]}, not a multiple of --block-size {block_size}; {hint}")


def budget_range(hp: HParams, bits: tuple[int, ...], block_size: int) -> tuple[float, float]:
    """(lowest, highest) stored bits per weight of the linears over mixes of ``bits`` at ``block_size``."""
    shapes = [canonical_shape(hp, n) for n in canonical_names(hp) if is_linear(hp, n)]
    total = sum(o * i for o, i in shapes)
    lo, hi = (sum(o * i * stored_bits_per_weight(i, b, block_size) for o, i in shapes) / total
              for b in (min(bits), max(bits)))
    return lo, hi


def check_budget(hp: HParams, spec: NBitsSpec, where: str | Path) -> None:
    """``auto``: refuse a ``bpw`` outside what mixes of the candidate bits can reach at ``spec.block_size``,
    before any work, naming the nearest reachable budget (and a larger offered block size that would meet it)."""
    if spec.outtype != "auto":
        return
    lo, hi = budget_range(hp, spec.bits, spec.block_size)
    span = f"int{min(spec.bits)} everywhere {lo:.3f} to int{max(spec.bits)} everywhere {hi:.3f}"
    if spec.bpw < lo - 1e-9:
        fits = [b for b in BLOCK_SIZES if b > spec.block_size and budget_range(hp, spec.bits, b)[0] <= spec.bpw + 1e-9]
        alt = f", or keep it with --block-size {fits[0]}" if fits else ""
        raise QdllmError(f"{where}: --bpw {spec.bpw:g} cannot be met at --block-size {spec.block_size} (reachable: {span}); "
                         f"the nearest reachable budget is --bpw {math.ceil(lo * 1000) / 1000:.3f}{alt}")
    if spec.bpw > hi + 1e-9:
        raise QdllmError(f"{where}: --bpw {spec.bpw:g} is more than the largest mix spends at --block-size {spec.block_size} "
                         f"(reachable: {span}); the nearest reachable budget is --bpw {math.floor(hi * 1000) / 1000:.3f} "
                         "(or use --outtype f16)")


def nbits_target(folder: str | Path, spec: NBitsSpec, ccfg: CalibConfig, *, device: str = "cpu",
                 on_layer: OnLayer | None = None) -> Any:
    """The pipeline target (``targets.GridTarget``) of ``spec``; for ``auto`` this measures the
    sensitivities and fixes the plan."""
    from qdllm_export.grids.base import GridConfig
    from qdllm_export.grids.nbits import NBitsGrid
    from qdllm_export.targets.base import GridTarget

    grids = {f"int{b}": NBitsGrid(b, spec.block_size) for b in spec.bits}
    describe: dict[str, Any] = {"outtype": spec.outtype, "block_size": spec.block_size}
    if spec.outtype == "auto":
        from qdllm_export.targets.mix import allocate, measure_sensitivity, plan_summary

        sens = measure_sensitivity(folder, {k: (lambda n_in, g=g: g) for k, g in grids.items()}, ccfg, device=device,
                                   on_layer=on_layer)
        choice = allocate(sens, float(spec.bpw))
        describe.update(bpw=float(spec.bpw), plan=plan_summary(sens, choice))
        return GridTarget(lambda name, n_in: grids[choice[name]], GridConfig(rounding=spec.rounding), "nbits", describe)
    grid = grids[spec.outtype]
    return GridTarget(lambda name, n_in: grid, GridConfig(rounding=spec.rounding), "nbits", describe)


def quantize_nbits(folder: str | Path, out_dir: str | Path, spec: NBitsSpec, ccfg: CalibConfig, *, device: str = "cpu",
                   force: bool = False, on_layer: OnLayer | None = None, tables: Any = None,
                   **tuning: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint at ``folder`` quantized to MatMulNBits linears into a quantized checkpoint at
    ``out_dir`` (embedding and head in ``tables``, a ``targets.tables.TablesSpec``; ``tuning``: ``recon`` /
    ``equalize`` of ``pipeline.quantize_checkpoint``); returns the pipeline's
    ``(PipelineResult, record)``. Nothing is left at ``out_dir`` on failure."""
    from qdllm_export.pipeline import quantize_checkpoint

    hp = HFTensors(folder).hparams
    check_block_size(hp, spec.block_size, folder)
    check_budget(hp, spec, folder)
    target = nbits_target(folder, spec, ccfg, device=device, on_layer=on_layer)
    return quantize_checkpoint(folder, out_dir, target, ccfg, tables=tables, device=device, force=force,
                               on_layer=on_layer, **tuning)


__all__ = ["NBitsSpec", "OUTTYPES", "BLOCK_SIZES", "check_block_size", "check_budget", "nbits_target", "quantize_nbits"]
