"""The quantized tensor: binary planes with row and column scales (DESIGN section 3).

A linear weight ``W [n_out, n_in]`` is cut into column blocks of ``G`` (default 128). Block ``j``
holds ``K_j`` binary planes::

    W_hat[:, block j] = mu[:, j] (optional) + sum_{k < K_j} outer(row_scale[p], col_scale[p]) * B_p

``B_p`` in {-1, +1}^{n_out x G}. Planes are numbered order-major, the same order GGUF stores them:
first plane 0 of every block (blocks ascending), then plane 1 of every block with ``K_j > 1``, and
so on. ``plane_index()`` gives, for each plane ``p``, its order ``k`` and block ``j``.

Stored fields (every method writes exactly these; the stored values are the truth):

=============  =========================  =======  ==========================================
field          shape                      dtype    meaning
=============  =========================  =======  ==========================================
planes         [n_blocks]                 uint8    K_j, number of planes of block j (0..8)
signs          [P, n_out, G // 8]         uint8    sign bits, LSB first along columns; 1 -> +1
row_scale      [P, n_out]                 float16  per-row scale of plane p
col_scale      [P, G]                     float16  per-column scale of plane p
mu             [n_out, n_blocks] or None  float16  optional per-row offset of each block
=============  =========================  =======  ==========================================

with ``P = sum(planes)``. ``bits_per_weight()`` counts every stored bit (signs, scales, mu and
one byte per block for ``K_j``) divided by ``n_out * n_in``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from formats.errors import QdllmError

FIELDS = ("planes", "signs", "row_scale", "col_scale", "mu")
MAX_PLANES = 8


def pack_signs(b: np.ndarray) -> np.ndarray:
    """Pack a sign array ``[..., G]`` (values > 0 mean +1) into bits ``[..., G // 8]`` uint8, LSB first."""
    return np.packbits(np.asarray(b) > 0, axis=-1, bitorder="little")


def unpack_signs(bits: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Unpack ``[..., G // 8]`` uint8 bits into +-1 values ``[..., G]`` of ``dtype``."""
    u = np.unpackbits(bits, axis=-1, bitorder="little")
    return (u.astype(dtype) * 2 - 1).astype(dtype, copy=False)


@dataclass(eq=False)
class QuantizedTensor:
    """One quantized linear weight; see the module docstring for the fields."""

    shape: tuple[int, int]  # (n_out, n_in)
    group_size: int
    planes: np.ndarray
    signs: np.ndarray
    row_scale: np.ndarray
    col_scale: np.ndarray
    mu: np.ndarray | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. method; not part of the stored bits

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def n_planes(self) -> int:
        return int(self.planes.astype(np.int64).sum())

    def _fail(self, msg: str) -> None:
        raise QdllmError(f"quantized tensor {self.name or '<unnamed>'}: {msg}")

    def validate(self) -> None:
        """Check shapes, dtypes and finiteness; raise ``QdllmError`` naming the tensor."""
        n_out, n_in = self.shape
        g = self.group_size
        if g <= 0 or g % 8:
            self._fail(f"group size {g} must be a positive multiple of 8")
        if n_in % g:
            self._fail(f"n_in={n_in} is not divisible by the group size {g}")
        nb = n_in // g
        want = {
            "planes": ((nb,), np.uint8),
            "signs": ((None, n_out, g // 8), np.uint8),
            "row_scale": ((None, n_out), np.float16),
            "col_scale": ((None, g), np.float16),
        }
        if self.mu is not None:
            want["mu"] = ((n_out, nb), np.float16)
        for fname, (shp, dt) in want.items():
            arr = getattr(self, fname)
            if not isinstance(arr, np.ndarray):
                self._fail(f"{fname} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != dt:
                self._fail(f"{fname} has dtype {arr.dtype}, expected {np.dtype(dt).name}")
            if arr.ndim != len(shp):
                self._fail(f"{fname} has shape {arr.shape}, expected {len(shp)} dimensions")
        if int(self.planes.max(initial=0)) > MAX_PLANES:
            self._fail(f"a block has {int(self.planes.max())} planes; at most {MAX_PLANES}")
        p = self.n_planes
        for fname, shp in (("signs", (p, n_out, g // 8)), ("row_scale", (p, n_out)), ("col_scale", (p, g))):
            if getattr(self, fname).shape != shp:
                self._fail(f"{fname} has shape {getattr(self, fname).shape}, expected {shp}")
        if self.mu is not None and self.mu.shape != (n_out, nb):
            self._fail(f"mu has shape {self.mu.shape}, expected {(n_out, nb)}")
        for fname in ("row_scale", "col_scale", "mu"):
            arr = getattr(self, fname)
            if arr is not None and not np.isfinite(arr).all():
                self._fail(f"{fname} holds NaN or inf values")

    # ------------------------------------------------------------------ layout
    def plane_index(self) -> list[tuple[int, int]]:
        """``[(k, j), ...]`` for every plane ``p`` in stored order (order-major, blocks ascending)."""
        out = []
        for k in range(int(self.planes.max(initial=0))):
            out.extend((k, j) for j in range(self.n_blocks) if self.planes[j] > k)
        return out

    def order_slices(self) -> list[tuple[np.ndarray, slice]]:
        """For each order ``k``: (block indices with ``K_j > k``, slice of planes ``p`` holding them)."""
        out, start = [], 0
        for k in range(int(self.planes.max(initial=0))):
            blocks = np.nonzero(self.planes > k)[0]
            out.append((blocks, slice(start, start + len(blocks))))
            start += len(blocks)
        return out

    # ------------------------------------------------------------------ math
    def dequantize(self) -> np.ndarray:
        """``W_hat`` as float32 ``[n_out, n_in]``, computed from the stored fields only."""
        n_out, n_in = self.shape
        g = self.group_size
        w = np.zeros((n_out, self.n_blocks, g), np.float32)
        if self.mu is not None:
            w += self.mu.astype(np.float32)[:, :, None]
        rs = self.row_scale.astype(np.float32)
        cs = self.col_scale.astype(np.float32)
        for blocks, sl in self.order_slices():
            b = unpack_signs(self.signs[sl])  # [n_k, n_out, g]
            contrib = rs[sl][:, :, None] * cs[sl][:, None, :] * b  # [n_k, n_out, g]
            w[:, blocks, :] += contrib.transpose(1, 0, 2)
        return w.reshape(n_out, n_in)

    def stored_bits(self) -> int:
        """Every stored bit: signs, fp16 scales and mu, and one byte per block for ``K_j``."""
        n_out, _ = self.shape
        p, g = self.n_planes, self.group_size
        bits = p * n_out * g + 16 * p * (n_out + g) + 8 * self.n_blocks
        if self.mu is not None:
            bits += 16 * n_out * self.n_blocks
        return bits

    def bits_per_weight(self) -> float:
        return self.stored_bits() / (self.shape[0] * self.shape[1])

    def mean_planes(self) -> float:
        return float(self.planes.astype(np.float64).mean())

    # ------------------------------------------------------------------ (de)serialisation
    def arrays(self) -> dict[str, np.ndarray]:
        """The stored fields by name (``mu`` only when present)."""
        d = {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}
        return d

    @classmethod
    def from_arrays(
        cls, shape: tuple[int, int], group_size: int, arrays: dict[str, np.ndarray], name: str = "", meta: dict | None = None
    ) -> "QuantizedTensor":
        missing = [f for f in FIELDS[:4] if f not in arrays]
        if missing:
            raise QdllmError(f"quantized tensor {name}: missing fields {missing}")
        return cls(
            shape=shape,
            group_size=group_size,
            planes=np.asarray(arrays["planes"]),
            signs=np.asarray(arrays["signs"]),
            row_scale=np.asarray(arrays["row_scale"]),
            col_scale=np.asarray(arrays["col_scale"]),
            mu=None if arrays.get("mu") is None else np.asarray(arrays["mu"]),
            name=name,
            meta=dict(meta or {}),
        )

    def permute_rows(self, perm: np.ndarray) -> "QuantizedTensor":
        """The same tensor with output rows reordered: row ``r`` of the result is row ``perm[r]``.

        Exact: every stored field is per-row or per-column, so no value changes (used for llama.cpp's
        Q/K permutation).
        """
        return QuantizedTensor(
            shape=self.shape,
            group_size=self.group_size,
            planes=self.planes,
            signs=np.ascontiguousarray(self.signs[:, perm]),
            row_scale=np.ascontiguousarray(self.row_scale[:, perm]),
            col_scale=self.col_scale,
            mu=None if self.mu is None else np.ascontiguousarray(self.mu[perm]),
            name=self.name,
            meta=dict(self.meta),
        )

    def equal(self, other: "QuantizedTensor") -> bool:
        """Bit-for-bit equality of shape, group size and every stored field."""
        if self.shape != other.shape or self.group_size != other.group_size:
            return False
        if (self.mu is None) != (other.mu is None):
            return False
        return all(np.array_equal(a, other.arrays()[k]) for k, a in self.arrays().items())
