"""What the export verbs (``gguf``, ``onnx``) share: turning MODEL into tensors to write, and the closing table."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.table import Table

from formats.checkpoint import QuantizedCheckpoint, is_quantized_checkpoint
from formats.errors import QdllmError
from formats.tensors import HFTensors, TensorSource
from formats.tokenizer import load_tokenizer
from qdllm_export.backends import resolve
from qdllm_export.cli import checks
from qdllm_export.cli.app import console
from qdllm_export.cli.quantize import EQUALIZE_HELP, TUNE_HELP, run_quantize

OUTTYPES = ("quantized", "f32", "f16")


@contextmanager
def export_source(model: str, out: Path, outtype: str, force: bool, q: dict[str, Any],
                  tables: Any = None) -> Iterator[tuple[TensorSource, Any, dict]]:
    """Yields (tensors, tokenizer, qdllm metadata) for MODEL.

    A quantized checkpoint is written as it is; a plain checkpoint is quantized first (into a temporary
    folder beside ``out``, removed afterwards; embedding and head in ``tables``, a
    ``targets.tables.TablesSpec``) unless ``outtype`` is f32/f16, which writes floats.
    """
    if outtype not in OUTTYPES:
        raise QdllmError(f"--outtype must be one of {', '.join(OUTTYPES)}")
    folder = resolve(model)
    if not folder.is_dir():
        raise QdllmError(f"{folder}: expected a checkpoint folder (Hugging Face or quantized) or a bundled model name")
    checks.output_file(out, force, [folder, q.get("calib")])
    tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    if is_quantized_checkpoint(folder) or outtype != "quantized":
        why = "for a quantized checkpoint (it is written as stored)" if is_quantized_checkpoint(folder) else \
            f"with --outtype {outtype} (floats are written unquantized)"
        checks.unused_with(quant_options_given(q), why)
        src: TensorSource = QuantizedCheckpoint(folder) if is_quantized_checkpoint(folder) else HFTensors(folder)
        meta = _meta(src)
        yield src, tok, meta
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        run_quantize(model, tmp / "q", force=True, tables=tables, **q)
        src = QuantizedCheckpoint(tmp / "q")
        yield src, tok, _meta(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _meta(src: TensorSource) -> dict[str, Any]:
    """The ``qdllm.*`` metadata of a file written from ``src``: method, budget and bits of its record."""
    rec = getattr(src, "record", None)
    if not rec:
        return {"method": "none"}
    keys = ("target", "method", "bits", "group_size", "outtype", "bpw", "bits_per_weight_linear")
    return {k: rec[k] for k in keys if isinstance(rec.get(k), (int, float, str)) and not isinstance(rec.get(k), bool)}


def closing_table(info: dict[str, Any], seconds: float) -> Table:
    t = Table("tensors", "params", "bits/w quantized linears", "bits/w whole file", "size", "time")
    q = info.get("bits_per_weight_linear")
    t.add_row(str(info.get("n_tensors_file", len(info.get("tensors", [])))), f"{info['n_params']:,}",
              "-" if q is None else f"{q:.3f}", f"{info['bits_per_weight']:.3f}", f"{info['size_bytes'] / 2**20:.2f} MiB",
              f"{seconds:.1f} s")
    return t


def print_closing(info: dict[str, Any], seconds: float) -> None:
    """``wrote PATH`` (never wrapped inside the path) and the closing table."""
    console.print(f"wrote {info['path']}", soft_wrap=True)
    console.print(closing_table(info, seconds))


# The quantization options every export verb takes (same names and defaults as ``quantize``).
def quant_options(
    method: str = typer.Option("quant-dllm", help="quant-dllm | gptq | rtn (used when MODEL is a plain checkpoint)."),
    bits: float = typer.Option(2.0, callback=checks.finite, help="Budget: mean binary planes per block (quant-dllm) or integer bits (rtn/gptq)."),
    group_size: int = typer.Option(128, min=8, help="Columns per block (a multiple of 8)."),
    calib: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Calibration text or JSONL (default: bundled Shakespeare train text)."),
    calib_samples: int = typer.Option(128, min=1, help="Calibration windows."),
    seq_len: int = typer.Option(256, min=2, help="Tokens per calibration window."),
    mcs: bool = typer.Option(True, "--mcs/--no-mcs", help="Masked Calibration Simulation."),
    device: str = typer.Option("cpu", callback=checks.device_option, help="cpu | cuda for quantization."),
    seed: int = typer.Option(0, min=0, help="Seed."),
    tune_iters: Optional[int] = typer.Option(None, min=0, help=TUNE_HELP),
    equalize: bool = typer.Option(False, "--equalize/--no-equalize", help=EQUALIZE_HELP),
) -> dict[str, Any]:
    return dict(method=method, bits=bits, group_size=group_size, calib=calib, calib_samples=calib_samples, seq_len=seq_len,
                mcs=mcs, prefix_ratio=0.25, abmp=True, abmp_ratio=0.05, data_aware=True, iters=15, device=device, seed=seed,
                tune_iters=tune_iters, equalize=equalize)


def quant_options_given(q: dict[str, Any]) -> dict[str, bool]:
    """``--flag -> True`` for each quantization option whose value differs from its default."""
    import inspect

    given = {}
    for name, p in inspect.signature(quant_options).parameters.items():
        default = getattr(p.default, "default", p.default)
        flag = "--" + ("no-" if default is True else "") + name.replace("_", "-")
        given[flag] = name in q and q[name] != default
    return given


def with_quant_options(fn):
    """Adds ``quant_options``' parameters to a verb; the verb receives them as one dict ``q``."""
    import functools
    import inspect
    import typing

    qsig = inspect.signature(quant_options)
    fsig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        q = quant_options(**{k: kw.pop(k) for k in qsig.parameters})
        return fn(q=q, **kw)

    own = [p for p in fsig.parameters.values() if p.name != "q"]
    wrapper.__signature__ = fsig.replace(parameters=own + list(qsig.parameters.values()))
    hints = {**typing.get_type_hints(fn), **typing.get_type_hints(quant_options)}
    hints.pop("q", None)
    wrapper.__annotations__ = hints
    del wrapper.__wrapped__
    return wrapper
