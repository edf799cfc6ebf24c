"""ggml weights: the stored tensor of the stock-llama.cpp GGUF outtypes, and the exact block packers.

A linear weight ``W [n_out, n_in]`` (PyTorch layout = ggml's ``ne = [n_in, n_out]``) in a ggml type is
``data`` uint8 ``[n_out, n_in / block * type_size]``: each row is its blocks' bytes one after the other,
exactly what a GGUF tensor holds. The decoder is gguf-py's ``gguf.quants.dequantize`` (an independent
NumPy copy of ggml's ``dequantize_row_*``), so ``dequantize()`` is what llama.cpp computes.

The packers turn integer codes and scale fields into those bytes (layouts of ``ggml-common.h``). Each
takes per-block arrays with any leading shape ``[...]`` and returns ``[..., type_size]`` uint8; scales
given as float32 must already hold fp16 values (they are stored as fp16 without further rounding).

=======  =====  ====  =================================================================================
type     block  size  value of element i (sub-block j = i // sub), fields as the packer takes them
=======  =====  ====  =================================================================================
Q8_0     32     34    d * q,                       q int8 in [-128, 127]
Q4_0     32     18    d * q,                       q in [-8, 7]
Q5_0     32     22    d * q,                       q in [-16, 15]
Q4_1     32     20    d * q + m,                   q in [0, 15], m fp16
Q5_1     32     24    d * q + m,                   q in [0, 31], m fp16
IQ4_NL   32     18    d * KVALUES_IQ4NL[q],        q in [0, 15]
Q2_K     256    84    (d * sc_j) * q - dmin * m_j, q in [0, 3],  sc, m in [0, 15], sub 16
Q3_K     256    110   (d * sc_j) * q,              q in [-4, 3], sc in [-32, 31], sub 16
Q4_K     256    144   (d * sc_j) * q - dmin * m_j, q in [0, 15], sc, m in [0, 63], sub 32
Q5_K     256    176   (d * sc_j) * q - dmin * m_j, q in [0, 31], sc, m in [0, 63], sub 32
Q6_K     256    210   (d * sc_j) * q,              q in [-32, 31], sc in [-128, 127], sub 16
=======  =====  ====  =================================================================================

All arithmetic is float32 in that order (ggml's and gguf-py's). NumPy and gguf-py only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from formats.errors import QdllmError

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FIELDS = ("data",)
FLOAT_TYPES = ("F32", "F16", "BF16")


def type_info(ggml_type: str) -> tuple[int, int]:
    """``(block, type_size)`` of a ggml type named as gguf-py names it (``"Q2_K"``); QdllmError if unknown."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    except KeyError:
        raise QdllmError(f"unknown ggml type {ggml_type!r}") from None


def _decodable(ggml_type: str) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    return ggml_type in FLOAT_TYPES or GGMLQuantizationType[ggml_type] in _type_traits


