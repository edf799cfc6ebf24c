"""``qdllm-export verify REF FILE...``: what users put in CI so no format drifts from PyTorch."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer
from rich.table import Table

from qdllm_export.backends import RUNTIMES
from qdllm_export.cli import checks
from qdllm_export.cli.app import app, console, progress
from qdllm_export.verify import FileReport


def failures(rep: FileReport, rtol: float, min_agree: float) -> list[str]:
    """Why ``rep`` failed, one phrase per broken tolerance, naming the flag that sets it (a file with int8
    compute is held to its own tolerances, see ``qdllm_export.verify``)."""
    return [f.replace(f"> {rtol:g}", f"> --rtol {rtol:g}").replace(f"< {min_agree:g}", f"< --min-agree {min_agree:g}")
            for f in rep.failures(rtol, min_agree)]


@app.command()
def verify(
    ref: str = typer.Argument(..., help="Reference: checkpoint folder or quantized checkpoint folder (run in PyTorch), or any model."),
    files: List[str] = typer.Argument(..., help="Files to check against REF: .gguf, .onnx, folders."),
    mask_ratios: str = typer.Option("0.15,0.5,0.9", help="Comma-separated mask ratios in [0, 1] of the seeded test inputs."),
    n_seq: int = typer.Option(2, min=1, help="Sequences per mask ratio."),
    seq_len: int = typer.Option(64, min=2, help="Tokens per test sequence."),
    gen_length: int = typer.Option(16, min=1, help="Tokens generated per sampler algorithm (greedy, one per step)."),
    rtol: float = typer.Option(1e-4, callback=checks.between(0.0), help="Largest allowed max|logit diff| / max|ref logit|."),
    min_agree: float = typer.Option(0.99, callback=checks.between(0.0, 1.0), help="Smallest allowed fraction of positions with the same argmax."),
    seed: int = typer.Option(0, min=0, help="Seed of the test inputs and stochastic samplers."),
    device: Optional[str] = typer.Option(None, callback=checks.device_option, help="PyTorch device of a checkpoint-folder REF: cpu (default) | cuda."),
    runtime: Optional[str] = typer.Option(None, callback=checks.one_of(*RUNTIMES), help="Engine of each .gguf FILE: numpy (default, exact parity expected) | llama.cpp (stock llama.cpp; its 8-bit activation rounding gets looser, documented tolerances)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Compare logits (max abs / relative error, argmax agreement) and greedy generations of each FILE with REF.
    Exits 1 when a tolerance is broken."""
    from qdllm_export.backends import read_header
    from qdllm_export.verify import PROMPT_LEN, check_comparable, report_dict, verify_files

    ratios = checks.float_list("--mask-ratios", mask_ratios, 0.0, 1.0)
    head = read_header(ref)
    checks.torch_only(head.kind, head.model, {"--device": device})
    checks.fits_context(head.hparams, head.model, "--seq-len", seq_len, most=head.hparams.context_length)
    checks.fits_context(head.hparams, head.model, "--gen-length", PROMPT_LEN + gen_length,
                        f"the test prompt ({PROMPT_LEN} tokens) + {gen_length} new tokens",
                        most=head.hparams.context_length - PROMPT_LEN)
    ggufs = [f for f in files if f.lower().endswith(".gguf")] or files[:1]  # --runtime: the .gguf FILES (refused if none)
    heads = [read_header(f, runtime if f in ggufs else None) for f in files]  # all read and checked before any load
    check_comparable(head, heads)
    reference = head.open("float32", device or "cpu")
    backends = [h.open() for h in heads]
    with progress() as bar:
        task = bar.add_task("verifying", total=len(files))
        reports = verify_files(reference, backends, ratios=ratios, n_seq=n_seq, seq_len=seq_len, seed=seed,
                               gen_length=gen_length, rtol=rtol, min_agree=min_agree,
                               progress=lambda d, t: bar.update(task, completed=d, total=t))
    settings = dict(mask_ratios=ratios, n_seq=n_seq, seq_len=seq_len, gen_length=gen_length, rtol=rtol,
                    min_agree=min_agree, seed=seed)
    out = report_dict(reference, reports, settings)
    for entry, r in zip(out["files"], reports):
        entry["failures"] = failures(r, rtol, min_agree)
    if as_json:
        print(json.dumps(out))
    else:
        print_tables(reference.source, reports, gen_length, rtol, min_agree)
    if not out["passed"]:
        sys.exit(1)


def print_tables(ref: str, reports: list[FileReport], gen_length: int, rtol: float, min_agree: float) -> None:
    """The logits table, the generation table, and one line per failed file saying which tolerance broke."""
    t = Table("file", "mask ratio", "max abs err", "rel err", "argmax agree", title=f"logits vs {ref}")
    for r in reports:
        for c in r.logits:
            t.add_row(r.path, f"{c.mask_ratio:g}", f"{c.max_abs:.2e}", f"{c.rel:.2e}", f"{c.argmax_agree:.4f}")
    console.print(t)
    g = Table("file", *[c.algorithm for c in reports[0].generation], "result", title=f"greedy generation, {gen_length} tokens")
    for r in reports:
        g.add_row(r.path, *["identical" if c.identical else f"differs at {c.first_diff}" for c in r.generation],
                  "[green]PASS[/]" if r.passed else "[red]FAIL[/]")
    console.print(g)
    for r in reports:
        if r.tolerance_note:
            console.print(f"{r.path}: {r.tolerance_note} (rel err <= {r.rtol:g}, argmax agree >= {r.min_agree_required:g})",
                          soft_wrap=True)
        if not r.passed:
            why = f" ({r.mismatch})" if r.mismatch else ""
            console.print(f"[red]FAIL[/] {r.path}: {'; '.join(failures(r, rtol, min_agree))}{why}", soft_wrap=True)
