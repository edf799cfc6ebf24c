"""The output types of a GGUF file (``formats.gguf``): the stock ggml types of the linears and llama.cpp's
``general.file_type`` of each, the types ``token_embd`` / ``output`` may take and their defaults, and the
encoders of those two float tensors (``TensorEncoder``; gguf-py's own for the simple types)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from formats.errors import QdllmError

# outtype -> (ggml type of the linears, llama.cpp's LlamaFileType for general.file_type). These are the
# weight types llama.cpp runs for llada / dream that qdllm-export quantizes into. (gguf-py 0.19 has no
# Q2_0, so q2_0 is not offered; Q1_0 is a ggml type, but gguf-py cannot decode it as a GGMLTensor.)
STOCK_TYPES: dict[str, tuple[str, int]] = {
    "q2_k": ("Q2_K", 10), "q3_k": ("Q3_K", 11), "q4_k": ("Q4_K", 14), "q5_k": ("Q5_K", 16), "q6_k": ("Q6_K", 18),
    "q8_0": ("Q8_0", 7), "iq2_xs": ("IQ2_XS", 20), "iq2_s": ("IQ2_S", 28), "iq3_s": ("IQ3_S", 26),
}
# LlamaFileType of every other type a stock file may hold (fallbacks, auto mixes)
_MORE_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "IQ2_XXS": 19, "IQ3_XXS": 23,
                    "IQ4_NL": 25, "IQ4_XS": 30, "Q1_0": 40}
PLANES = "planes"
OUTTYPE_ALIASES = {"quantized": PLANES}  # the binary-plane outtype's first name
OUTTYPES = (PLANES, *STOCK_TYPES, "auto", "f16", "f32")
EMBED_TYPES = ("f32", "f16", "q8_0")  # types of token_embd / output formats.gguf encodes without an encoder
EMBED_CHOICES = ("f32", "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")  # what the CLI offers for them
EMBED_ROLES = ("token_embd.weight", "output.weight")
DEFAULT_EMBED = ("q4_k", "q6_k")  # (token_embd, output) of planes and the 2-4 bit types: llama-quantize's
#                                   rule for the head (Q6_K) and a 4-bit token table


def default_embed_types(outtype: str) -> tuple[str, str]:
    """(token_embd, output) types of an outtype: floats stay floats, q8_0 stays q8_0, q5_k / q6_k use their own
    type for token_embd, every other outtype ``DEFAULT_EMBED``."""
    outtype = canonical_outtype(outtype)
    if outtype in ("f16", "f32"):
        return outtype, outtype
    if outtype == "q8_0":
        return "q8_0", "q8_0"
    if outtype in ("q5_k", "q6_k"):
        return outtype, "q6_k"
    return DEFAULT_EMBED


def canonical_outtype(outtype: str) -> str:
    """``outtype`` with old names mapped to the current ones (``quantized`` -> ``planes``)."""
    return OUTTYPE_ALIASES.get(outtype, outtype)


class TensorEncoder(Protocol):
    """Encodes a float tensor (``token_embd`` / ``output``) in a ggml block type."""

    def type_of(self, name: str, ggml_type: str, n_in: int) -> str:
        """The type a tensor with rows of ``n_in`` gets when ``ggml_type`` (gguf-py's name) is asked for
        (the asked type, or its fallback when the type's block does not divide ``n_in``)."""
        ...

    def encode(self, name: str, w: np.ndarray, ggml_type: str) -> Any:
        """``w`` float32 ``[rows, n_in]`` as a ``GGMLTensor`` of type ``type_of(name, ggml_type, n_in)``."""
        ...


class GGUFPyEncoder:
    """gguf-py's own quantizers: the simple types only (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)."""

    TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

    def type_of(self, name: str, ggml_type: str, n_in: int) -> str:
        if ggml_type not in self.TYPES:
            raise QdllmError(f"tensor {name}: type {ggml_type.lower()} needs qdllm-export's encoder "
                             f"(qdllm_export.targets.ggml.GridEncoder); formats encodes {', '.join(EMBED_TYPES)} itself")
        if n_in % 32:
            raise QdllmError(f"tensor {name} has {n_in} columns, not a multiple of 32 as {ggml_type} needs; use f16")
        return ggml_type

    def encode(self, name: str, w: np.ndarray, ggml_type: str) -> Any:
        from formats.ggml_tensor import GGMLTensor

        g = gguf_module()
        data = g.quants.quantize(np.asarray(w, np.float32), g.GGMLQuantizationType[ggml_type])
        return GGMLTensor(w.shape, ggml_type, np.ascontiguousarray(data), name=name)


def file_type_of(outtype: str, linear_types: dict[str, tuple[str, int]]) -> int:
    """llama.cpp's ``general.file_type`` (LlamaFileType) of a file whose block linears have ``linear_types``
    (name -> (ggml type or "planes", weights)). A stock outtype names its own type; ``auto`` takes the type
    whose bits per weight are nearest the linears' mean; planes files are ``MOSTLY_Q1_0``."""
    if outtype in ("f32", "f16"):
        return {"f32": 0, "f16": 1}[outtype]
    if outtype in STOCK_TYPES:
        return STOCK_TYPES[outtype][1]
    types = {t for t, _ in linear_types.values()}
    if PLANES in types:
        return 40
    if not types:
        return 1
    bpw = {t: _type_bits(t) for t in types}
    n = sum(w for _, w in linear_types.values())
    mean = sum(bpw[t] * w for t, w in linear_types.values()) / n
    main = min(types, key=lambda t: (abs(bpw[t] - mean), t))
    by_type = {t: ft for t, ft in STOCK_TYPES.values()}
    return by_type.get(main, _MORE_FILE_TYPES.get(main, 1024))


def _type_bits(ggml_type: str) -> float:
    g = gguf_module()
    block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[ggml_type]]
    return 8.0 * size / block


def gguf_module():
    """gguf-py, imported on first use so that importing ``formats`` stays light."""
    import gguf

    return gguf
