"""ggml's own encoders through ctypes: the libggml that llama-cpp-python installs.

``quantize_rows`` is llama.cpp's quantizer exactly as ``llama-quantize`` runs it
(``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)``, the imatrix being one
importance per input column); ``to_float`` is ggml's own decoder (``ggml_get_type_traits(type)->to_float``).

``LibGGMLGrid`` wraps it as a driver grid with ``unit = block`` (256 for the k- and i-quants): ggml
quantizes the whole block with our column importance as its imatrix, the driver compensates the later
blocks only (nothing inside a block). It is the default grid of the lattice types not in
``grids.registry.OUR_LATTICE`` (``iq2_xxs``, ``iq2_s``, ``iq3_s``; ``iq2_xs`` is ``grids.lattice``'s, GPTQ
one group of 8 columns at a time), and as ``ggml-<type>`` the reference for every type (``ggml-q2_k``,
``ggml-iq2_xs``, ...) to measure our own encoders against. For the lattice types ``refit`` alternates two closed-form
steps with the lattice points and signs fixed: the fp16 super-block scale ``d`` by weighted least
squares, then each 4-bit sub-block scale (floor and ceil of its least-squares value); each is kept per
row / sub-block only where the weighted error drops. The reference k-quants are left as ggml made them.

NumPy and ctypes; the grid methods take and return torch tensors on any device.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from formats import ggml_tensor as gt
from formats.errors import QdllmError
from formats.ggml_tensor import GGMLTensor

LATTICE = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_s")


@dataclass(frozen=True)
class SubScales:
    """Where a lattice type keeps its 4-bit sub-block scales ``s_j`` and what they multiply: every value of
    sub-block ``j`` (``sub`` elements) is ``d * mult(s_j) * (grid * sign)``; ``s_j`` sits in byte
    ``offset[j]`` of the block at bit ``shift[j]`` (ggml-common.h; the fp16 ``d`` is bytes 0-1)."""

    sub: int
    offset: tuple[int, ...]
    shift: tuple[int, ...]
    half: bool  # mult(s) = (0.5 + s) / 4 if half else 1 + 2 s

    def mult(self, s: np.ndarray) -> np.ndarray:
        return (0.5 + s) * 0.25 if self.half else 1.0 + 2.0 * s

    def inverse(self, m: np.ndarray) -> np.ndarray:
        return m * 4.0 - 0.5 if self.half else (m - 1.0) / 2.0


def _nibbles(base: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(base + j // 2 for j in range(n)), tuple(4 * (j % 2) for j in range(n))


SUBSCALES = {
    "IQ2_XXS": SubScales(32, tuple(2 + 8 * j + 7 for j in range(8)), (4,) * 8, True),
    "IQ2_XS": SubScales(16, *_nibbles(66, 16), True),
    "IQ2_S": SubScales(16, *_nibbles(74, 16), True),
    "IQ3_S": SubScales(32, *_nibbles(106, 8), False),
}


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """libggml-base of llama-cpp-python, with the signatures set; QdllmError naming the extra if absent."""
    spec = importlib.util.find_spec("llama_cpp")
    path = None if spec is None or not spec.submodule_search_locations else \
        os.path.join(spec.submodule_search_locations[0], "lib", "libggml-base.so")
    if path is None or not os.path.exists(path):
        raise QdllmError("ggml's own encoders need llama-cpp-python: pip install 'qdllm-export[llamacpp]'")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    try:
        load()
        return True
    except QdllmError:
        return False


def type_id(ggml_type: str) -> int:
    """ggml's enum value of a type named as gguf-py names it; checked against libggml's own traits."""
    from gguf import GGMLQuantizationType

    tid = int(GGMLQuantizationType[ggml_type].value)
    tr = load().ggml_get_type_traits(tid).contents
    if tr.type_name.decode().upper() != ggml_type or (tr.blck_size, tr.type_size) != gt.type_info(ggml_type):
        raise QdllmError(f"libggml's type {tid} is {tr.type_name!r}, not {ggml_type}: llama-cpp-python and gguf-py disagree")
    return tid


def requires_imatrix(ggml_type: str) -> bool:
    return bool(load().ggml_quantize_requires_imatrix(type_id(ggml_type)))


def quantize_rows(x: np.ndarray, ggml_type: str, imatrix: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """ggml's encoder: float32 ``x [n, k]`` -> uint8 ``[n, k / block * type_size]``. ``imatrix [k]``:
    column importance (None: ggml's no-imatrix path; ones where the type requires an imatrix)."""
    lib, tid = load(), type_id(ggml_type)
    block, size = gt.type_info(ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = x.shape
    if k % block:
        raise QdllmError(f"{ggml_type}: rows of {k} are not a multiple of its block of {block}")
    if not np.isfinite(x).all():
        raise QdllmError(f"{ggml_type}: the weight holds NaN or inf values")
    if imatrix is None and lib.ggml_quantize_requires_imatrix(tid):
        imatrix = np.ones(k, np.float32)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(k)
    out = np.zeros((n, k // block * size), np.uint8)
    lib.ggml_quantize_init(tid)
    threads = max(1, min(threads or os.cpu_count() or 1, n // 16 or 1))
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def run(i: int) -> None:
        r0, r1 = bounds[i], bounds[i + 1]
        if r1 > r0:
            lib.ggml_quantize_chunk(tid, x[r0:].ctypes.data, out[r0:].ctypes.data, 0, int(r1 - r0), k,
                                    None if imat is None else imat.ctypes.data)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(run, range(threads)))
    return out


def to_float(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    """ggml's own decoder: uint8 rows -> float32 ``shape``."""
    tr = load().ggml_get_type_traits(type_id(ggml_type)).contents
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.to_float)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    y = np.zeros(shape, np.float32)
    fn(data.ctypes.data, y.ctypes.data, y.size)
    return y


@dataclass
class LibState:
    imp: np.ndarray | None  # [block] float32 importance
    data: np.ndarray | None = None  # uint8 [n, type_size] once rounded


class LibGGMLGrid:
    """A ggml type quantized by libggml a super-block at a time (``unit = block``); see the module doc."""

    def __init__(self, ggml_type: str, name: str | None = None, rounds: int = 2):
        self.ggml_type = ggml_type.upper()
        self.block, self.type_size = gt.type_info(self.ggml_type)
        self.unit = self.block
        self.name = name or ggml_type.lower()
        self.sub = SUBSCALES.get(self.ggml_type)  # None: no refit (ggml's own k-quants, the reference)
        self.rounds = rounds
        type_id(self.ggml_type)  # fails early without llama-cpp-python

    def bits_per_weight(self, n_in: int) -> float:
        return 8.0 * self.type_size / self.block

    def _decode(self, data: np.ndarray) -> np.ndarray:
        """ggml's own decoder (C; the tests check it equals gguf-py's bit for bit) -> float32 [n, block]."""
        return to_float(data, self.ggml_type, (data.shape[0], self.block))

    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> LibState:
        return LibState(None if imp is None else imp.detach().to(torch.float32).cpu().numpy())

    def round(self, st: LibState, c: int, w: torch.Tensor) -> torch.Tensor:
        if c != 0 or w.shape[1] != self.block:
            raise QdllmError(f"{self.name}: rounds whole blocks of {self.block} columns")
        st.data = quantize_rows(w.detach().to(torch.float32).cpu().numpy(), self.ggml_type, st.imp)
        return torch.from_numpy(self._decode(st.data)).to(w.device)

    def refit(self, st: LibState, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        if refit and self.sub is not None:
            Tn = T.detach().to(torch.float32).cpu().numpy()
            w = np.ones(self.block, np.float32) if st.imp is None else st.imp
            for _ in range(self.rounds):
                st.data = self._refit_d(st.data, Tn, w)
                st.data = self._refit_sub(st.data, Tn, w)
        return torch.from_numpy(self._decode(st.data)).to(T.device)

    def _sub_errors(self, data: np.ndarray, T: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Weighted error per row and sub-block ``[n, S]`` of the decoded ``data`` against ``T``."""
        e = w * (self._decode(data) - T) ** 2
        return e.reshape(e.shape[0], -1, self.sub.sub).sum(-1)

    def _refit_d(self, data: np.ndarray, T: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The least-squares fp16 ``d`` per row with every other field fixed; kept where the error drops."""
        unit = data.copy()
        unit[:, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
        a = self._decode(unit)  # the values for d = 1
        saa, sax = (w * a * a).sum(1), (w * a * T).sum(1)
        d = data[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
        d_new = np.where(saa > 0, sax / np.maximum(saa, 1e-30), d).clip(-65504, 65504).astype(np.float16)
        cand = data.copy()
        cand[:, :2] = d_new.reshape(-1, 1).view(np.uint8)
        better = self._sub_errors(cand, T, w).sum(1) < self._sub_errors(data, T, w).sum(1)
        return np.where(better[:, None], cand, data)

    def _set_sub(self, data: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``data`` with sub-scale ``s [n, S]`` (integers in 0..15) written into every block."""
        out = data.copy()
        for j, (o, sh) in enumerate(zip(self.sub.offset, self.sub.shift)):
            out[:, o] = (out[:, o] & ~np.uint8(15 << sh)) | (s[:, j].astype(np.uint8) << sh)
        return out

    def _refit_sub(self, data: np.ndarray, T: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Each sub-block's 4-bit scale from its least-squares fit with the lattice points and ``d`` fixed
        (floor and ceil tried); kept per sub-block where the error drops."""
        sp, n = self.sub, data.shape[0]
        S = len(sp.offset)
        base = self._set_sub(data, np.zeros((n, S)))
        base[:, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
        g = (self._decode(base) / np.float32(sp.mult(0.0))).reshape(n, S, sp.sub)  # grid * sign
        wt, Tb = w.reshape(1, S, sp.sub), T.reshape(n, S, sp.sub)
        sgg, sgx = (wt * g * g).sum(-1), (wt * g * Tb).sum(-1)
        d = data[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)[:, None]
        ok = (sgg > 0) & (d != 0)
        target = sp.inverse(np.where(ok, sgx / np.where(ok, sgg * d, 1.0), sp.mult(0.0)))
        cur = self._sub_errors(data, T, w)
        for f in (np.floor, np.ceil):
            cand = self._set_sub(data, np.clip(f(target), 0, 15))
            err = self._sub_errors(cand, T, w)
            keep = (err < cur) & ok
            for j, (o, sh) in enumerate(zip(sp.offset, sp.shift)):
                m = np.uint8(15 << sh)
                data[:, o] = np.where(keep[:, j], (data[:, o] & ~m) | (cand[:, o] & m), data[:, o])
            cur = np.where(keep, err, cur)
        return data

    def pack(self, states: list[LibState], shape: tuple[int, int], name: str) -> GGMLTensor:
        data = np.concatenate([st.data for st in states], axis=1)
        return GGMLTensor(shape, self.ggml_type, data, name=name)
