"""The quantized checkpoint folder: quantize once, write GGUF and ONNX from it many times.

Layout (a Hugging Face folder plus planes)::

    OUT_DIR/
      config.json, tokenizer.json, ...      copied unchanged from the source checkpoint
      qdllm_quant.json                      the record: format version, method, options, calibration,
                                            per-tensor shape, plane counts, bits per weight, errors
      model-00001-of-0000N.safetensors      one shard per transformer block, plus one for the rest
      model.safetensors.index.json

Unquantized tensors keep their Hugging Face names and stored dtype. A quantized linear ``X.weight``
is stored as ``X.weight.qdllm.<field>`` for each array of its stored kind (``formats.stored``):
``planes,signs,row_scale,col_scale[,mu]`` (binary planes), ``data`` (ggml bytes) or
``codes,scales,zero_points`` (MatMulNBits), bit for bit; its record entry names the kind and its
parameters (a version-1 record without ``kind`` holds planes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import FormatError, QdllmError
from formats.families import read_config
from formats.outputs import RECORD, check_output_folder, umask
from formats.stored import from_record, record_of, required_fields
from formats.safetensors_io import Checkpoint, write_safetensors
from formats.tensors import canonical_names, canonical_shape

FORMAT_VERSION = 1
SUFFIX = ".qdllm."


def is_quantized_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / RECORD).is_file()


class QuantizedCheckpoint:
    """A quantized checkpoint folder as a ``TensorSource`` (lazy, memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.family, self.hparams, self.config = read_config(self.folder)
        path = self.folder / RECORD
        try:
            self.record: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: unreadable quantization record ({e})") from None
        if self.record.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{path}: format_version {self.record.get('format_version')!r} is not {FORMAT_VERSION}; "
                              "re-quantize with this version of qdllm-export")
        self.ckpt = Checkpoint(self.folder)
        self.hf = self.family.hf_names(self.hparams)
        self.quantized: dict[str, dict[str, Any]] = self.record.get("tensors", {})
        for name in canonical_names(self.hparams):
            hf = self.hf[name]
            if name in self.quantized:
                for f in required_fields(self.quantized[name]):
                    if hf + SUFFIX + f not in self.ckpt:
                        raise FormatError(f"{self.folder}: quantized tensor {hf!r} lacks its field {f!r}; the folder is incomplete")
            elif hf not in self.ckpt:
                raise FormatError(f"{self.folder}: tensor {hf!r} is missing")

    def names(self) -> list[str]:
        return canonical_names(self.hparams)

    def get(self, name: str) -> Any:
        """A float32 array, or the stored quantized tensor (``formats.stored``) of a quantized linear."""
        hf = self.hf[name]
        if name in self.quantized:
            fields = required_fields(self.quantized[name]) + ("mu",)
            arrays = {f: self.ckpt.raw(hf + SUFFIX + f) for f in fields if hf + SUFFIX + f in self.ckpt}
            return from_record(canonical_shape(self.hparams, name), self.quantized[name], arrays, name=name,
                               meta={"method": self.record.get("method")})
        return self.ckpt.get(hf)

    def dtype(self) -> str:
        return str(self.record.get("source_dtype", "F32"))

    def stored_type(self, name: str) -> str:
        """The type ``name`` is held in: a ggml type (``Q4_K``), ``planes``, ``nbits`` or the float dtype
        (``F16``, ``F32``, ``BF16``)."""
        info = self.quantized.get(name)
        if info is None:
            return self.ckpt.dtype(self.hf[name])
        return str(info["ggml_type"]) if info.get("kind") == "ggml" else str(info.get("kind", "planes"))


class QuantizedCheckpointWriter:
    """Writes a quantized checkpoint shard by shard into a temporary folder; ``finish`` renames it.

    Nothing appears at ``folder`` until ``finish`` succeeds; ``abort`` removes the temporary folder.
    """

    def __init__(self, folder: str | Path, source_folder: str | Path, n_shards: int, force: bool = False):
        self.folder = check_output_folder(folder, force)  # replaces only a quantized checkpoint of ours (parent exists)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".partial", dir=self.folder.parent))
        try:
            for f in Path(source_folder).iterdir():
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                    shutil.copyfile(f, self.tmp / f.name)  # a new file: its mode follows the umask, as the shards
        except BaseException:  # an interrupt or a full disk while copying: leave nothing behind
            self.abort()
            raise
        self.n_shards = n_shards
        self.shard = 0
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add_shard(self, floats: dict[str, np.ndarray], quantized: dict[str, Any], bf16: bool,
                  as_is: dict[str, np.ndarray] | None = None) -> None:
        """One shard: float tensors by HF name (stored bf16 when ``bf16``), stored quantized ones (any kind of
        ``formats.stored``) and float tensors kept in their own dtype (``as_is``: tables chosen f16 / f32)."""
        self.shard += 1
        fname = f"model-{self.shard:05d}-of-{self.n_shards:05d}.safetensors"
        tensors: dict[str, np.ndarray] = {**floats, **(as_is or {})}
        for hf, qt in quantized.items():
            for f, arr in qt.arrays().items():
                tensors[hf + SUFFIX + f] = arr
        write_safetensors(self.tmp / fname, tensors, {"format": "pt"}, bf16=set(floats) if bf16 else frozenset())
        for n, t in tensors.items():
            self.weight_map[n] = fname
            self.total += t.size * (2 if bf16 and n in floats else t.itemsize)

    def finish(self, record: dict[str, Any]) -> None:
        if self.shard != self.n_shards:
            raise QdllmError(f"{self.folder}: wrote {self.shard} shards, expected {self.n_shards}")
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        files = sorted(p.name for p in self.tmp.iterdir()) + [RECORD]
        record = {"format_version": FORMAT_VERSION, **record, "files": files}  # what --force may later replace
        (self.tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if self.folder.exists():
            check_output_folder(self.folder, True)  # still ours (nothing was added while we worked)
            shutil.rmtree(self.folder)
        os.chmod(self.tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a folder made with mkdir respects the umask
        os.replace(self.tmp, self.folder)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