@dataclass(eq=False)
class GGMLTensor:
    """One linear weight in a ggml type; see the module docstring."""

    shape: tuple[int, int]  # (n_out, n_in)
    ggml_type: str  # gguf-py's name: "Q2_K", "IQ2_XS", "Q8_0", "F16", ...
    data: np.ndarray  # uint8 [n_out, n_in / block * type_size]
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.ggml_type = str(self.ggml_type).upper()
        self.validate()

    def _fail(self, msg: str) -> None:
        raise QdllmError(f"ggml tensor {self.name or '<unnamed>'}: {msg}")

    def validate(self) -> None:
        n_out, n_in = self.shape
        try:
            block, size = type_info(self.ggml_type)
        except QdllmError:
            self._fail(f"unknown ggml type {self.ggml_type!r}")
        if not _decodable(self.ggml_type):
            self._fail(f"ggml type {self.ggml_type} cannot be decoded by gguf-py")
        if n_out <= 0 or n_in <= 0 or n_in % block:
            self._fail(f"n_in={n_in} is not a positive multiple of {self.ggml_type}'s block of {block}")
        want = (n_out, n_in // block * size)
        d = self.data
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != want:
            self._fail(f"data is {(getattr(d, 'shape', None), getattr(d, 'dtype', None))}, expected {want} uint8")

    def dequantize(self) -> np.ndarray:
        """float32 ``[n_out, n_in]`` decoded by gguf-py (ggml's own arithmetic)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        data = np.ascontiguousarray(self.data)
        if self.ggml_type == "F32":
            return data.view(np.float32).reshape(self.shape).copy()
        if self.ggml_type == "F16":
            return data.view(np.float16).astype(np.float32).reshape(self.shape)
        out = dequantize(data, GGMLQuantizationType[self.ggml_type])
        return np.asarray(out, dtype=np.float32).reshape(self.shape)

    def stored_bits(self) -> int:
        return 8 * int(self.data.nbytes)

    def bits_per_weight(self) -> float:
        return self.stored_bits() / (self.shape[0] * self.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"data": self.data}

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], ggml_type: str, arrays: dict[str, np.ndarray], name: str = "",
                    meta: dict[str, Any] | None = None) -> "GGMLTensor":
        if "data" not in arrays:
            raise QdllmError(f"ggml tensor {name or '<unnamed>'}: missing field 'data'")
        return cls(shape, ggml_type, np.asarray(arrays["data"]), name=name, meta=dict(meta or {}))

    def permute_rows(self, perm: np.ndarray) -> "GGMLTensor":
        return GGMLTensor(self.shape, self.ggml_type, np.ascontiguousarray(self.data[perm]), self.name, dict(self.meta))

    def rows(self, start: int, stop: int, name: str = "") -> "GGMLTensor":
        """Rows ``start:stop`` as a tensor of their own (ggml rows are independent)."""
        return GGMLTensor((stop - start, self.shape[1]), self.ggml_type, np.ascontiguousarray(self.data[start:stop]),
                          name or self.name, dict(self.meta))


def from_blocks(blocks: np.ndarray, ggml_type: str, name: str = "", meta: dict[str, Any] | None = None) -> GGMLTensor:
    """A :class:`GGMLTensor` from packed blocks ``[n_out, n_blocks, type_size]`` uint8."""
    block, size = type_info(ggml_type)
    n_out, nb, s = blocks.shape
    if s != size:
        raise QdllmError(f"ggml tensor {name or '<unnamed>'}: blocks of {s} bytes, {ggml_type} has {size}")
    return GGMLTensor((n_out, nb * block), ggml_type, np.ascontiguousarray(blocks.reshape(n_out, nb * size)),
                      name=name, meta=dict(meta or {}))


# ---------------------------------------------------------------------------------------------- packing


def _ints(a: Any, lo: int, hi: int, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size and (a.min() < lo or a.max() > hi):
        raise QdllmError(f"ggml packing: {what} outside [{lo}, {hi}]")
    return a.astype(np.int64)


def _f16(x: Any, what: str) -> np.ndarray:
    """fp16 bytes ``[..., 2]`` of float values that must already be exact fp16 values."""
    x = np.asarray(x, dtype=np.float32)
    h = x.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), x, equal_nan=False):
        raise QdllmError(f"ggml packing: {what} holds values that are not exact fp16 (or are not finite)")
    return np.ascontiguousarray(h.astype("<f2")).view(np.uint8).reshape(x.shape + (2,))


def _or_shift(a: np.ndarray, step: int) -> np.ndarray:
    """``OR_k a[..., k, :] << (step * k)`` over the second-to-last axis -> uint8 ``[..., M]``."""
    sh = (np.arange(a.shape[-2], dtype=np.uint8) * step)[:, None]
    return (a.astype(np.uint8) << sh).sum(axis=-2, dtype=np.uint8)  # the low 8 bits: as in uint32, 4x less memory


def _cat(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=-1)


def _nibbles32(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of 32 codes ``[..., 32]``: element j in the low nibble of byte j, 16 + j in the high."""
    return _or_shift((q & 15).reshape(q.shape[:-1] + (2, 16)), 4)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K / Q5_K from 8 6-bit scales and mins ``[..., 8]``."""
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return _cat(lo, mid, hi)


def pack_q8_0(q: Any, d: Any) -> np.ndarray:
    """``q [..., 32]`` in [-128, 127], ``d [...]`` -> ``[..., 34]``."""
    q = _ints(q, -128, 127, "Q8_0 codes")
    return _cat(_f16(d, "Q8_0 d"), q.astype(np.int8).view(np.uint8))


def pack_q4_0(q: Any, d: Any) -> np.ndarray:
    """``q [..., 32]`` in [-8, 7], ``d [...]`` -> ``[..., 18]``."""
    return _cat(_f16(d, "Q4_0 d"), _nibbles32(_ints(q, -8, 7, "Q4_0 codes") + 8))


def pack_iq4_nl(q: Any, d: Any) -> np.ndarray:
    """``q [..., 32]`` indices in [0, 15] into ``KVALUES_IQ4NL``, ``d [...]`` -> ``[..., 18]``."""
    return _cat(_f16(d, "IQ4_NL d"), _nibbles32(_ints(q, 0, 15, "IQ4_NL codes")))


def _qh32(u: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 codes as a little-endian uint32: bit j = element j -> ``[..., 4]``."""
    return _or_shift(((u >> 4) & 1).reshape(u.shape[:-1] + (4, 8)).swapaxes(-1, -2), 1)


def pack_q5_0(q: Any, d: Any) -> np.ndarray:
    """``q [..., 32]`` in [-16, 15], ``d [...]`` -> ``[..., 22]``."""
    u = _ints(q, -16, 15, "Q5_0 codes") + 16
    return _cat(_f16(d, "Q5_0 d"), _qh32(u), _nibbles32(u))


def pack_q4_1(q: Any, d: Any, m: Any) -> np.ndarray:
    """``q [..., 32]`` in [0, 15], ``d, m [...]`` -> ``[..., 20]``."""
    return _cat(_f16(d, "Q4_1 d"), _f16(m, "Q4_1 m"), _nibbles32(_ints(q, 0, 15, "Q4_1 codes")))


def pack_q5_1(q: Any, d: Any, m: Any) -> np.ndarray:
    """``q [..., 32]`` in [0, 31], ``d, m [...]`` -> ``[..., 24]``."""
    u = _ints(q, 0, 31, "Q5_1 codes")
    return _cat(_f16(d, "Q5_1 d"), _f16(m, "Q5_1 m"), _qh32(u), _nibbles32(u))


def _crumbs256(q: np.ndarray) -> np.ndarray:
    """2-bit codes ``[..., 256]`` -> ``[..., 64]``: element 128h + 32s + l at bits 2s of byte 32h + l."""
    return _or_shift(q.reshape(q.shape[:-1] + (2, 4, 32)), 2).reshape(q.shape[:-1] + (64,))


def _bits256(b: np.ndarray) -> np.ndarray:
    """1-bit values ``[..., 256]`` -> ``[..., 32]``: element 32k + l at bit k of byte l."""
    return _or_shift(b.reshape(b.shape[:-1] + (8, 32)), 1)


def pack_q2_k(q: Any, sc: Any, m: Any, d: Any, dmin: Any) -> np.ndarray:
    """``q [..., 256]`` in [0, 3], ``sc, m [..., 16]`` in [0, 15], ``d, dmin [...]`` -> ``[..., 84]``."""
    q = _ints(q, 0, 3, "Q2_K codes")
    scales = _ints(sc, 0, 15, "Q2_K scales") | (_ints(m, 0, 15, "Q2_K mins") << 4)
    return _cat(scales, _crumbs256(q), _f16(d, "Q2_K d"), _f16(dmin, "Q2_K dmin"))


def pack_q3_k(q: Any, sc: Any, d: Any) -> np.ndarray:
    """``q [..., 256]`` in [-4, 3], ``sc [..., 16]`` in [-32, 31], ``d [...]`` -> ``[..., 110]``."""
    u = _ints(q, -4, 3, "Q3_K codes") + 4
    s6 = _ints(sc, -32, 31, "Q3_K scales") + 32
    lo = (s6[..., :8] & 15) | ((s6[..., 8:] & 15) << 4)
    hi = _or_shift((s6 >> 4).reshape(s6.shape[:-1] + (4, 4)), 2)
    return _cat(_bits256(u >> 2), _crumbs256(u & 3), lo, hi, _f16(d, "Q3_K d"))


def pack_q4_k(q: Any, sc: Any, m: Any, d: Any, dmin: Any) -> np.ndarray:
    """``q [..., 256]`` in [0, 15], ``sc, m [..., 8]`` in [0, 63], ``d, dmin [...]`` -> ``[..., 144]``."""
    q = _ints(q, 0, 15, "Q4_K codes")
    scales = _scales_k4(_ints(sc, 0, 63, "Q4_K scales"), _ints(m, 0, 63, "Q4_K mins"))
    qs = _or_shift(q.reshape(q.shape[:-1] + (4, 2, 32)), 4).reshape(q.shape[:-1] + (128,))
    return _cat(_f16(d, "Q4_K d"), _f16(dmin, "Q4_K dmin"), scales, qs)


def pack_q5_k(q: Any, sc: Any, m: Any, d: Any, dmin: Any) -> np.ndarray:
    """``q [..., 256]`` in [0, 31], ``sc, m [..., 8]`` in [0, 63], ``d, dmin [...]`` -> ``[..., 176]``."""
    q = _ints(q, 0, 31, "Q5_K codes")
    scales = _scales_k4(_ints(sc, 0, 63, "Q5_K scales"), _ints(m, 0, 63, "Q5_K mins"))
    qs = _or_shift((q & 15).reshape(q.shape[:-1] + (4, 2, 32)), 4).reshape(q.shape[:-1] + (128,))
    return _cat(_f16(d, "Q5_K d"), _f16(dmin, "Q5_K dmin"), scales, _bits256(q >> 4), qs)


def pack_q6_k(q: Any, sc: Any, d: Any) -> np.ndarray:
    """``q [..., 256]`` in [-32, 31], ``sc [..., 16]`` in [-128, 127], ``d [...]`` -> ``[..., 210]``."""
    u = _ints(q, -32, 31, "Q6_K codes") + 32
    lead = u.shape[:-1]
    ql = _or_shift((u & 15).reshape(lead + (2, 2, 64)), 4).reshape(lead + (128,))
    qh = _or_shift((u >> 4).reshape(lead + (2, 4, 32)), 2).reshape(lead + (64,))
    scales = _ints(sc, -128, 127, "Q6_K scales").astype(np.int8).view(np.uint8)
    return _cat(ql, qh, scales, _f16(d, "Q6_K d"))


# ------------------------------------------------------------------------- lattice types (i-quants)
def _bytes_of_bits(b: np.ndarray, width: int = 1) -> np.ndarray:
    """``[..., G, k]`` fields of ``width`` bits -> uint8 ``[..., G]``: field i at bits ``width * i`` of its byte."""
    return _or_shift(np.swapaxes(b, -1, -2), width)


def _signs7(neg: Any, what: str) -> np.ndarray:
    """Sign bits ``[..., 8 * G]`` (1 = negative) -> the 7-bit ``ksigns`` indices ``[..., G]`` int64; each group
    of 8 must hold an even number of negatives (ggml's ``ksigns`` table stores the 8th bit as the parity)."""
    b = _ints(neg, 0, 1, f"{what} sign bits").reshape(np.shape(neg)[:-1] + (-1, 8))
    if (b.sum(-1) % 2).any():
        raise QdllmError(f"ggml packing: {what} has a group of 8 with an odd number of negative signs")
    return (b[..., :7] << np.arange(7)).sum(-1)


def pack_iq2_xxs(idx: Any, neg: Any, sc: Any, d: Any) -> np.ndarray:
    """``idx [..., 32]`` in [0, 255] (iq2xxs_grid), ``neg [..., 256]`` sign bits (even per group of 8),
    ``sc [..., 8]`` in [0, 15], ``d [...]`` -> ``[..., 66]``."""
    q = _ints(idx, 0, 255, "IQ2_XXS grid indices").reshape(np.shape(idx)[:-1] + (8, 4))
    s7 = _signs7(neg, "IQ2_XXS").reshape(q.shape)
    aux = (s7 << (7 * np.arange(4))).sum(-1) | (_ints(sc, 0, 15, "IQ2_XXS scales") << 28)
    aux8 = (aux[..., None] >> (8 * np.arange(4))) & 255
    return _cat(_f16(d, "IQ2_XXS d"), np.concatenate([q, aux8], -1).reshape(q.shape[:-2] + (64,)))


def pack_iq2_xs(idx: Any, neg: Any, sc: Any, d: Any) -> np.ndarray:
    """``idx [..., 32]`` in [0, 511] (iq2xs_grid), ``neg [..., 256]`` sign bits (even per group of 8),
    ``sc [..., 16]`` in [0, 15], ``d [...]`` -> ``[..., 74]``."""
    qs = _ints(idx, 0, 511, "IQ2_XS grid indices") | (_signs7(neg, "IQ2_XS") << 9)
    qs8 = np.stack([qs & 255, qs >> 8], -1).reshape(qs.shape[:-1] + (64,))
    s = _ints(sc, 0, 15, "IQ2_XS scales")
    return _cat(_f16(d, "IQ2_XS d"), qs8, s[..., 0::2] | (s[..., 1::2] << 4))


def pack_iq2_s(idx: Any, neg: Any, sc: Any, d: Any) -> np.ndarray:
    """``idx [..., 32]`` in [0, 1023] (iq2s_grid), ``neg [..., 256]`` free sign bits, ``sc [..., 16]`` in
    [0, 15], ``d [...]`` -> ``[..., 82]``."""
    q = _ints(idx, 0, 1023, "IQ2_S grid indices")
    signs = _bytes_of_bits(_ints(neg, 0, 1, "IQ2_S sign bits").reshape(q.shape[:-1] + (32, 8)))
    qh = _bytes_of_bits((q >> 8).reshape(q.shape[:-1] + (8, 4)), 2)
    s = _ints(sc, 0, 15, "IQ2_S scales")
    return _cat(_f16(d, "IQ2_S d"), q & 255, signs, qh, s[..., 0::2] | (s[..., 1::2] << 4))


def pack_iq3_s(idx: Any, neg: Any, sc: Any, d: Any) -> np.ndarray:
    """``idx [..., 64]`` in [0, 511] (iq3s_grid, 4 values each), ``neg [..., 256]`` free sign bits,
    ``sc [..., 8]`` in [0, 15], ``d [...]`` -> ``[..., 110]``."""
    q = _ints(idx, 0, 511, "IQ3_S grid indices")
    qh = _bytes_of_bits((q >> 8).reshape(q.shape[:-1] + (8, 8)))
    signs = _bytes_of_bits(_ints(neg, 0, 1, "IQ3_S sign bits").reshape(q.shape[:-1] + (32, 8)))
    s = _ints(sc, 0, 15, "IQ3_S scales")
    return _cat(_f16(d, "IQ3_S d"), q & 255, qh, signs, s[..., 0::2] | (s[..., 1::2] << 4))
