"""GGUF export and import of LLaDA / Dream models (DESIGN section 4; layout in ``docs/gguf-format.md``).

``write_gguf(path, source, ...)`` writes a llama.cpp-compatible file: architecture ``llada`` or
``dream`` with every key llama.cpp's loader reads, the tokenizer as ``tokenizer.ggml.*`` and
llama.cpp tensor names (``llada`` Q/K rows permuted like convert_hf_to_gguf.py). With
``outtype="quantized"`` each ``QuantizedTensor`` is stored as binary planes (ggml ``Q1_0`` tensors
plus column scales, optional ``mu`` and the per-block plane counts, see ``formats.gguf_layout``);
``"f16"`` / ``"f32"`` store every linear dequantized in a standard type that stock llama.cpp runs.

``read_gguf(path)`` (in ``formats.gguf_read``) validates a file and returns a ``GGUFModel``.

Streaming: tensors are fetched from the source one at a time, twice (a first pass learns the plane
shapes for the header, a second writes the data), so no more than one tensor is ever in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import QdllmError, check_output_path
from formats.gguf_layout import FORMAT_VERSION, QK1_0, encode_planes, permute_tensor, plane_shapes, row_permutation
from formats.gguf_read import GGUFModel, GGUFTensors, read_gguf  # noqa: F401  (public API)
from formats.gguf_tokenizer import vocab_for_gguf
from formats.qtensor import QuantizedTensor
from formats.tokenizer import special_token_ids
from formats.tensors import TensorSource, canonical_names, canonical_shape, fetch_checked, is_linear

OUTTYPES = ("quantized", "f32", "f16")
EMBED_TYPES = ("f32", "f16", "q8_0")
EMBED_ROLES = ("token_embd.weight", "output.weight")
_FILE_TYPE = {"f32": 0, "f16": 1, "quantized": 40}  # LlamaFileType ALL_F32, MOSTLY_F16, MOSTLY_Q1_0
_RESERVED_META = ("format_version", "outtype", "group_size")

__all__ = ["write_gguf", "read_gguf", "GGUFModel", "GGUFTensors", "OUTTYPES", "EMBED_TYPES"]


def _gguf():
    import gguf  # gguf-py; imported lazily so `formats` imports stay light

    return gguf


def _float_type(name: str, outtype: str, embed_type: str) -> str:
    """ggml type ('F32' | 'F16' | 'Q8_0') of a tensor stored as one float tensor."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return "F32"
    if name in EMBED_ROLES:
        return embed_type.upper()
    return "F32" if outtype == "f32" else "F16"


def _encode_float(name: str, arr: np.ndarray, ggml_type: str, where: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise QdllmError(f"{where}: tensor {name} holds NaN or inf")
    if ggml_type == "F32":
        return np.ascontiguousarray(arr)
    if ggml_type == "F16":
        out = arr.astype(np.float16)
        if not np.isfinite(out).all():
            raise QdllmError(f"{where}: tensor {name} overflows float16 (|w| > 65504); write it as f32")
        return out
    if arr.shape[-1] % 32:
        raise QdllmError(f"{where}: tensor {name} has {arr.shape[-1]} columns, not a multiple of 32 as Q8_0 needs")
    g = _gguf()
    return g.quants.quantize(arr, g.GGMLQuantizationType.Q8_0)


class _Plan:
    """One tensor of the output: name, ggml type, numpy element shape, byte count."""

    __slots__ = ("name", "ggml_type", "shape", "nbytes")

    def __init__(self, name: str, ggml_type: str, shape: tuple[int, ...]):
        g = _gguf()
        self.name, self.ggml_type, self.shape = name, ggml_type, tuple(int(s) for s in shape)
        block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[ggml_type]]
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) // block * size

    def byte_shape(self) -> tuple[int, ...]:
        g = _gguf()
        return g.quants.quant_shape_to_byte_shape(self.shape, g.GGMLQuantizationType[self.ggml_type])


_NP_TYPE = {"F32": np.float32, "F16": np.float16, "I8": np.int8}


class _Writer:
    def __init__(self, path: Path, source: TensorSource, outtype: str, embed_type: str):
        self.path, self.source, self.outtype, self.embed_type = path, source, outtype, embed_type
        self.hp = source.hparams
        self.group_size: int | None = None

    def _fetch(self, name: str) -> np.ndarray | QuantizedTensor:
        value = fetch_checked(self.source, name, self.path)
        if isinstance(value, QuantizedTensor):
            if self.group_size is None:
                self.group_size = value.group_size
            elif value.group_size != self.group_size:
                raise QdllmError(f"{self.path}: tensor {name} has group size {value.group_size}, others {self.group_size}; "
                                 "one file holds one group size")
        return value

    def plan(self, name: str) -> list[_Plan]:
        """The output tensors of ``name`` (reads the source only for quantized linears)."""
        shape = canonical_shape(self.hp, name)
        if self.outtype == "quantized" and is_linear(self.hp, name):
            value = self._fetch(name)
            if isinstance(value, QuantizedTensor):
                if value.group_size % QK1_0:
                    raise QdllmError(f"{self.path}: tensor {name} has group size {value.group_size}, not a multiple of "
                                     f"{QK1_0}, so its planes are not ggml Q1_0 rows; quantize with --group-size 128 "
                                     "or write outtype f16 / f32")
                parts = plane_shapes(*value.shape, value.group_size, value.planes, value.mu is not None)
                return [_Plan(name + sfx, t, s) for sfx, (t, s) in parts.items()]
        return [_Plan(name, _float_type(name, self.outtype, self.embed_type), shape)]

    def encode(self, name: str) -> list[tuple[str, np.ndarray]]:
        """(tensor name, array in storage layout) for every output tensor of ``name``."""
        value = permute_tensor(self._fetch(name), row_permutation(self.hp, name))
        if isinstance(value, QuantizedTensor):
            if self.outtype == "quantized":
                return [(name + sfx, arr) for sfx, arr in encode_planes(value)]
            value = value.dequantize()
        return [(name, _encode_float(name, value, _float_type(name, self.outtype, self.embed_type), str(self.path)))]


