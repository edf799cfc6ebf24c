"""``qdllm-export imatrix MODEL OUT.imatrix.gguf``: a diffusion-aware importance matrix for llama-quantize."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from formats.errors import QdllmError
from qdllm_export.cli import checks
from qdllm_export.cli.app import app, console, progress


@app.command("imatrix")
def imatrix(
    model: str = typer.Argument(..., help="Float Hugging Face checkpoint folder (LLaDA, Dream or LLaDA-MoE) or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    out: Path = typer.Argument(..., help="Output imatrix file (llama.cpp's GGUF imatrix format, e.g. model.imatrix.gguf)."),
    calib: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Calibration text or JSONL file (default: bundled Shakespeare train text)."),
    calib_samples: int = typer.Option(128, min=1, help="Calibration windows (imatrix chunks)."),
    seq_len: int = typer.Option(256, min=2, help="Tokens per window (imatrix chunk size)."),
    mcs: bool = typer.Option(True, "--mcs/--no-mcs", help="Mask the windows as the model sees them while denoising (off: plain text, as llama-imatrix)."),
    device: str = typer.Option("cpu", callback=checks.device_option, help="cpu | cuda."),
    seed: int = typer.Option(0, min=0, help="Seed of the calibration masks."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a file this tool wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write llama.cpp's imatrix (in_sum2 / counts per weight) from MCS-masked activations of the float model,
    for `llama-quantize --imatrix` or `qdllm-export gguf --imatrix`."""
    from formats.checkpoint import is_quantized_checkpoint
    from formats.families import read_config
    from formats.imatrix import write_imatrix
    from qdllm_export.backends import resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.imatrix import collect_imatrix

    t0 = time.time()
    checks.output_suffix(out, ".gguf", "imatrix")  # llama.cpp's GGUF imatrix; e.g. model.imatrix.gguf
    folder = resolve(model)
    if not folder.is_dir() or is_quantized_checkpoint(folder):
        raise QdllmError(f"{model}: expected a float checkpoint folder (the activations of the unquantized model "
                         "make the imatrix)")
    _, hp, _ = read_config(folder)
    checks.fits_context(hp, model, "--seq-len", seq_len, most=hp.context_length)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QdllmError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    checks.output_file(out, force, [folder, calib])
    ccfg = CalibConfig(path=str(calib) if calib else None, n_samples=calib_samples, seq_len=seq_len, mcs=mcs, seed=seed)
    with progress() as bar:
        task = bar.add_task("imatrix", total=None)
        im = collect_imatrix(folder, ccfg, device=device,
                             on_layer=lambda i, n, what: bar.update(task, completed=i, total=n, detail=what))
        bar.update(task, description="done", detail="")
    write_imatrix(out, im, overwrite=force, notes={"calibration": "mcs" if mcs else "plain"})
    summary = {"path": str(out), "model": str(folder), "model_fingerprint": im.fingerprint, "entries": len(im.in_sum2),
               "chunks": im.chunk_count, "chunk_size": im.chunk_size, "mcs": mcs, "size_bytes": out.stat().st_size,
               "seconds": time.time() - t0}
    if as_json:
        print(json.dumps(summary))
        return
    console.print(f"wrote {out}", soft_wrap=True)
    console.print(f"{summary['entries']} weights, {im.chunk_count} chunks x {im.chunk_size} tokens "
                  f"({'MCS-masked' if mcs else 'plain text'}), {summary['seconds']:.1f} s", soft_wrap=True)
    console.print(f"use: llama-quantize --imatrix {out} MODEL-f16.gguf OUT.gguf Q2_K   or   qdllm-export gguf {model} "
                  f"OUT.gguf --outtype q2_k --imatrix {out}", soft_wrap=True)
