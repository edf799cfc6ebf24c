"""ggml's own encoders through ctypes: the libggml that llama-cpp-python installs.

``quantize_rows`` is llama.cpp's quantizer exactly as ``llama-quantize`` runs it
(``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)``, the imatrix being one
importance per input column); ``to_float`` is ggml's own decoder (``ggml_get_type_traits(type)->to_float``).

``LibGGMLGrid`` wraps it as a driver grid with ``unit = block = 256``: ggml quantizes the whole
super-block with our column importance as its imatrix, the driver compensates the later blocks. It is
the grid of the lattice types (``iq2_xxs``, ``iq2_xs``, ``iq2_s``, ``iq3_s``), whose encoders are
searches over E8-lattice codebooks, and a reference for the k-quants (``ggml-q2_k``, ...) to measure
our own encoders against. ``refit`` re-solves the fp16 super-block scale ``d`` in closed form with
every other field fixed (kept per row where the weighted error drops).

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
D_FIRST = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_S", "IQ3_XXS")  # types whose block starts with the fp16 d


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

    def __init__(self, ggml_type: str, name: str | None = None, refit_d: bool = True):
        self.ggml_type = ggml_type.upper()
        block, self.type_size = gt.type_info(self.ggml_type)
        self.block = self.unit = block
        self.name = name or ggml_type.lower()
        self.refit_d = refit_d and self.ggml_type in D_FIRST
        type_id(self.ggml_type)  # fails early without llama-cpp-python

    def bits_per_weight(self, n_in: int) -> float:
        block, size = gt.type_info(self.ggml_type)
        return 8.0 * size / block

    def _decode(self, data: np.ndarray) -> np.ndarray:
        return GGMLTensor((data.shape[0], self.block), self.ggml_type, data).dequantize()

    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> LibState:
        return LibState(None if imp is None else imp.detach().to(torch.float32).cpu().numpy())

    def round(self, st: LibState, c: int, w: torch.Tensor) -> torch.Tensor:
        if c != 0 or w.shape[1] != self.block:
            raise QdllmError(f"{self.name}: rounds whole blocks of {self.block} columns")
        st.data = quantize_rows(w.detach().to(torch.float32).cpu().numpy(), self.ggml_type, st.imp)
        return torch.from_numpy(self._decode(st.data)).to(w.device)

    def refit(self, st: LibState, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        cur = self._decode(st.data)
        if refit and self.refit_d:
            st.data = self._refit_d(st.data, cur, T.detach().to(torch.float32).cpu().numpy(), st.imp)
            cur = self._decode(st.data)
        return torch.from_numpy(cur).to(T.device)

    def _refit_d(self, data: np.ndarray, cur: np.ndarray, T: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
        """The least-squares fp16 ``d`` per row with the lattice codes, signs and sub-scales fixed."""
        w = np.ones(T.shape[1], np.float32) if imp is None else imp
        d = data[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
        unit = data.copy()
        unit[:, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
        a = self._decode(unit)  # the values for d = 1
        saa, sax = (w * a * a).sum(1), (w * a * T).sum(1)
        d_new = np.where(saa > 0, sax / np.maximum(saa, 1e-30), d).clip(-65504, 65504).astype(np.float16)
        cand = data.copy()
        cand[:, :2] = d_new.reshape(-1, 1).view(np.uint8)
        better = (w * (self._decode(cand) - T) ** 2).sum(1) < (w * (cur - T) ** 2).sum(1)
        return np.where(better[:, None], cand, data)

    def pack(self, states: list[LibState], shape: tuple[int, int], name: str) -> GGMLTensor:
        data = np.concatenate([st.data for st in states], axis=1)
        return GGMLTensor(shape, self.ggml_type, data, name=name)
