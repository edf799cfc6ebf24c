"""The one exception type users see. The CLI prints its message and exits non-zero, no traceback."""

from __future__ import annotations


class QdllmError(Exception):
    """A user-facing error: the message names the file (or tensor) and says how to fix it."""


class FormatError(QdllmError):
    """A file on disk is not what it claims to be (truncated, corrupt, wrong version, wrong shapes)."""
