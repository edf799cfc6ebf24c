"""``qdllm-export eval MODEL --data FILE``: Monte-Carlo masked-diffusion NLL bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from formats.errors import QdllmError
from qdllm_export.backends import RUNTIMES
from qdllm_export.cli import checks
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
    model: str = typer.Argument(..., help="Checkpoint folder, quantized folder, .gguf, .onnx, or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Text (or JSONL with 'text') file. Default: the bundled Shakespeare validation text."),
    seq_len: int = typer.Option(128, min=2, help="Tokens per window."),
    max_windows: Optional[int] = typer.Option(32, help="Use at most this many windows (0 or less: all)."),
    mc: int = typer.Option(8, "--mc", min=1, help="Monte-Carlo mask samples per window (stratified mask ratios)."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per forward pass."),
    seed: int = typer.Option(0, min=0, help="Mask seed; the same seed gives the same masks for every model."),
    dtype: Optional[str] = typer.Option(None, callback=checks.one_of(*checks.TORCH_DTYPES), help="PyTorch compute dtype for checkpoint folders: float32 (default) | bfloat16 | float16."),
    device: Optional[str] = typer.Option(None, callback=checks.device_option, help="PyTorch device for checkpoint folders: cpu (default) | cuda."),
    runtime: Optional[str] = typer.Option(None, callback=checks.one_of(*RUNTIMES), help="Engine of a .gguf file: numpy (default, qdllm's reference forward) | llama.cpp (stock llama.cpp through llama-cpp-python)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object with nll (nats per token)."),
) -> None:
    """Masked-diffusion NLL upper bound per token (nats), on identical seeded masks for every model."""
    from qdllm_export.backends import read_header
    from runtime_ref.likelihood import masked_nll

    head = read_header(model, runtime)
    hp = head.hparams
    checks.torch_only(head.kind, head.model, {"--dtype": dtype, "--device": device})
    checks.fits_context(hp, head.model, "--seq-len", seq_len, most=hp.context_length)
    path = data or DEFAULT_DATA
    windows = text_token_windows(head.tokenizer, path, seq_len, max_windows if max_windows and max_windows > 0 else None)
    backend = head.open(dtype or "float32", device or "cpu")
    with progress() as bar:
        task = bar.add_task("eval", total=None)
        res = masked_nll(backend.logits, windows, mask_id=hp.mask_token_id, n_mc=mc, seed=seed,
                         batch_size=batch_size, protect_first=hp.spec.shift_logits,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    out = {"model": backend.source, "data": str(path), "nll": res.nll, "stderr": res.stderr, "ppl_bound": float(np.exp(res.nll)),
           "n_windows": res.n_windows, "n_tokens": res.n_tokens, "mc": res.n_mc, "seq_len": seq_len, "seed": seed}
    if as_json:
        print(json.dumps(out))
    else:
        why = ": a window's first token is never masked" if res.n_tokens != res.n_windows * seq_len else ""
        console.print(f"NLL bound {res.nll:.4f} ± {res.stderr:.4f} nats/token (ppl <= {np.exp(res.nll):.2f}) on "
                      f"{res.n_windows} windows x {seq_len} tokens ({res.n_tokens} scored{why}), {res.n_mc} masks each",
                      soft_wrap=True)