def _add_meta(w: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        w.add_int64(key, int(value))
    elif isinstance(value, (float, np.floating)):
        w.add_float64(key, float(value))
    elif isinstance(value, str):
        w.add_key_value(key, value, _gguf().GGUFValueType.STRING)
    else:
        w.add_key_value(key + ".json", json.dumps(value, sort_keys=True, default=str), _gguf().GGUFValueType.STRING)


def write_gguf(
    path: str | Path,
    source: TensorSource,
    *,
    tokenizer: Any = None,
    special_ids: dict[str, int] | None = None,
    outtype: str = "quantized",
    qdllm_meta: dict[str, Any] | None = None,
    embed_type: str | None = None,
    tokenizer_pre: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (canonical names, checkpoint row order) to the GGUF file ``path``.

    ``outtype``: "quantized" (QuantizedTensor linears as Q1_0 planes, float linears F16), "f16" or
    "f32" (every linear dequantized; stock llama.cpp runs these). ``embed_type`` ("f32" | "f16" |
    "q8_0") is the type of ``token_embd`` and ``output`` (default f32 for outtype f32, else f16).
    ``special_ids`` may give "bos" / "eos" / "pad" / "mask" (defaults: the source's ``config`` and
    ``hparams``). ``tokenizer`` is a byte-level BPE ``tokenizers.Tokenizer`` (None: no vocabulary;
    llama.cpp then loads dummy tokens). The file is written to a temporary name and renamed at the end.
    """
    path = Path(path)
    if outtype not in OUTTYPES:
        raise QdllmError(f"{path}: outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    embed_type = embed_type or ("f32" if outtype == "f32" else "f16")
    if embed_type not in EMBED_TYPES:
        raise QdllmError(f"{path}: embed_type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    check_output_path(path, overwrite)
    hp = source.hparams
    spec = hp.spec
    meta = dict(qdllm_meta or {})
    writer = _Writer(path, source, outtype, embed_type)
    names = canonical_names(hp)
    plans = [p for n in names for p in writer.plan(n)]
    if "group_size" in meta and writer.group_size is not None and int(meta["group_size"]) != writer.group_size:
        raise QdllmError(f"{path}: qdllm_meta group_size {meta['group_size']} differs from the tensors' {writer.group_size}")
    group_size = writer.group_size if writer.group_size is not None else meta.get("group_size")
    ids = special_token_ids(source, special_ids)
    vocab = None
    if tokenizer is not None:
        vocab = vocab_for_gguf(tokenizer, hp.n_vocab, tokenizer_pre, where=f"{path}: tokenizer")
    for key, val in ids.items():
        if not 0 <= val < hp.n_vocab:
            raise QdllmError(f"{path}: {key} token id {val} is outside the vocabulary of {hp.n_vocab}")

    g = _gguf()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = g.GGUFWriter(str(tmp), spec.name)
    try:
        w.add_name(name or f"{spec.name}-qdllm")
        w.add_file_type(_FILE_TYPE["f16" if outtype == "quantized" and writer.group_size is None else outtype])
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        w.add_context_length(hp.context_length)
        w.add_embedding_length(hp.d_model)
        w.add_block_count(hp.n_layers)
        w.add_feed_forward_length(hp.d_ff)
        w.add_head_count(hp.n_heads)
        w.add_head_count_kv(hp.n_kv_heads)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_rope_freq_base(float(hp.rope_theta))
        w.add_rope_dimension_count(hp.head_dim)
        w.add_layer_norm_rms_eps(float(hp.norm_eps))
        w.add_causal_attention(False)
        w.add_vocab_size(hp.n_vocab)
        w.add_diffusion_shift_logits(spec.shift_logits)
        if vocab is not None:
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(vocab.pre)
            w.add_token_list(vocab.tokens)
            w.add_token_types(vocab.types)
            w.add_token_merges(vocab.merges)
            w.add_add_bos_token(vocab.add_bos)
            w.add_add_eos_token(vocab.add_eos)
        else:
            w.add_tokenizer_model("none")
        for key in ("bos", "eos", "pad"):
            if key in ids:
                getattr(w, f"add_{key}_token_id")(ids[key])
        w.add_mask_token_id(ids["mask"])
        w.add_uint32("qdllm.format_version", FORMAT_VERSION)
        w.add_string("qdllm.outtype", outtype)
        if group_size is not None:
            w.add_uint32("qdllm.group_size", int(group_size))
        for key, val in meta.items():
            if key not in _RESERVED_META:
                _add_meta(w, f"qdllm.{key}", val)
        for p in plans:
            if p.ggml_type in _NP_TYPE:
                w.add_tensor_info(p.name, p.shape, np.dtype(_NP_TYPE[p.ggml_type]), p.nbytes,
                                  raw_dtype=g.GGMLQuantizationType[p.ggml_type])
            else:
                w.add_tensor_info(p.name, p.byte_shape(), np.dtype(np.uint8), p.nbytes,
                                  raw_dtype=g.GGMLQuantizationType[p.ggml_type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it = iter(plans)
        for n in names:
            for tname, arr in writer.encode(n):
                p = next(it, None)
                if p is None or p.name != tname or arr.nbytes != p.nbytes:
                    raise QdllmError(f"{path}: tensor {tname} changed between the two reads of the source "
                                     "(the source must return the same tensors every time)")
                w.write_tensor_data(np.ascontiguousarray(arr))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
