"""``qdllm-export gguf MODEL OUT.gguf``: the command users come for."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from qdllm_export.cli import checks
from qdllm_export.cli.app import app
from qdllm_export.cli.export import export_source, print_closing, with_quant_options


@app.command("gguf")
@with_quant_options
def gguf_(
    model: str = typer.Argument(..., help="Checkpoint folder (quantized first), quantized checkpoint folder, or tiny-llada / tiny-dream."),
    out: Path = typer.Argument(..., help="Output .gguf path (written to a temporary file, renamed at the end)."),
    outtype: str = typer.Option("quantized", help="quantized (binary planes, needs qdllm kernels) | f32 | f16 (plain GGUF for stock llama.cpp)."),
    embed_type: Optional[str] = typer.Option(None, callback=checks.one_of("f16", "f32", "q8_0"), help="Type of token_embd / output: f16 (default) | f32 | q8_0."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a GGUF or ONNX file this tool wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    q: Any = None,
) -> None:
    """Write a llama.cpp GGUF (architecture llada / dream) with qdllm binary-plane tensors."""
    from formats.gguf import write_gguf
    from runtime_ref.gguf_model import GGUFBackend

    t0 = time.time()
    with export_source(model, out, outtype, force, q) as (src, tok, meta):
        write_gguf(out, src, tokenizer=tok, outtype=outtype, qdllm_meta=meta, embed_type=embed_type, overwrite=force)
    info = GGUFBackend(out).describe()
    if as_json:
        print(json.dumps({**info, "seconds": time.time() - t0}))
    else:
        print_closing(info, time.time() - t0)
