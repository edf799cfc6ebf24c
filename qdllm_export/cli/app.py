"""The Typer application and the consoles every verb prints to."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="qdllm-export",
    help="Quantize diffusion LLMs (LLaDA, Dream) to ~2 bits per weight, export GGUF / ONNX, and verify them "
    "against PyTorch. MODEL is a Hugging Face checkpoint folder, a quantized checkpoint folder, a .gguf or "
    ".onnx file, or a bundled model: tiny-llada, tiny-dream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
console_err = Console(stderr=True)


def progress():
    """A rich progress bar on stderr (so --json output on stdout stays clean)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console_err, transient=False)
