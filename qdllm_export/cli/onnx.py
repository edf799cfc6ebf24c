"""``qdllm-export onnx MODEL OUT.onnx``: an ONNX graph that stock onnxruntime runs with weights kept packed.

Two kinds of quantized linears: binary planes (``--outtype planes``, qdllm ops) or onnxruntime's own
``MatMulNBits`` grid (``--outtype int2 | int4 | int8 | auto``, one node per linear, quantized here by
``qdllm_export.targets.nbits``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from formats.errors import QdllmError
from qdllm_export.cli import checks
from qdllm_export.cli.app import app, block_progress
from qdllm_export.cli.export import export_source, print_closing, quant_options_given, with_quant_options
from qdllm_export.cli.quantize import print_coverage, tuning

KERNELS = ("function", "matmulnbits")
NBITS_OUTTYPES = ("int2", "int4", "int8", "auto")
OUTTYPES = ("planes", *NBITS_OUTTYPES, "f32", "f16")
FILE_OUTTYPE = {"planes": "quantized"}  # the writer's (and the file's qdllm.outtype) name of the binary planes


def _outtype(value: str) -> str:
    """``--outtype`` callback: one of ``OUTTYPES``; ``quantized``, the old name of ``planes``, is accepted."""
    return checks.one_of(*OUTTYPES)("planes" if value == "quantized" else value)
NBITS_ACCURACY = 4  # accuracy_level of the int outtypes unless --accuracy-level says otherwise
NBITS_EMBED = "int8"  # embed type of the int outtypes unless --embed-type says otherwise (docs/onnx-format.md)
NBITS_BLOCK = 128  # block size of the int outtypes unless --block-size says otherwise (docs/benchmarks.md)


def _block_size(value: Optional[int]) -> Optional[int]:
    from qdllm_export.targets.nbits import BLOCK_SIZES

    if value is not None and value not in BLOCK_SIZES:
        raise typer.BadParameter(f"{value} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    return value


@app.command("onnx")
@with_quant_options
def onnx_(
    model: str = typer.Argument(..., help="Checkpoint folder (quantized first), quantized checkpoint folder, or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    out: Path = typer.Argument(..., help="Output .onnx path (models over ~1.8 GB get OUT.onnx.data beside it)."),
    outtype: str = typer.Option("planes", callback=_outtype,
                                help="planes (binary planes as qdllm ops; old name: quantized) | int2 | int4 | int8 | auto "
                                     "(onnxruntime's MatMulNBits grid, one node per linear) | f32 | f16."),
    bpw: Optional[float] = typer.Option(None, callback=checks.finite, help="--outtype auto: budget in stored bits per weight of the linears (scales included), e.g. 2.5; reachable: about 2.15 (int2 everywhere) to 8.19 (int8 everywhere) at --block-size 128, 2.28-8.38 at 64, 2.56-8.75 at 32 (a budget outside is refused, naming the nearest reachable one)."),
    block_size: Optional[int] = typer.Option(None, callback=_block_size, help="int2/int4/int8/auto: columns per scale and zero point, 32 | 64 | 128 (default: "
                                                 "fastest at accuracy level 4 on AVX2, and int2 at 2.15 bits per weight leaves "
                                                 "auto room under --bpw 2.5; 32 loses less)."),
    kernel: str = typer.Option("function", help="planes: function (1 bit per sign, standard ops) | matmulnbits (com.microsoft.MatMulNBits, 2 bits per sign)."),
    accuracy_level: Optional[int] = typer.Option(None, min=0, max=4, help="MatMulNBits compute: 4 = int8 activations (faster, ~1-2% logit error; default for int2/int4/int8/auto), 0 = fp32, exact (default for --kernel matmulnbits)."),
    embed_type: str = typer.Option(None, callback=checks.one_of("f16", "f32", "int8"),
                                   help="token_embd / output: f16 (default for planes, f32, f16) | int8 (default for "
                                        "int2/int4/int8/auto: 8-bit GatherBlockQuantized / MatMulNBits) | f32."),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--single-file",
                                                 help="Weights in OUT.onnx.data beside OUT (onnxruntime maps them: "
                                                      "less resident memory); default: on for int2/int4/int8/auto, "
                                                      "else only past ~1.8 GB."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a GGUF or ONNX file this tool wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    q: Any = None,
) -> None:
    """Write an ONNX model (input_ids -> logits, bidirectional) whose quantized linears are qdllm.PlaneMatMul nodes
    (functions of standard ONNX ops defined inside the file) or com.microsoft.MatMulNBits nodes."""
    checks.output_suffix(out, ".onnx", "onnx")
    from formats.onnx import write_onnx
    from runtime_ref.ort import OrtBackend

    if kernel not in KERNELS:
        raise QdllmError(f"--kernel must be one of {', '.join(KERNELS)}")
    nbits = outtype in NBITS_OUTTYPES
    checks.unused_with({"--bpw": bpw is not None and outtype != "auto",
                        "--block-size": block_size is not None and not nbits}, f"with --outtype {outtype}")
    checks.unused_with({"--accuracy-level": accuracy_level is not None and not nbits and kernel != "matmulnbits"},
                       f"with --kernel {kernel} and --outtype {outtype} (no MatMulNBits node reads it)")
    if outtype != "planes":
        checks.unused_with({"--kernel": kernel != "function"}, f"with --outtype {outtype} (no binary planes)")
    t0 = time.time()
    tables = onnx_tables(embed_type or (NBITS_EMBED if nbits else None))
    source = nbits_source(model, out, force, outtype, bpw, block_size or NBITS_BLOCK, q, tables) if nbits else \
        export_source(model, out, FILE_OUTTYPE.get(outtype, outtype), force, q, tables)
    with source as (src, tok, meta):
        level = accuracy_level if accuracy_level is not None else (NBITS_ACCURACY if nbits else 0)
        write_onnx(out, src, outtype="quantized" if nbits else FILE_OUTTYPE.get(outtype, outtype), kernel=kernel, qdllm_meta=meta, overwrite=force,
                   embed_type=embed_type or (NBITS_EMBED if nbits else None), accuracy_level=level, tokenizer=tok,
                   external_data=external_data if external_data is not None else (True if nbits else None))
    info = OrtBackend(out).describe()
    if as_json:
        print(json.dumps({**info, "seconds": time.time() - t0}))
    else:
        print_closing(info, time.time() - t0)


def onnx_tables(embed_type: str | None) -> Any:
    """The tables a float MODEL is quantized with on the way to ONNX, so that the file holds them exactly: f16 or
    f32 as asked (default f16); f32 for int8, which the writer then encodes (``formats.onnx``, embed type int8).
    A quantized checkpoint keeps its own (its Q4_K / Q6_K tables are written in ``embed_type``, declared in the
    file: docs/onnx-format.md section 3c)."""
    from qdllm_export.targets.tables import TablesSpec

    t = "f32" if embed_type in ("f32", "int8") else "f16"
    return TablesSpec(t, t)


def _checked_spec(model: str, out: Path, force: bool, outtype: str, bpw: float | None, block_size: int,
                  q: dict[str, Any]) -> tuple[Path, Any, Any]:
    """(checkpoint folder, NBitsSpec, CalibConfig) of an int outtype, every check done before any work:
    a plain checkpoint, options that apply, bits the installed onnxruntime runs, widths that fit the block,
    a reachable ``--bpw``, a writable OUT."""
    from formats.checkpoint import is_quantized_checkpoint
    from formats.tensors import HFTensors
    from qdllm_export.backends import resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.targets.nbits import NBitsSpec, check_block_size, check_budget
    from runtime_ref.ort import nbits_support

    folder = resolve(model)
    if not folder.is_dir():
        raise QdllmError(f"{folder}: expected a checkpoint folder or a bundled model name")
    if is_quantized_checkpoint(folder):
        raise QdllmError(f"{folder}: is already quantized; write its tensors as stored with --outtype planes, "
                         f"or pass the float checkpoint for --outtype {outtype}")
    given = quant_options_given(q)
    checks.unused_with({f: given[f] for f in ("--bits", "--group-size")}, f"with --outtype {outtype} (see --bpw, --block-size)")
    if q["method"] not in ("quant-dllm", "gptq", "rtn"):
        raise QdllmError(f"--method must be quant-dllm, gptq or rtn, not {q['method']!r}")
    spec = NBitsSpec(outtype, bpw, block_size, rounding="rtn" if q["method"] == "rtn" else "gptq")
    if q["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QdllmError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    for bits in spec.bits:
        why = nbits_support(bits)
        if why:
            raise QdllmError(f"--outtype {outtype}: {why}")
    hp = HFTensors(folder).hparams
    check_block_size(hp, block_size, folder)
    check_budget(hp, spec, folder)
    checks.output_file(out, force, [folder, q.get("calib")])
    ccfg = CalibConfig(path=str(q["calib"]) if q["calib"] else None, n_samples=q["calib_samples"], seq_len=q["seq_len"],
                       mcs=q["mcs"], prefix_ratio=q["prefix_ratio"], seed=q["seed"])
    return folder, spec, ccfg


@contextmanager
def nbits_source(model: str, out: Path, force: bool, outtype: str, bpw: float | None, block_size: int,
                 q: dict[str, Any], tables: Any = None) -> Iterator[tuple[Any, Any, dict]]:
    """Yields (tensors, tokenizer, qdllm metadata) of MODEL quantized to MatMulNBits linears (a plain
    checkpoint only; a quantized one is written as stored with --outtype planes). The quantized
    checkpoint lives in a temporary folder beside ``out``, removed afterwards."""
    from formats.checkpoint import QuantizedCheckpoint
    from formats.tokenizer import load_tokenizer
    from qdllm_export.targets.nbits import quantize_nbits

    folder, spec, ccfg = _checked_spec(model, out, force, outtype, bpw, block_size, q)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with block_progress() as on_layer:
            _, rec = quantize_nbits(folder, tmp / "q", spec, ccfg, device=q["device"], force=True, on_layer=on_layer,
                                    tables=tables, **tuning(q["tune_iters"], q["equalize"], q["seed"]))
        print_coverage(rec, stderr=True)
        meta = {"target": "nbits", "method": rec["method"], "outtype": outtype, "block_size": block_size,
                "bits_per_weight_linear": rec["bits_per_weight_linear"], **({"bpw": bpw} if bpw is not None else {})}
        yield QuantizedCheckpoint(tmp / "q"), load_tokenizer(folder), meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
