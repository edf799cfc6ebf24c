"""``qdllm-export onnx MODEL OUT.onnx``: an ONNX graph that stock onnxruntime runs with weights kept packed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from formats.errors import QdllmError
from qdllm_export.cli import checks
from qdllm_export.cli.app import app
from qdllm_export.cli.export import export_source, print_closing, with_quant_options

KERNELS = ("function", "matmulnbits")


@app.command("onnx")
@with_quant_options
def onnx_(
    model: str = typer.Argument(..., help="Checkpoint folder (quantized first), quantized checkpoint folder, or tiny-llada / tiny-dream."),
    out: Path = typer.Argument(..., help="Output .onnx path (models over ~1.8 GB get OUT.onnx.data beside it)."),
    outtype: str = typer.Option("quantized", help="quantized (qdllm plane ops) | f32 | f16."),
    kernel: str = typer.Option("function", help="function (1 bit per sign, standard ops) | matmulnbits (com.microsoft.MatMulNBits, 2 bits per sign)."),
    accuracy_level: int = typer.Option(0, min=0, max=4, help="matmulnbits: 0 = exact fp32 (default), 4 = int8 activations (faster, ~1-2% logit error)."),
    embed_type: str = typer.Option(None, callback=checks.one_of("f16", "f32"), help="token_embd / output: f16 (default for quantized) | f32."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a GGUF or ONNX file this tool wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    q: Any = None,
) -> None:
    """Write an ONNX model (input_ids -> logits, bidirectional) whose quantized linears are qdllm.PlaneMatMul nodes,
    defined inside the file as functions of standard ONNX ops."""
    from formats.onnx import write_onnx
    from runtime_ref.ort import OrtBackend

    if kernel not in KERNELS:
        raise QdllmError(f"--kernel must be one of {', '.join(KERNELS)}")
    checks.unused_with({"--accuracy-level": accuracy_level != 0 and kernel != "matmulnbits"},
                       f"with --kernel {kernel} (only matmulnbits reads it)")
    if outtype != "quantized":
        checks.unused_with({"--kernel": kernel != "function"}, f"with --outtype {outtype} (no quantized linears)")
    t0 = time.time()
    with export_source(model, out, outtype, force, q) as (src, tok, meta):
        write_onnx(out, src, outtype=outtype, kernel=kernel, qdllm_meta=meta, overwrite=force, embed_type=embed_type,
                   accuracy_level=accuracy_level, tokenizer=tok)
    info = OrtBackend(out).describe()
    if as_json:
        print(json.dumps({**info, "seconds": time.time() - t0}))
    else:
        print_closing(info, time.time() - t0)
