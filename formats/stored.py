"""The kinds of stored quantized linear: one dataclass per runtime grid, one registry that names them.

=========  ==========================  ================================  =============================
kind       dataclass                   runs in                           parameters in the record
=========  ==========================  ================================  =============================
planes     ``qtensor.QuantizedTensor``  qdllm kernels (NumPy, ONNX)       group_size
ggml       ``ggml_tensor.GGMLTensor``   stock llama.cpp, NumPy            ggml_type
nbits      ``nbits.NBitsTensor``        stock onnxruntime, NumPy          bits, block_size
=========  ==========================  ================================  =============================

Every kind has ``shape``, ``name``, ``meta``, ``dequantize() -> float32 [n_out, n_in]``,
``stored_bits()``, ``bits_per_weight()``, ``arrays()`` (its stored fields by name) and
``permute_rows(perm)``; ``record_of`` / ``from_record`` turn one into the checkpoint record's entry and
back. NumPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from formats.errors import FormatError
from formats.nbits import NBitsTensor
from formats.qtensor import QuantizedTensor


def _ggml_cls() -> type:
    from formats.ggml_tensor import GGMLTensor

    return GGMLTensor


def kind_of(t: Any) -> str | None:
    """'planes' | 'ggml' | 'nbits' for a stored quantized tensor, None for anything else (a float array)."""
    if isinstance(t, QuantizedTensor):
        return "planes"
    if isinstance(t, NBitsTensor):
        return "nbits"
    if type(t).__name__ == "GGMLTensor" and isinstance(t, _ggml_cls()):
        return "ggml"
    return None


def is_stored(t: Any) -> bool:
    """True for a quantized tensor of any kind."""
    return kind_of(t) is not None


def record_of(t: Any) -> dict[str, Any]:
    """The parameters that, with the stored arrays and the shape, rebuild ``t``."""
    kind = kind_of(t)
    if kind == "planes":
        return {"kind": kind, "group_size": int(t.group_size)}
    if kind == "nbits":
        return {"kind": kind, "bits": int(t.bits), "block_size": int(t.block_size)}
    if kind == "ggml":
        return {"kind": kind, "ggml_type": str(t.ggml_type)}
    raise TypeError(f"not a stored quantized tensor: {type(t).__name__}")


def required_fields(info: dict[str, Any]) -> tuple[str, ...]:
    """Names of the arrays a record entry needs (a record without 'kind' is planes, format version 1)."""
    kind = info.get("kind", "planes")
    if kind == "planes":
        return ("planes", "signs", "row_scale", "col_scale")
    if kind == "nbits":
        from formats.nbits import FIELDS

        return FIELDS
    if kind == "ggml":
        return ("data",)
    raise FormatError(f"unknown quantized tensor kind {kind!r}")


def from_record(shape: tuple[int, int], info: dict[str, Any], arrays: dict[str, np.ndarray], name: str = "",
                meta: dict[str, Any] | None = None) -> Any:
    """The stored tensor of a record entry ``info`` (from :func:`record_of`) and its arrays."""
    kind = info.get("kind", "planes")
    if kind == "planes":
        return QuantizedTensor.from_arrays(shape, int(info["group_size"]), arrays, name=name, meta=meta)
    if kind == "nbits":
        return NBitsTensor.from_arrays(shape, int(info["bits"]), int(info["block_size"]), arrays, name=name, meta=meta)
    if kind == "ggml":
        return _ggml_cls().from_arrays(shape, str(info["ggml_type"]), arrays, name=name, meta=meta)
    raise FormatError(f"tensor {name}: unknown quantized tensor kind {kind!r}")
