"""The ``qdllm-export`` command. Each verb lives in its own module and registers itself on ``app``.

Exit codes: 0 success, 1 a failed check (``verify``) or a system error (disk full, permission), 2 a usage
error or bad input (one line, never a traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import os

# NumPy's OpenBLAS spins its worker threads while it waits; when another process holds a core, a spinning
# worker is descheduled and every matrix product waits for it (a 2-core machine with one busy core ran
# ``generate`` 2-4x slower). The NumPy runtime's matrices are small enough that one thread loses little
# (docs/benchmarks.md, "CLI speed"). Set before NumPy loads; a value the user exported wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from formats.errors import QdllmError  # noqa: E402
from qdllm_export.cli.app import app, console_err  # noqa: E402
from qdllm_export.cli import quantize, imatrix, gguf, onnx, verify, generate, evaluate, inspect  # noqa: E402,F401  (register verbs)


class Interrupted(BaseException):
    """Raised by the SIGINT / SIGTERM handlers while a verb runs.

    A BaseException that is not KeyboardInterrupt, so it unwinds through every ``finally`` (writers remove
    their temporary output) but past click/typer, which turn KeyboardInterrupt into exit 0 or 1 depending on
    their version, and past any ``except Exception``.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _importing(frame: Any) -> bool:
    """True while ``frame`` runs inside an ``import`` (any caller frame belongs to importlib)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _importing(frame):
        # A module's import may run Python inside a C++ extension's init (torch's c10d does): an exception raised
        # there crosses C++ and aborts the process (SIGABRT, no message). Deliver the signal again shortly; the
        # handler raises once the import is done.
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    raise Interrupted(signum)


def _click_error(e: Exception) -> bool:
    """True for click's usage errors (``ClickException``) and ``Abort``, from whichever click this typer uses.

    typer >= 0.22 vendors click as ``typer._click`` (with ``Abort`` in ``typer.exceptions``); older typers
    raise the ``click`` package's own classes."""
    import importlib

    classes = []
    for mod in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        classes += [c for c in (getattr(m, "ClickException", None), getattr(m, "Abort", None)) if isinstance(c, type)]
    return isinstance(e, tuple(classes))


def _run(argv: Sequence[str] | None) -> int:
    """Run the app; returns the exit code (exceptions that mean 'bad input' are turned into one line)."""
    try:
        rc = app(args=None if argv is None else list(argv), prog_name="qdllm-export", standalone_mode=False)
    except QdllmError as e:
        console_err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 2
    except OSError as e:  # disk full, permission denied, ... after the checks passed: one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        console_err.print(f"[bold red]error:[/] {where}{e.strerror or e}", soft_wrap=True)
        return 1
    except Exception as e:
        if not _click_error(e):
            raise
        if hasattr(e, "show"):  # ClickException: the usage line and the message
            e.show()
            return int(getattr(e, "exit_code", 2))
        console_err.print("aborted")
        return 1
    # In non-standalone mode click returns Exit's code (e.g. 0 after --help or --version) or the verb's None.
    if rc == 130:  # a KeyboardInterrupt that reached typer before our handler was installed
        console_err.print("interrupted")
    return rc if isinstance(rc, int) else 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback; Ctrl-C exits 130."""
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        code = _run(argv)
    except Interrupted as e:
        console_err.print("interrupted" if e.signum == signal.SIGINT else "terminated")
        code = 128 + e.signum
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    sys.exit(code)
