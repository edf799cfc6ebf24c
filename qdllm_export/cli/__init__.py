"""The ``qdllm-export`` command. Each verb lives in its own module and registers itself on ``app``."""

from __future__ import annotations

import sys

from qdllm_export.cli.app import app, console_err
from formats.errors import QdllmError

from qdllm_export.cli import quantize, gguf, onnx, verify, generate, evaluate, inspect  # noqa: E402,F401  (register verbs)


def main() -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    import signal

    # SIGTERM (a CI timeout, a killed job) unwinds like Ctrl-C, so writers remove their temporary output
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        app(standalone_mode=False)
    except QdllmError as e:
        console_err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console_err.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
