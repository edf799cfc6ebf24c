"""``qdllm-export eval MODEL --data FILE``: Monte-Carlo masked-diffusion NLL bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from formats.errors import QdllmError
from qdllm_export.cli.app import app, console, progress
from qdllm_export.textfile import read_text

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "val.txt"


def text_token_windows(tokenizer, path: Path, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Non-overlapping ``[N, seq_len]`` int64 windows of the file's tokens."""
    from runtime_ref.likelihood import text_windows

    if tokenizer is None:
        raise QdllmError("this model carries no tokenizer, so text cannot be encoded")
    ids = np.asarray(tokenizer.encode(read_text(path)).ids, dtype=np.int64)
    try:
        return text_windows(ids, seq_len, max_windows)
    except QdllmError as e:
        raise QdllmError(f"{path}: {e}") from None


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Checkpoint folder, quantized folder, .gguf, .onnx, or tiny-llada / tiny-dream."),
    data: Optional[Path] = typer.Option(None, help="Text (or JSONL with 'text') file. Default: the bundled Shakespeare validation text."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    max_windows: Optional[int] = typer.Option(32, help="Use at most this many windows (0 or less: all)."),
    mc: int = typer.Option(8, "--mc", help="Monte-Carlo mask samples per window (stratified mask ratios)."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    seed: int = typer.Option(0, help="Mask seed; the same seed gives the same masks for every model."),
    dtype: str = typer.Option("float32", help="PyTorch compute dtype for checkpoint folders."),
    device: str = typer.Option("cpu", help="PyTorch device for checkpoint folders: cpu | cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object with nll (nats per token)."),
) -> None:
    """Masked-diffusion NLL upper bound per token (nats), on identical seeded masks for every model."""
    from qdllm_export.backends import open_model
    from runtime_ref.likelihood import masked_nll

    backend = open_model(model, dtype, device)
    path = data or DEFAULT_DATA
    windows = text_token_windows(backend.tokenizer, path, seq_len, max_windows if max_windows and max_windows > 0 else None)
    with progress() as bar:
        task = bar.add_task("eval", total=None)
        res = masked_nll(backend.logits, windows, mask_id=backend.hparams.mask_token_id, n_mc=mc, seed=seed,
                         batch_size=batch_size, protect_first=backend.hparams.spec.shift_logits,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    out = {"model": backend.source, "data": str(path), "nll": res.nll, "stderr": res.stderr, "ppl_bound": float(np.exp(res.nll)),
           "n_windows": res.n_windows, "n_tokens": res.n_tokens, "mc": res.n_mc, "seq_len": seq_len, "seed": seed}
    if as_json:
        print(json.dumps(out))
    else:
        console.print(f"NLL bound {res.nll:.4f} ± {res.stderr:.4f} nats/token (ppl <= {np.exp(res.nll):.2f}) "
                      f"on {res.n_windows} windows x {seq_len} tokens, {res.n_mc} masks each")
