"""The token embedding and the LM head: the precision they ship in, chosen once, where the model is made.

A quantized checkpoint holds ``token_embd`` and ``output`` in the type that every file written from it
holds (DESIGN.md section 10, docs/gguf-format.md section 4b): a ggml type (a ``GGMLTensor``; default
Q4_K for the embedding and Q6_K for the head, llama-quantize's choice at 2-4 bits, with llama.cpp's
fallback where 256 does not divide the width) or a float type (f16 / f32). The writers copy what is stored.

The pipeline encodes the embedding first, so calibration runs through the table as shipped, and the head
last, weighted by the importance of its input columns (mean square of the normed final hidden states of the
quantized model over the calibration windows: what a llama.cpp imatrix holds for ``output.weight``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from formats.errors import QdllmError
from formats.gguf_types import DEFAULT_EMBED, EMBED_CHOICES, EMBED_ROLES
from formats.stored import is_stored

TABLES = EMBED_ROLES  # (token_embd, output): formats.gguf_types names them once
FLOATS = {"f32": np.float32, "f16": np.float16}


@dataclass(frozen=True)
class TablesSpec:
    """Types of ``token_embd`` (``embed_type``) and ``output`` (``head_type``): one of ``EMBED_CHOICES``
    (f32, f16, q8_0, q6_k, q5_k, q4_k, q3_k, q2_k)."""

    embed_type: str = DEFAULT_EMBED[0]
    head_type: str = DEFAULT_EMBED[1]

    def __post_init__(self) -> None:
        for flag, t in (("--embed-type", self.embed_type), ("--head-type", self.head_type)):
            if t not in EMBED_CHOICES:
                raise QdllmError(f"{flag} {t!r} is not one of {', '.join(EMBED_CHOICES)}")

    def type_of(self, name: str) -> str:
        return self.embed_type if name == TABLES[0] else self.head_type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_table(name: str, w: np.ndarray, ggml_type: str, importance: np.ndarray | None = None,
                 device: str = "cpu") -> Any:
    """``w`` float32 ``[rows, n_in]`` in ``ggml_type``: a float array (f32 / f16, or f16 where no ggml
    type fits the width) or a ``GGMLTensor``. ``importance`` float32 ``[n_in]`` weights the columns."""
    if not np.isfinite(w).all():
        raise QdllmError(f"tensor {name} holds NaN or inf values; fix the checkpoint")
    if ggml_type in FLOATS:
        return _float(name, w, ggml_type)
    enc = GridEncoder({name: importance} if importance is not None else None, device=device)
    t = enc.type_of(name, ggml_type, int(w.shape[1]))
    return _float(name, w, "f16") if t == "F16" else enc.encode(name, np.ascontiguousarray(w, np.float32), t)


def _float(name: str, w: np.ndarray, t: str) -> np.ndarray:
    if t == "f16" and np.abs(w).max() > np.finfo(np.float16).max:
        raise QdllmError(f"tensor {name} overflows float16 (|w| > 65504); use --embed-type / --head-type f32")
    return np.ascontiguousarray(w, FLOATS[t])


def table_values(t: Any) -> np.ndarray:
    """float32 values of a stored table (a ``GGMLTensor`` or a float array)."""
    return t.dequantize() if is_stored(t) else np.asarray(t, np.float32)


def type_name(t: Any) -> str:
    """The type a stored table is held in, as llama.cpp names it: ``Q4_K``, ``F16``, ``F32``."""
    if is_stored(t):
        return str(t.ggml_type)
    return {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}[np.asarray(t).dtype]


class GridEncoder:
    """``token_embd`` / ``output`` in a ggml type (``formats.gguf_types.TensorEncoder``): ggml's own encoder
    through libggml (what llama-quantize applies to these tensors; fast) when llama-cpp-python is
    installed, else qdllm's grid with plain rounding. ``importance``: llama.cpp name -> column importance
    ``[n_in]`` (e.g. ``output.weight`` from an imatrix)."""

    def __init__(self, importance: dict[str, np.ndarray] | None = None, device: str = "cpu"):
        self.importance = dict(importance or {})
        self.device = device

    def type_of(self, name: str, ggml_type: str, n_in: int) -> str:
        from qdllm_export.grids.registry import fallback_type

        t = fallback_type(ggml_type.lower(), n_in)
        return "F16" if t == "f16" else t.upper()

    def encode(self, name: str, w: np.ndarray, ggml_type: str) -> Any:
        from formats.ggml_tensor import GGMLTensor
        from qdllm_export.grids import libggml

        imp = self.importance.get(name)
        if libggml.available():
            return GGMLTensor(w.shape, ggml_type, libggml.quantize_rows(w, ggml_type, imp), name=name)
        return _grid_encode(name, w, ggml_type, imp, self.device)


def _grid_encode(name: str, w: np.ndarray, ggml_type: str, imp: np.ndarray | None, device: str,
                 rows: int = 4096) -> Any:
    """qdllm's grid fit of ``w`` float32 ``[n, k]`` (rows are independent: done ``rows`` at a time)."""
    import torch

    from formats.ggml_tensor import GGMLTensor
    from qdllm_export.grids import GridConfig
    from qdllm_export.grids.base import grid_quantize
    from qdllm_export.grids.registry import GGML_GRIDS

    grid = GGML_GRIDS[ggml_type.lower()]()
    cfg = GridConfig(rounding="rtn" if imp is None else "importance")
    H = None if imp is None else torch.diag(torch.from_numpy(imp).to(device))
    parts = []
    for r0 in range(0, w.shape[0], rows):
        W = torch.from_numpy(np.ascontiguousarray(w[r0 : r0 + rows])).to(device)
        parts.append(grid_quantize(W, H, grid, cfg, name=name).stored.data)
    return GGMLTensor(w.shape, ggml_type, np.concatenate(parts), name=name)

