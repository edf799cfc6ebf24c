"""The Typer application and the consoles every verb prints to."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="qdllm-export",
    help="Quantize diffusion LLMs (LLaDA, Dream) to ~2 bits per weight, export GGUF / ONNX, and verify them "
    "against PyTorch. MODEL is a Hugging Face checkpoint folder, a quantized checkpoint folder, a .gguf or "
    ".onnx file, or a bundled model: tiny-llada, tiny-dream, tiny-llada-moe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# highlight=False: rich's repr highlighter colours numbers, paths and words like "q-" inside file names
# (``q-llada`` rendered as a styled ``Q``-like token); verbs style what they mean to style.
console = Console(highlight=False)
console_err = Console(stderr=True, highlight=False)


def version() -> str:
    """The installed package version (the source tree's ``__version__`` when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("qdllm-export")
    except PackageNotFoundError:
        from qdllm_export import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"qdllm-export {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit."),
) -> None:
    """Options that come before the verb."""


def progress():
    """A rich progress bar on stderr (so --json output on stdout stays clean).

    The short ``description`` sits left of the bar; a task's optional ``detail`` field (any length) sits at
    the right and is cut with an ellipsis, so the bar, the counts and the ETA always stay on screen.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.table import Column
    from rich.text import Text

    class Detail(ProgressColumn):
        def render(self, task) -> Text:
            return Text(str(task.fields.get("detail", "")), no_wrap=True, overflow="ellipsis")

    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), Detail(table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                    console=console_err, transient=False, expand=True)


@contextmanager
def block_progress() -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar over transformer blocks; yields the pipelines' ``on_layer(i, n, what)`` callback."""
    with progress() as bar:
        task = bar.add_task("quantizing", total=None)

        def on_layer(i: int, n: int, what: str) -> None:
            bar.update(task, completed=i, total=n, description=f"block {min(i, n - 1)}", detail=what)

        yield on_layer
        bar.update(task, description="done", detail="")
