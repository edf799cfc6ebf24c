"""Reading users' text files (plain UTF-8, or JSONL with a ``text`` field) with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from formats.errors import QdllmError


def read_text(path: Path) -> str:
    """A UTF-8 text file, or the ``text`` fields of a JSONL file; empty input is an error."""
    if not path.is_file():
        raise QdllmError(f"{path}: not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QdllmError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    parts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise QdllmError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise QdllmError(f"{path}: is empty; give a text file with at least one window of tokens")
    return raw
