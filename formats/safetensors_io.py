"""Torch-free reading and writing of (sharded) safetensors checkpoints, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets) and the raw data. We parse it ourselves so that bf16 works without torch, tensors are
memory-mapped (an 8B checkpoint is never read whole), and every defect gets a message naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
import numpy as np

from formats.errors import FormatError, QdllmError

# safetensors dtype -> (numpy storage dtype, is bf16)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
             np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
             np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL"}


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32 (exact)."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits as uint16, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and validated, data memory-mapped lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: truncated (no safetensors header); re-download the file")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise FormatError(f"{self.path}: corrupt safetensors header length {n}; re-download the file")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise QdllmError(f"{self.path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FormatError(f"{self.path}: corrupt safetensors header (not JSON); re-download the file") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._size = size
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dt, shape, (a, b) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if dt not in _DTYPES:
                raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype {dt}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt].itemsize
            if b - a != nbytes or a < 0:
                raise FormatError(f"{self.path}: tensor {name!r} byte range does not match its shape {shape}")
            if self._data_start + b > size:
                raise FormatError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {self._data_start + b} "
                    f"but the file has {size}; re-download or re-copy the file"
                )
            self.entries[name] = (dt, shape, a, b)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def raw(self, name: str) -> np.ndarray:
        """The stored array in its storage dtype (bf16 as uint16), read from the file into memory.

        Read, not memory-mapped: mapped pages of every tensor touched would stay in the process's
        resident set for as long as the file is open, so streaming a 16 GB checkpoint would grow RSS
        by 16 GB.
        """
        dt, shape, a, b = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + a)
            arr = np.fromfile(f, dtype=_DTYPES[dt], count=(b - a) // _DTYPES[dt].itemsize)
        return arr.reshape(shape)

    def head(self, name: str, count: int) -> np.ndarray:
        """The first ``count`` stored values (flat, storage dtype: bf16 as uint16) of a tensor, read alone."""
        dt, shape, a, b = self.entries[name]
        n = min(count, (b - a) // _DTYPES[dt].itemsize)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + a)
            return np.fromfile(f, dtype=_DTYPES[dt], count=n)

    def get(self, name: str, float32: bool = True) -> np.ndarray:
        """A tensor as a new array; floating types converted to float32 when ``float32``."""
        dt = self.entries[name][0]
        arr = self.raw(name)
        if dt == "BF16":
            return bf16_to_f32(arr) if float32 else arr
        if float32 and dt in ("F16", "F64"):
            return arr.astype(np.float32)
        return arr


class Checkpoint:
    """The safetensors of a model folder: ``model.safetensors``, or shards named by
    ``model.safetensors.index.json``. Tensors are looked up by name across shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FormatError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
            for shard in sorted(set(weight_map.values())):
                p = self.folder / shard
                if not p.is_file():
                    raise QdllmError(f"{p}: shard named by {index.name} is missing; download every shard of the checkpoint")
                self.files[shard] = SafetensorsFile(p)
            for name, shard in weight_map.items():
                if name not in self.files[shard].entries:
                    raise FormatError(f"{self.folder / shard}: {index.name} says it holds {name!r}, but it does not")
                self.where[name] = shard
        elif single.is_file():
            self.files[single.name] = SafetensorsFile(single)
            self.where = {n: single.name for n in self.files[single.name].keys()}
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            hint = f" (found {', '.join(found)} without an index)" if found else ""
            raise QdllmError(
                f"{self.folder}: no model.safetensors or model.safetensors.index.json{hint}; "
                "point at a Hugging Face checkpoint folder"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise QdllmError(f"{self.folder}: checkpoint has no tensor {name!r}")
        return self.files[self.where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)

    def dtype(self, name: str) -> str:
        return self.file_of(name).dtype(name)

    def get(self, name: str, float32: bool = True) -> np.ndarray:
        return self.file_of(name).get(name, float32)

    def raw(self, name: str) -> np.ndarray:
        return self.file_of(name).raw(name)

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      bf16: set[str] | frozenset[str] = frozenset()) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file, then rename).

    Names in ``bf16`` are stored as bf16: float32 arrays are rounded, uint16 arrays are taken as bf16
    bits already. Every other array keeps its dtype.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs: list[np.ndarray] = []
    off = 0
    for name, arr in tensors.items():
        if name in bf16:
            data, dt = (arr if arr.dtype == np.uint16 else f32_to_bf16(arr)), "BF16"
        else:
            data = np.ascontiguousarray(arr)
            if data.dtype not in _NP_TO_ST:
                raise QdllmError(f"{path}: cannot store tensor {name!r} of dtype {data.dtype}")
            dt = _NP_TO_ST[data.dtype]
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        header[name] = {"dtype": dt, "shape": list(np.shape(arr)), "data_offsets": [off, off + data.nbytes]}
        blobs.append(data)
        off += data.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(memoryview(b))
    os.replace(tmp, path)


def write_checkpoint(folder: str | Path, tensors: dict[str, np.ndarray], n_shards: int = 1,
                     bf16: set[str] | frozenset[str] = frozenset()) -> None:
    """Write ``tensors`` as ``model.safetensors`` or as ``n_shards`` shards plus
    ``model.safetensors.index.json``, named as Hugging Face names them."""
    folder = Path(folder)
    names = list(tensors)
    if n_shards <= 1:
        write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"}, bf16)
        return
    per = -(-len(names) // n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(n_shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(folder / fname, {n: tensors[n] for n in part}, {"format": "pt"}, bf16)
        weight_map.update({n: fname for n in part})
        total += sum(tensors[n].size * (2 if n in bf16 else tensors[n].itemsize) for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
