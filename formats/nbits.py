"""onnxruntime ``com.microsoft.MatMulNBits`` weights: the stored tensor of the ``int2/int4/int8`` ONNX outtypes.

A linear weight ``W [n_out, n_in]`` (PyTorch layout) is cut into blocks of ``block_size`` columns; per
row and block: a float scale ``s``, an integer zero point ``z`` in ``[0, 2^bits)`` and codes ``q`` in
``[0, 2^bits)``, with ``W_hat = (q - z) * s``. Stored exactly as MatMulNBits takes them:

==============  ======================================  =======  =====================================
field           shape                                   dtype    meaning
==============  ======================================  =======  =====================================
codes           [n_out, n_blocks, block_size*bits/8]    uint8    q, packed low bits first along n_in
scales          [n_out, n_blocks]                       float16  s (fp16: every value is the stored one)
zero_points     [n_out, ceil(n_blocks*bits/8)]          uint8    z, packed low bits first along blocks
==============  ======================================  =======  =====================================

NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from formats.errors import QdllmError

NBITS = (2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
FIELDS = ("codes", "scales", "zero_points")


def pack_low_first(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers ``q [..., m]`` (each < 2^bits) into bytes ``[..., ceil(m*bits/8)]``, low bits first."""
    q = np.asarray(q, dtype=np.uint8)
    per = 8 // bits
    m = q.shape[-1]
    pad = (-m) % per
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), np.uint8)], axis=-1)
    q = q.reshape(q.shape[:-1] + (-1, per))
    out = np.zeros(q.shape[:-1], np.uint8)
    for i in range(per):
        out |= (q[..., i] << (bits * i)).astype(np.uint8)
    return out


def unpack_low_first(b: np.ndarray, bits: int, m: int) -> np.ndarray:
    """Inverse of :func:`pack_low_first`: ``[..., nbytes]`` uint8 -> ``[..., m]`` uint8."""
    b = np.asarray(b, dtype=np.uint8)
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.stack([(b >> (bits * i)) & mask for i in range(per)], axis=-1).reshape(b.shape[:-1] + (-1,))
    return out[..., :m].astype(np.uint8)


def stored_bits_per_weight(n_in: int, bits: int, block_size: int) -> float:
    """Stored bits per weight of a linear with ``n_in`` columns: codes, fp16 scales, packed zero points."""
    nb = n_in // block_size
    return bits + 16.0 / block_size + 8.0 * ((nb * bits + 7) // 8) / n_in


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, name: str = "") -> "NBitsTensor":
    """Plain round-to-nearest onto the grid, no data: per row and block the range ``[min(w, 0), max(w, 0)]``
    gives ``s = range / (2^bits - 1)`` (rounded to fp16) and ``z = round(-min / s)``. For writers that encode
    float tensors themselves (and tests); the calibrated fit is ``qdllm_export.grids.nbits.NBitsGrid``."""
    w = np.asarray(w, dtype=np.float32)
    n_out, n_in = w.shape
    if bits not in NBITS or block_size not in BLOCK_SIZES or n_in % block_size:
        raise QdllmError(f"tensor {name or '<unnamed>'}: cannot quantize n_in={n_in} to {bits} bits in blocks of {block_size}")
    maxq = 2**bits - 1
    wb = w.reshape(n_out, n_in // block_size, block_size)
    lo, hi = np.minimum(wb.min(-1), 0.0), np.maximum(wb.max(-1), 0.0)
    s = np.clip((hi - lo) / maxq, 2.0**-24, 65504.0).astype(np.float16)
    s32 = s.astype(np.float32)
    z = np.clip(np.round(-lo / s32), 0, maxq)
    q = np.clip(np.round(wb / s32[..., None] + z[..., None]), 0, maxq).astype(np.uint8)
    return NBitsTensor((n_out, n_in), bits, block_size, pack_low_first(q, bits), s, pack_low_first(z.astype(np.uint8), bits),
                       name=name, meta={"method": "rtn"})


@dataclass(eq=False)
class NBitsTensor:
    """One linear weight in MatMulNBits layout; see the module docstring."""

    shape: tuple[int, int]  # (n_out, n_in)
    bits: int
    block_size: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.block_size

    def _fail(self, msg: str) -> None:
        raise QdllmError(f"MatMulNBits tensor {self.name or '<unnamed>'}: {msg}")

    def validate(self) -> None:
        n_out, n_in = self.shape
        if self.bits not in NBITS:
            self._fail(f"bits {self.bits} is not one of {NBITS}")
        if self.block_size not in BLOCK_SIZES or n_in % self.block_size:
            self._fail(f"block size {self.block_size} does not divide n_in={n_in} (or is not one of {BLOCK_SIZES})")
        nb = self.n_blocks
        want = {"codes": ((n_out, nb, self.block_size * self.bits // 8), np.uint8),
                "scales": ((n_out, nb), np.float16),
                "zero_points": ((n_out, (nb * self.bits + 7) // 8), np.uint8)}
        for f, (shape, dtype) in want.items():
            a = getattr(self, f)
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
                got = (getattr(a, "shape", None), getattr(a, "dtype", None))
                self._fail(f"field {f} is {got}, expected {shape} {np.dtype(dtype)}")
        if not np.isfinite(self.scales).all():
            self._fail("scales hold NaN or inf")

    def q(self) -> np.ndarray:
        """Codes as uint8 ``[n_out, n_in]``."""
        return unpack_low_first(self.codes, self.bits, self.block_size).reshape(self.shape)

    def z(self) -> np.ndarray:
        """Zero points as uint8 ``[n_out, n_blocks]``."""
        return unpack_low_first(self.zero_points, self.bits, self.n_blocks)

    def dequantize(self) -> np.ndarray:
        """float32 ``[n_out, n_in]``: ``(q - z) * s`` per block, computed in float32 as onnxruntime does."""
        n_out, n_in = self.shape
        q = self.q().reshape(n_out, self.n_blocks, self.block_size).astype(np.float32)
        z = self.z().astype(np.float32)[..., None]
        return ((q - z) * self.scales.astype(np.float32)[..., None]).reshape(n_out, n_in)

    def stored_bits(self) -> int:
        return 8 * sum(getattr(self, f).nbytes for f in FIELDS)

    def bits_per_weight(self) -> float:
        return self.stored_bits() / (self.shape[0] * self.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], bits: int, block_size: int, arrays: dict[str, np.ndarray],
                    name: str = "", meta: dict[str, Any] | None = None) -> "NBitsTensor":
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise QdllmError(f"MatMulNBits tensor {name or '<unnamed>'}: missing field(s) {missing}")
        return cls(shape, int(bits), int(block_size), *(np.asarray(arrays[f]) for f in FIELDS), name=name, meta=dict(meta or {}))

    def rows(self, start: int, stop: int, name: str = "") -> "NBitsTensor":
        """Rows ``start:stop`` as a tensor of their own (every field is per row)."""
        return NBitsTensor((stop - start, self.shape[1]), self.bits, self.block_size, self.codes[start:stop].copy(),
                           self.scales[start:stop].copy(), self.zero_points[start:stop].copy(), name or self.name,
                           dict(self.meta))

    def permute_rows(self, perm: np.ndarray) -> "NBitsTensor":
        return NBitsTensor(self.shape, self.bits, self.block_size, self.codes[perm], self.scales[perm],
                           self.zero_points[perm], self.name, dict(self.meta))
