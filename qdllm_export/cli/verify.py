"""``qdllm-export verify REF FILE...``: what users put in CI so no format drifts from PyTorch."""

from __future__ import annotations

import json
import sys
from typing import List

import typer
from rich.table import Table

from qdllm_export.cli.app import app, console, progress


@app.command()
def verify(
    ref: str = typer.Argument(..., help="Reference: checkpoint folder or quantized checkpoint folder (run in PyTorch), or any model."),
    files: List[str] = typer.Argument(..., help="Files to check against REF: .gguf, .onnx, folders."),
    mask_ratios: str = typer.Option("0.15,0.5,0.9", help="Comma-separated mask ratios of the seeded test inputs."),
    n_seq: int = typer.Option(2, help="Sequences per mask ratio."),
    seq_len: int = typer.Option(64, help="Tokens per test sequence."),
    gen_length: int = typer.Option(16, help="Tokens generated per sampler algorithm (greedy, one per step)."),
    rtol: float = typer.Option(1e-4, help="Largest allowed max|logit diff| / max|ref logit|."),
    min_agree: float = typer.Option(0.99, help="Smallest allowed fraction of positions with the same argmax."),
    seed: int = typer.Option(0, help="Seed of the test inputs and stochastic samplers."),
    device: str = typer.Option("cpu", help="PyTorch device of the reference."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Compare logits (max abs / relative error, argmax agreement) and greedy generations of each FILE with REF.
    Exits 1 when a tolerance is broken."""
    from formats.errors import QdllmError
    from qdllm_export.backends import open_model
    from qdllm_export.verify import report_dict, verify_files

    try:
        ratios = [float(r) for r in mask_ratios.split(",") if r.strip()]
    except ValueError:
        raise QdllmError(f"--mask-ratios {mask_ratios!r}: expected numbers like 0.15,0.5,0.9") from None
    reference = open_model(ref, "float32", device)
    backends = [open_model(f) for f in files]
    with progress() as bar:
        task = bar.add_task("verifying", total=len(files))
        reports = verify_files(reference, backends, ratios=ratios, n_seq=n_seq, seq_len=seq_len, seed=seed,
                               gen_length=gen_length, rtol=rtol, min_agree=min_agree,
                               progress=lambda d, t: bar.update(task, completed=d, total=t))
    settings = dict(mask_ratios=ratios, n_seq=n_seq, seq_len=seq_len, gen_length=gen_length, rtol=rtol,
                    min_agree=min_agree, seed=seed)
    out = report_dict(reference, reports, settings)
    if as_json:
        print(json.dumps(out))
    else:
        t = Table("file", "mask ratio", "max abs err", "rel err", "argmax agree", title=f"logits vs {reference.source}")
        for r in reports:
            for c in r.logits:
                t.add_row(r.path, f"{c.mask_ratio:g}", f"{c.max_abs:.2e}", f"{c.rel:.2e}", f"{c.argmax_agree:.4f}")
        console.print(t)
        g = Table("file", *[c.algorithm for c in reports[0].generation], "result", title=f"greedy generation, {gen_length} tokens")
        for r in reports:
            g.add_row(r.path, *["identical" if c.identical else f"differs at {c.first_diff}" for c in r.generation],
                      "[green]PASS[/]" if r.passed else "[red]FAIL[/]")
        console.print(g)
    if not out["passed"]:
        sys.exit(1)
