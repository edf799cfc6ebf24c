"""The one exception type users see. The CLI prints its message and exits non-zero, no traceback."""

from __future__ import annotations

from pathlib import Path


class QdllmError(Exception):
    """A user-facing error: the message names the file (or tensor) and says how to fix it."""


class FormatError(QdllmError):
    """A file on disk is not what it claims to be (truncated, corrupt, wrong version, wrong shapes)."""


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """An output file path that may be written: refused when it exists (unless ``overwrite`` and it is a file
    qdllm-export wrote, see ``formats.outputs``) or its folder is missing."""
    from formats.outputs import check_output_file

    return check_output_file(path, overwrite)
