"""The GGUF container, parsed with a bounds check on every read (NumPy only).

gguf-py's ``GGUFReader`` can spin for a very long time on a corrupt array length (it reads past the end
as empty arrays without failing), so ``formats.gguf_read`` uses this parser instead: every read is
checked against the file size, every count against the bytes left, and each failure is a
``FormatError`` naming the file and the byte offset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import FormatError, QdllmError
from formats.gguf_layout import dequantize_q1_0
from formats.safetensors_io import bf16_to_f32

MAGIC = b"GGUF"
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL, _F32 = 8, 9, 7, 6
_MAX_DIMS, _MAX_NAME = 4, 64


class _Parser:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.size = path.stat().st_size
        except OSError as e:
            raise QdllmError(f"{path}: cannot read ({e.strerror})") from None
        if self.size < 24:
            raise FormatError(f"{path}: truncated ({self.size} bytes): not a GGUF file")
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what} (at byte {self.pos}); the file is corrupt or truncated")

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated while reading {what}: needs {n} bytes, {self.size - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, dt: str, what: str) -> Any:
        a = self.take(np.dtype(dt).itemsize, what)
        return a.view(dt)[0].item()

    def string(self, what: str) -> str:
        n = self.scalar("<u8", what)
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR:
            v = self.scalar(_SCALAR[vtype], what)
            if vtype == _F32:  # the shortest decimal that rounds to this float32 (1e-05, not 9.9999997e-06)
                return float(str(np.float32(v)))
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<u4", what)
            count = self.scalar("<u8", what)
            if etype in _SCALAR:
                item = np.dtype(_SCALAR[etype]).itemsize
                if count > (self.size - self.pos) // item:
                    raise self.fail(f"{what}: array of {count} items runs past the end of the file")
                arr = self.take(count * item, what).view(_SCALAR[etype])
                return arr.astype(bool) if etype == _BOOL else np.array(arr)
            if etype == _STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"{what}: array of {count} strings runs past the end of the file")
                return [self.string(what) for _ in range(count)]
            raise self.fail(f"{what}: unsupported array item type {etype}")
        raise self.fail(f"{what}: unknown value type {vtype}")


def _ggml_types() -> tuple[dict[int, str], dict[str, tuple[int, int]]]:
    import gguf

    names = {int(t): t.name for t in gguf.GGMLQuantizationType}
    sizes = {t.name: s for t, s in gguf.GGML_QUANT_SIZES.items()}
    return names, sizes


class TensorInfo:
    __slots__ = ("name", "ggml_type", "ne", "offset", "nbytes")

    def __init__(self, name: str, ggml_type: str, ne: tuple[int, ...], offset: int, nbytes: int):
        self.name, self.ggml_type, self.ne, self.offset, self.nbytes = name, ggml_type, ne, offset, nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        """NumPy (row-major) element shape: ``ne`` reversed."""
        return tuple(reversed(self.ne))


def parse_gguf(path: str | Path) -> tuple[int, dict[str, Any], dict[str, TensorInfo], np.memmap]:
    """(version, metadata, tensor infos by name, memmap) of a GGUF file; only container checks."""
    p = _Parser(Path(path))
    if bytes(p.take(4, "magic")) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(p.data[:4])!r}, expected {MAGIC!r})")
    version = p.scalar("<u4", "version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 or 3; big-endian files are not)")
    n_tensors, n_kv = p.scalar("<u8", "tensor count"), p.scalar("<u8", "metadata count")
    if n_tensors > p.size // 24 or n_kv > p.size // 12:
        raise p.fail(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = p.string("metadata key")
        if key in meta:
            raise p.fail(f"duplicate metadata key {key!r}")
        meta[key] = p.value(p.scalar("<u4", f"type of {key}"), key)
    type_names, sizes = _ggml_types()
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise FormatError(f"{path}: general.alignment {align!r} is not a power of two")
    infos: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        name = p.string("tensor name")
        if not name or len(name.encode()) >= _MAX_NAME:
            raise p.fail(f"tensor name {name[:80]!r} is empty or longer than {_MAX_NAME - 1} bytes")
        n_dims = p.scalar("<u4", f"dimensions of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise p.fail(f"tensor {name} has {n_dims} dimensions (1..{_MAX_DIMS})")
        ne = tuple(p.scalar("<u8", f"shape of {name}") for _ in range(n_dims))
        tcode = p.scalar("<u4", f"type of {name}")
        offset = p.scalar("<u8", f"offset of {name}")
        if tcode not in type_names or type_names[tcode] not in sizes:
            raise p.fail(f"tensor {name} has unknown ggml type {tcode}")
        tname = type_names[tcode]
        block, tsize = sizes[tname]
        if any(d <= 0 or d > 1 << 40 for d in ne) or ne[0] % block:
            raise p.fail(f"tensor {name} has invalid shape {list(ne)} for type {tname}")
        nel = int(np.prod(ne, dtype=object))
        if name in infos:
            raise p.fail(f"duplicate tensor name {name!r}")
        if offset % align:
            raise p.fail(f"tensor {name} data offset {offset} is not aligned to {align}")
        infos[name] = TensorInfo(name, tname, ne, offset, nel // block * tsize)
    start = -(-p.pos // align) * align
    end_prev = 0
    for t in sorted(infos.values(), key=lambda t: t.offset):
        if t.offset < end_prev:
            raise FormatError(f"{path}: tensor {t.name} overlaps the previous tensor's data; the file is corrupt")
        t.offset += start
        if t.offset + t.nbytes > p.size:
            raise FormatError(f"{path}: truncated: tensor {t.name} ends at byte {t.offset + t.nbytes}, "
                              f"the file has {p.size}; re-copy or re-export the file")
        end_prev = t.offset - start + t.nbytes
    return version, meta, infos, p.data


def raw_array(mm: np.memmap, t: TensorInfo) -> np.ndarray:
    """The stored array, memory-mapped: typed for F32/F16/BF16/I*, uint8 rows of blocks otherwise."""
    buf = mm[t.offset : t.offset + t.nbytes]
    plain = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "F64": "<f8"}
    if t.ggml_type in plain:
        return buf.view(plain[t.ggml_type]).reshape(t.shape)
    return buf.reshape(t.shape[:-1] + (t.nbytes // int(np.prod(t.shape[:-1], dtype=np.int64)),))


def dequantize_raw(raw: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 values of a stored array (see ``_raw``) of any float or ggml block type."""
    if ggml_type in ("F32", "F16", "F64"):
        return raw.astype(np.float32)
    if ggml_type == "BF16":
        return bf16_to_f32(raw)
    if ggml_type == "Q1_0":
        return dequantize_q1_0(raw.reshape(-1, raw.shape[-1])).reshape(raw.shape[:-1] + (-1,))
    import gguf

    return gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType[ggml_type]).astype(np.float32)


FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "TQ1_0", "TQ2_0", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                "IQ4_NL", "IQ4_XS", "Q1_0")
