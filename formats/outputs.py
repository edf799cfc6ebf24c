"""Which files and folders qdllm-export wrote, so that overwriting (``--force``) never destroys anything else.

Each output kind is recognised by its contents, not its name: a GGUF file by the ``qdllm.*`` metadata every
qdllm GGUF carries, an ONNX file by its ``qdllm.format`` metadata (and its external data file by being named in
that file), a quantized checkpoint folder by its ``qdllm_quant.json`` record and nothing in it that the
writer did not put there. A new output kind adds its recogniser here. ``gguf_file_writer`` writes a GGUF file
so that no half-written output is ever left at its path. No torch.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from formats.errors import QdllmError

GGUF_MAGIC = b"GGUF"
QDLLM_GGUF_PREFIX = "qdllm."
RECORD = "qdllm_quant.json"  # the record every quantized checkpoint folder holds (formats.checkpoint)


def own_gguf(path: Path) -> bool:
    """True when ``path`` is a GGUF file with ``qdllm.*`` metadata (every qdllm GGUF writer adds
    ``qdllm.format_version``; a GGUF of ours of another kind, e.g. an importance matrix, adds its own key)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return False
        from formats.gguf_container import parse_gguf

        _, meta, _, _ = parse_gguf(path)
    except (OSError, QdllmError, ValueError):
        return False
    return any(k.startswith(QDLLM_GGUF_PREFIX) for k in meta)


def own_onnx(path: Path) -> tuple[bool, list[str]]:
    """(written by qdllm-export, names of its external data files) for an ONNX file."""
    try:
        from formats.onnx_read import FORMAT
        from formats.onnx_proto import scan_model

        scan = scan_model(path)
    except (OSError, QdllmError, ValueError, ImportError):
        return False, []
    if scan.metadata.get("qdllm.format") != FORMAT:
        return False, []
    return True, sorted(scan.external_files())


def own_checkpoint_folder(folder: Path) -> tuple[bool, list[str]]:
    """(has our ``qdllm_quant.json`` record, entries the writer did not write).

    Records that list their ``files`` let us name anything a user added since; older records do not, and
    then any plain file counts as ours (a sub-folder never does: the writer makes none)."""
    rec = folder / RECORD
    if not rec.is_file():
        return False, []
    try:
        record = json.loads(rec.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False, []
    listed = set(record.get("files", [])) | {RECORD} if isinstance(record, dict) and "files" in record else None
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                     if p.is_dir() or (listed is not None and p.name not in listed))
    return True, foreign


def refuse_unless_own_file(path: Path) -> None:
    """Raise unless the existing ``path`` is a file this tool wrote (GGUF or ONNX, recognised by contents)."""
    if path.is_dir():
        raise QdllmError(f"{path}: is a folder; give the path of the output file inside it, e.g. {path / 'model.gguf'}")
    if own_gguf(path) or own_onnx(path)[0]:
        return
    raise QdllmError(f"{path}: exists and is not a file qdllm-export wrote, so it is not replaced (not even with "
                     "--force); move it away or choose another output name")


def _parent_exists(path: Path) -> None:
    """Every output (a file or a checkpoint folder) goes into a folder that exists: a mistyped path is an error,
    not a new tree of folders (as ``llama-quantize`` and ``llama-imatrix`` do; one rule for every verb)."""
    if not path.parent.is_dir():
        what = "exists and is not a folder" if path.parent.exists() else "does not exist"
        raise QdllmError(f"{path}: folder {path.parent} {what}; create it first (mkdir -p {path.parent}) or choose "
                         "an output in an existing folder")


def umask() -> int:
    """The process's file-creation mask (read without changing it where Linux shows it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """An output file path that may be written.

    Refused: an existing path unless ``overwrite`` and it is a GGUF/ONNX file qdllm-export wrote; a missing
    parent folder; an existing external data file (``OUT.data``) that the file being replaced does not name.
    """
    path = Path(path)
    _parent_exists(path)
    exists = path.exists() or path.is_symlink()
    if exists:
        refuse_unless_own_file(path)
    data = path.with_name(path.name + ".data")
    if data.exists() and not (exists and data.name in own_onnx(path)[1]):
        raise QdllmError(f"{data}: exists and is not the external data of a qdllm-export ONNX file at {path}; "
                         "move it away or choose another output name")
    if exists and not overwrite:
        raise QdllmError(f"{path}: already exists (written by qdllm-export); pass --force to replace it")
    return path


def check_output_folder(folder: str | Path, overwrite: bool) -> Path:
    """A quantized-checkpoint output folder that may be written (replaced only when it is our own; its parent
    folder must exist, as every output's)."""
    folder = Path(folder)
    if not (folder.exists() or folder.is_symlink()):
        _parent_exists(folder)
        return folder
    if not folder.is_dir():
        raise QdllmError(f"{folder}: exists and is not a folder; choose another output folder")
    ours, foreign = own_checkpoint_folder(folder)
    if not any(folder.iterdir()):
        return folder  # an empty folder: nothing to lose
    if not ours:
        raise QdllmError(f"{folder}: is a folder qdllm-export did not write (no qdllm_quant.json), so it is not "
                         "replaced (not even with --force); choose a new output folder")
    if foreign:
        raise QdllmError(f"{folder}: holds {', '.join(foreign[:5])}, which qdllm-export did not write, so the folder "
                         "is not replaced (not even with --force); move them away or choose another output folder")
    if not overwrite:
        raise QdllmError(f"{folder}: already exists (a quantized checkpoint); pass --force to replace it")
    return folder


@contextmanager
def gguf_file_writer(path: Path, arch: str) -> Iterator[Any]:
    """A ``gguf.GGUFWriter`` for architecture ``arch`` on a temporary file beside ``path``: renamed to ``path``
    when the block ends without error, removed when it raises (Ctrl-C included)."""
    import gguf

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield w
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
