"""GGUF export and import of LLaDA / Dream models (DESIGN section 4; layout in ``docs/gguf-format.md``).

``write_gguf(path, source, ...)`` writes a llama.cpp-compatible file: architecture ``llada`` or
``dream`` with every key llama.cpp's loader reads, the tokenizer as ``tokenizer.ggml.*`` and
llama.cpp tensor names (``llada`` Q/K rows permuted like convert_hf_to_gguf.py). Output types:

* ``"planes"`` (old name ``"quantized"``): each ``QuantizedTensor`` as binary planes (ggml ``Q1_0``
  tensors plus column scales, optional ``mu`` and the per-block plane counts, see
  ``formats.gguf_layout``). Only qdllm's runtimes run these linears.
* a stock type (``STOCK_TYPES``: ``"q2_k"``, ``"iq2_xs"``, ...) or ``"auto"``: every linear is a
  ``GGMLTensor`` (``formats.ggml_tensor``) written as its raw ggml bytes with its own type; stock
  llama.cpp runs the file. The quantizer (``qdllm_export.targets.ggml``) chose the bytes; this module only
  stores them (``llada`` Q/K: the byte rows are reordered).
* ``"f16"`` / ``"f32"``: every linear dequantized.

``token_embd`` and ``output`` take any type: f32 / f16 here, a ggml block type through an
``encoder`` (``TensorEncoder``; gguf-py's quantizer for the simple types by default,
``qdllm_export.targets.ggml.GridEncoder`` for the k-quants).

``read_gguf(path)`` (in ``formats.gguf_read``) validates a file and returns a ``GGUFModel``.

Streaming: tensors are fetched from the source one at a time, twice (a first pass learns the plane
shapes for the header, a second writes the data), so no more than one tensor is ever in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import QdllmError
from formats.gguf_layout import FORMAT_VERSION, QK1_0, encode_planes, permute_tensor, plane_shapes, row_permutation
from formats.gguf_read import GGUFModel, GGUFTensors, read_gguf  # noqa: F401  (public API)
from formats.gguf_types import (EMBED_ROLES, OUTTYPES, PLANES, GGUFPyEncoder, TensorEncoder, canonical_outtype,
                                file_type_of, gguf_module)
from formats.gguf_tokenizer import vocab_for_gguf
from formats.outputs import check_output_file, gguf_file_writer
from formats.qtensor import QuantizedTensor
from formats.stored import kind_of
from formats.tokenizer import special_token_ids
from formats.tensors import TensorSource, canonical_names, canonical_shape, expert_of, fetch_checked, is_linear

_RESERVED_META = ("format_version", "outtype", "group_size")

__all__ = ["write_gguf", "read_gguf", "GGUFModel", "GGUFTensors"]


def _encode_float(name: str, arr: np.ndarray, ggml_type: str, where: str) -> np.ndarray:
    """A float tensor in F32 / F16 storage layout."""
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise QdllmError(f"{where}: tensor {name} holds NaN or inf")
    if ggml_type == "F32":
        return np.ascontiguousarray(arr)
    out = arr.astype(np.float16)
    if not np.isfinite(out).all():
        raise QdllmError(f"{where}: tensor {name} overflows float16 (|w| > 65504); write it as f32")
    return out


class _Plan:
    """One tensor of the output: name, ggml type, numpy element shape, byte count."""

    __slots__ = ("name", "ggml_type", "shape", "nbytes")

    def __init__(self, name: str, ggml_type: str, shape: tuple[int, ...]):
        g = gguf_module()
        self.name, self.ggml_type, self.shape = name, ggml_type, tuple(int(s) for s in shape)
        block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[ggml_type]]
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) // block * size

    def byte_shape(self) -> tuple[int, ...]:
        g = gguf_module()
        return g.quants.quant_shape_to_byte_shape(self.shape, g.GGMLQuantizationType[self.ggml_type])


_NP_TYPE = {"F32": np.float32, "F16": np.float16, "I8": np.int8}


class _Writer:
    """Plans and encodes the output tensors of one file (see ``write_gguf``)."""

    def __init__(self, path: Path, source: TensorSource, outtype: str, embed_types: dict[str, str],
                 encoder: TensorEncoder):
        self.path, self.source, self.outtype = path, source, outtype
        self.embed_types, self.encoder = embed_types, encoder
        self.hp = source.hparams
        self.group_size: int | None = None

    def _fetch(self, name: str) -> Any:
        value = fetch_checked(self.source, name, self.path, stored_ok=EMBED_ROLES)
        if isinstance(value, QuantizedTensor):
            if self.group_size is None:
                self.group_size = value.group_size
            elif value.group_size != self.group_size:
                raise QdllmError(f"{self.path}: tensor {name} has group size {value.group_size}, others {self.group_size}; "
                                 "one file holds one group size")
        return value

    def _float_type(self, name: str) -> str:
        """gguf-py type name of a tensor the source holds as floats (norms, biases and a router: F32)."""
        if name not in EMBED_ROLES and not is_linear(self.hp, name):
            return "F32"
        if name in EMBED_ROLES:
            t = (self.embed_types.get(name) or self._table_default(name)).upper()
            return t if t in ("F32", "F16") else self.encoder.type_of(name, t, canonical_shape(self.hp, name)[1])
        return "F32" if self.outtype == "f32" else "F16"

    def _table_default(self, name: str) -> str:
        """A float table's type when none is asked for: f32 for outtype f32, else the dtype the source stores
        it in where that is f32 (a quantized checkpoint's table chosen f32), else f16."""
        stored = getattr(self.source, "stored_type", None)
        if self.outtype == "f32" or (stored is not None and stored(name) == "F32"):
            return "f32"
        return "f16"

    def _table_plan(self, name: str, shape: tuple[int, ...]) -> "_Plan | None":
        """The plan of a table the source stores in a ggml type: written as stored (a file holds what its
        checkpoint holds), except in the float outtypes; asking for another type is refused."""
        value = self._fetch(name)
        if kind_of(value) != "ggml" or self.outtype in ("f16", "f32"):
            return None
        asked = self.embed_types.get(name)
        if asked is not None and asked.upper() != value.ggml_type:
            raise QdllmError(f"{self.path}: the source holds {name} as {value.ggml_type}, chosen where it was quantized; "
                             f"a file holds what its checkpoint holds, so {asked} is refused (re-quantize the float "
                             "checkpoint with --embed-type / --head-type to change it)")
        return _Plan(name, value.ggml_type, shape)

    def _stored_ok(self, name: str, value: Any) -> None:
        """Refuse a stored kind this outtype cannot hold, naming the outtype that can."""
        kind = kind_of(value)
        if kind == "planes" and self.outtype != PLANES:
            raise QdllmError(f"{self.path}: tensor {name} holds binary planes, which stock llama.cpp cannot run; write "
                             f"--outtype {PLANES} (qdllm runtimes), or quantize the float checkpoint with --outtype "
                             f"{self.outtype} (or f16)")
        if kind == "nbits":
            raise QdllmError(f"{self.path}: tensor {name} holds onnxruntime MatMulNBits codes, which GGUF cannot store; "
                             "write --outtype f16 / f32, or quantize the float checkpoint for GGUF")

    def plan(self, name: str) -> list[_Plan]:
        """The output tensors of ``name`` (reads the source only for quantized linears)."""
        shape = canonical_shape(self.hp, name)
        if self.outtype not in ("f16", "f32") and is_linear(self.hp, name):
            value = self._fetch(name)
            self._stored_ok(name, value)
            if isinstance(value, QuantizedTensor):
                if value.group_size % QK1_0:
                    raise QdllmError(f"{self.path}: tensor {name} has group size {value.group_size}, not a multiple of "
                                     f"{QK1_0}, so its planes are not ggml Q1_0 rows; quantize with --group-size 128 "
                                     "or write outtype f16 / f32")
                parts = plane_shapes(*value.shape, value.group_size, value.planes, value.mu is not None)
                return [_Plan(name + sfx, t, s) for sfx, (t, s) in parts.items()]
            if kind_of(value) == "ggml":
                return [_Plan(name, value.ggml_type, shape)]
        if name in EMBED_ROLES:
            table = self._table_plan(name, shape)
            if table is not None:
                return [table]
        return [_Plan(name, self._float_type(name), shape)]

    def encode(self, name: str, plan: _Plan) -> list[tuple[str, np.ndarray]]:
        """(tensor name, array in storage layout) for every output tensor of ``name``."""
        value = permute_tensor(self._fetch(name), row_permutation(self.hp, name))
        if isinstance(value, QuantizedTensor) and self.outtype == PLANES:
            return [(name + sfx, arr) for sfx, arr in encode_planes(value)]
        kind = kind_of(value)
        if kind == "ggml" and plan.ggml_type == value.ggml_type:
            return [(name, np.ascontiguousarray(value.data))]
        if kind is not None:
            value = value.dequantize()
        if plan.ggml_type in ("F32", "F16"):
            return [(name, _encode_float(name, value, plan.ggml_type, str(self.path)))]
        if not np.isfinite(value).all():
            raise QdllmError(f"{self.path}: tensor {name} holds NaN or inf")
        enc = self.encoder.encode(name, np.asarray(value, np.float32), plan.ggml_type)
        if enc.ggml_type != plan.ggml_type:
            raise QdllmError(f"{self.path}: the encoder gave tensor {name} type {enc.ggml_type}, planned {plan.ggml_type}")
        return [(name, np.ascontiguousarray(enc.data))]


def _add_meta(w: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        w.add_int64(key, int(value))
    elif isinstance(value, (float, np.floating)):
        w.add_float64(key, float(value))
    elif isinstance(value, str):
        w.add_key_value(key, value, gguf_module().GGUFValueType.STRING)
    else:
        w.add_key_value(key + ".json", json.dumps(value, sort_keys=True, default=str), gguf_module().GGUFValueType.STRING)


def write_gguf(
    path: str | Path,
    source: TensorSource,
    *,
    tokenizer: Any = None,
    special_ids: dict[str, int] | None = None,
    outtype: str = PLANES,
    qdllm_meta: dict[str, Any] | None = None,
    embed_type: str | None = None,
    head_type: str | None = None,
    encoder: TensorEncoder | None = None,
    tokenizer_pre: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (canonical names, checkpoint row order) to the GGUF file ``path``.

    ``outtype`` (``OUTTYPES``, module doc): "planes" (QuantizedTensor linears as Q1_0 planes, ggml ones as
    they are, float linears F16), a stock type or "auto" (every linear a ``GGMLTensor``, written as its bytes),
    "f16" / "f32" (every linear dequantized). ``embed_type`` / ``head_type``: the type of ``token_embd`` /
    ``output``: "f32", "f16" or a ggml type name ("q8_0", "q6_k", ...; those other than
    ``EMBED_TYPES`` need an ``encoder``); ``head_type`` defaults to ``embed_type``. A table the source
    stores in a ggml type is written as stored (another type asked for is refused; the float outtypes
    dequantize it); a float table defaults to f32 for outtype f32 or a source that stores it f32, else f16. ``special_ids`` may give "bos" / "eos" / "pad" / "mask" (defaults: the source's
    ``config`` and ``hparams``). ``tokenizer`` is a byte-level BPE ``tokenizers.Tokenizer`` (None: no
    vocabulary; llama.cpp then loads dummy tokens). The file is written to a temporary name and renamed at
    the end.
    """
    path = Path(path)
    outtype = canonical_outtype(outtype)
    if outtype not in OUTTYPES:
        raise QdllmError(f"{path}: outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    embed_types = {"token_embd.weight": embed_type, "output.weight": head_type or embed_type}
    check_output_file(path, overwrite)
    writer = _Writer(path, source, outtype, embed_types, encoder or GGUFPyEncoder())
    names = canonical_names(source.hparams)
    planned = {n: writer.plan(n) for n in names}
    keys = _file_keys(path, source, writer, planned, dict(qdllm_meta or {}), tokenizer, special_ids, tokenizer_pre)
    units = _file_units(path, source.hparams, names, planned)
    with gguf_file_writer(path, source.hparams.spec.name) as w:
        w.add_name(name or f"{source.hparams.spec.name}-qdllm")
        _write_keys(w, source.hparams, keys)
        _write_tensors(w, path, writer, units, planned)
    return path


def _file_units(path: Path, hp: Any, names: list[str], planned: dict[str, list["_Plan"]]) -> list[tuple[list[str], list["_Plan"]]]:
    """The file's tensors in order, as (canonical names, plans): one name each, except a layer's experts of one
    role, which llama.cpp reads as one 3-D tensor (``TensorSpec.stacked``, ``[n_expert, n_out, n_in]``, one ggml
    type). Experts written as binary planes stay one tensor set each (only qdllm's runtimes read them)."""
    units: list[tuple[list[str], list[_Plan]]] = []
    stacks: dict[str, list[str]] = {}
    for n in names:
        ex = expert_of(hp, n)
        if ex is None:
            units.append(([n], planned[n]))
            continue
        if ex[0] not in stacks:
            stacks[ex[0]] = []
            units.append((stacks[ex[0]], []))
        stacks[ex[0]].append(n)
    out = []
    for group, plans in units:
        if plans or not group:
            out.append((group, plans))
            continue
        ps = [planned[n] for n in group]
        if any(len(p) != 1 or p[0].name != n for n, p in zip(group, ps)):  # planes: one tensor set per expert
            out.extend(([n], planned[n]) for n in group)
            continue
        types = sorted({p[0].ggml_type for p in ps})
        stacked = expert_of(hp, group[0])[0]
        if len(types) > 1:
            raise QdllmError(f"{path}: the experts of {stacked} have types {', '.join(types)}, but llama.cpp stores a "
                             "layer's experts as one tensor of one type; quantize them to one type")
        out.append((group, [_Plan(stacked, types[0], (len(group),) + ps[0][0].shape)]))
    return out


def _file_keys(path: Path, source: TensorSource, writer: "_Writer", planned: dict[str, list["_Plan"]],
               meta: dict[str, Any], tokenizer: Any, special_ids: dict[str, int] | None,
               tokenizer_pre: str | None) -> dict[str, Any]:
    """What the header says besides the hparams: file type, group size, vocabulary, special ids, qdllm keys."""
    hp = source.hparams
    if "group_size" in meta and writer.group_size is not None and int(meta["group_size"]) != writer.group_size:
        raise QdllmError(f"{path}: qdllm_meta group_size {meta['group_size']} differs from the tensors' {writer.group_size}")
    linear_types = {n: (PLANES if len(ps) > 1 or ps[0].name != n else ps[0].ggml_type, int(np.prod(canonical_shape(hp, n))))
                    for n, ps in planned.items() if is_linear(hp, n)}
    ids = special_token_ids(source, special_ids)
    for key, val in ids.items():
        if not 0 <= val < hp.n_vocab:
            raise QdllmError(f"{path}: {key} token id {val} is outside the vocabulary of {hp.n_vocab}")
    vocab = None if tokenizer is None else vocab_for_gguf(tokenizer, hp.n_vocab, tokenizer_pre, where=f"{path}: tokenizer")
    return {"file_type": file_type_of(writer.outtype, linear_types), "outtype": writer.outtype, "ids": ids, "vocab": vocab,
            "group_size": writer.group_size if writer.group_size is not None else meta.get("group_size"), "meta": meta}


def _write_keys(w: Any, hp: Any, keys: dict[str, Any]) -> None:
    """llama.cpp's keys for the architecture, the tokenizer, then the ``qdllm.*`` keys."""
    g = gguf_module()
    w.add_file_type(keys["file_type"])
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
    w.add_diffusion_shift_logits(hp.spec.shift_logits)
    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)
        w.add_expert_feed_forward_length(hp.d_ff_exp)
    _write_tokenizer(w, keys["vocab"], keys["ids"])
    w.add_uint32("qdllm.format_version", FORMAT_VERSION)
    w.add_string("qdllm.outtype", keys["outtype"])
    if keys["group_size"] is not None:
        w.add_uint32("qdllm.group_size", int(keys["group_size"]))
    for key, val in keys["meta"].items():
        if key not in _RESERVED_META:
            _add_meta(w, f"qdllm.{key}", val)


def _write_tokenizer(w: Any, vocab: Any, ids: dict[str, int]) -> None:
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


def _write_tensors(w: Any, path: Path, writer: "_Writer", units: list[tuple[list[str], list["_Plan"]]],
                   planned: dict[str, list["_Plan"]]) -> None:
    """The tensor infos, the header, then each tensor's data, fetched from the source one at a time (a stacked
    experts tensor: its experts one after the other)."""
    g = gguf_module()
    plans = [p for _, ps in units for p in ps]
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
    for group, ps in units:
        if len(group) > 1:  # stacked experts
            arrs = [writer.encode(n, planned[n][0]) for n in group]
            if any(len(a) != 1 or a[0][1].nbytes * len(group) != ps[0].nbytes for a in arrs):
                raise QdllmError(f"{path}: tensor {ps[0].name} changed between the two reads of the source")
            encoded = [(ps[0].name, np.stack([a[0][1] for a in arrs]))]
        else:
            encoded = writer.encode(group[0], planned[group[0]][0])
        for tname, arr in encoded:
            p = next(it, None)
            if p is None or p.name != tname or arr.nbytes != p.nbytes:
                raise QdllmError(f"{path}: tensor {tname} changed between the two reads of the source "
                                 "(the source must return the same tensors every time)")
            w.write_tensor_data(np.ascontiguousarray(arr))
