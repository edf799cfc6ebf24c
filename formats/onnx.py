"""ONNX export and import of LLaDA / Dream models (DESIGN section 5; layout in ``docs/onnx-format.md``).

``write_onnx(path, source, ...)`` writes one graph per model: ``input_ids [batch, seq] int64``, an
optional ``attention_mask [batch, seq] int64`` (key padding; 1 = attend) and optional
``position_ids [batch, seq] int64`` (default 0..seq-1) -> RAW ``logits
[batch, seq, vocab] float32`` (Dream's row i predicts token i+1: ``qdllm.shift_logits`` says so),
bidirectional, no KV cache. Each quantized linear is one node:

* a ``QuantizedTensor`` (binary planes): ``qdllm.PlaneMatMul`` (``kernel="function"``: standard ops
  only, weights kept as 1 sign bit each) or ``qdllm.PlaneMatMulNBits`` (``kernel="matmulnbits"``:
  onnxruntime's ``MatMulNBits``, 2 bits per sign); both are model-local functions;
* an ``NBitsTensor`` (onnxruntime's own 2/4/8-bit grid): one ``com.microsoft.MatMulNBits`` node on its
  stored codes, scales and uint8 zero points;

so a stock ``onnxruntime.InferenceSession`` runs the file. The dequantization inside ``PlaneMatMul``
depends on its input, so no session constant-folds the packed weights into float; ``runtime_ref.ort``
also disables folding for files with binary planes.

``read_onnx_info(path)`` validates a file and says what it holds; ``OnnxTensors(path)`` reads the
stored tensors back (a ``TensorSource``: float arrays in checkpoint layout, ``QuantizedTensor``\\ s and
``NBitsTensor``\\ s, bit for bit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper

from formats.errors import QdllmError
from formats.outputs import check_output_file
from formats.nbits import NBitsTensor, quantize_rtn
from formats.onnx_graph import (DOMAIN, DOMAIN_VERSION, F_NBITS, F_NBITS_MU, F_PLANE, F_PLANE_MU, IR_VERSION,
                                MS_DOMAIN, OPSET, Builder, build_forward, io_values, make_function)
from formats.onnx_proto import TensorStore
from formats.onnx_read import (FORMAT, FORMAT_VERSION, GATHER_NODE, KERNELS, NBITS_FORMAT_VERSION,  # noqa: F401 (API)
                               NBITS_SCALE_TYPES, OUTTYPES, OnnxInfo, OnnxTensors, encode_codes, read_onnx_info)
from formats.qtensor import QuantizedTensor
from formats.stored import is_stored, kind_of
from formats.tokenizer import special_token_ids
from formats.tensors import TensorSource, canonical_names, fetch_checked, is_linear

EMBED_TYPES = ("f32", "f16", "int8")
EMBED_ROLES = ("token_embd.weight", "output.weight")
EMBED_BLOCK = 32  # int8 embeddings / head: columns per scale and zero point
INLINE_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole file; above this: external data
NBITS_DEFAULT_ACCURACY = 4  # accuracy_level of files holding MatMulNBits grid tensors unless told otherwise
_NP = {"f32": np.float32, "f16": np.float16}

__all__ = ["write_onnx", "read_onnx_info", "OnnxInfo", "OnnxTensors", "OUTTYPES", "KERNELS", "EMBED_TYPES", "FORMAT_VERSION"]


def _json(value: Any, what: str, where: Path) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise QdllmError(f"{where}: {what} is not JSON-serialisable ({e})") from None


# ---------------------------------------------------------------------------------------------- writer


class _Export:
    """The tensors of one export: encodes each as the graph asks for it, records the ``qdllm.tensors`` table."""

    def __init__(self, path: Path, source: TensorSource, store: TensorStore, outtype: str, kernel: str,
                 embed_type: str, nbits_scales: str):
        self.path, self.source, self.store = path, source, store
        self.outtype, self.kernel, self.embed_type, self.nbits_scales = outtype, kernel, embed_type, nbits_scales
        self.hp = source.hparams
        self.table: dict[str, dict[str, Any]] = {}
        self.functions: set[str] = set()
        self.group_sizes: set[int] = set()
        self.nbits: list[str] = []  # tensors written as MatMulNBits nodes
        self.acc_nodes: list[onnx.NodeProto] = []  # nodes whose accuracy_level attribute is set at the end
        self.ms_ops = False  # a com.microsoft node other than those in acc_nodes (GatherBlockQuantized)

    def fetch(self, name: str) -> Any:
        return fetch_checked(self.source, name, self.path, stored_ok=EMBED_ROLES)

    def int8(self, name: str) -> NBitsTensor:
        """``token_embd`` / ``output`` for embed type int8: the source's own 8-bit ``NBitsTensor`` or an RTN
        encoding (8 bits, blocks of ``EMBED_BLOCK`` columns, ``formats.nbits.quantize_rtn``) of its floats."""
        value = self.fetch(name)
        if isinstance(value, NBitsTensor) and value.bits == 8:
            return value
        w = value.dequantize() if is_stored(value) else np.asarray(value, dtype=np.float32)
        if w.shape[1] % EMBED_BLOCK:
            raise QdllmError(f"{self.path}: tensor {name} has {w.shape[1]} columns, not a multiple of {EMBED_BLOCK}; "
                             "use embed type f16")
        return quantize_rtn(w, 8, EMBED_BLOCK, name=name)

    def floats(self, name: str, arr: Any, dtype: str, transposed: bool) -> str:
        arr = np.asarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise QdllmError(f"{self.path}: tensor {name} holds NaN or inf")
        out = arr.T if transposed else arr
        out = out.astype(_NP[dtype])
        if not np.isfinite(out).all():
            raise QdllmError(f"{self.path}: tensor {name} overflows float16 (|w| > 65504); export with embed/outtype f32")
        self.store.add(name, out)
        self.table[name] = {"kind": "float", "shape": list(arr.shape), "dtype": dtype, "transposed": transposed,
                            "inits": {"weight": name}}
        return name

    def vector(self, name: str) -> str:
        return self.floats(name, self.fetch(name), "f32", False)

    def embed(self, b: Builder, ids: str) -> str:
        name = "token_embd.weight"
        if self.embed_type == "int8":
            return self.gather_nbits(b, ids, name, self.int8(name))
        value = self.fetch(name)
        w = self.floats(name, value.dequantize() if is_stored(value) else value, self.embed_type, False)
        x = b.op("Gather", [w, ids], axis=0)
        return b.op("Cast", [x], to=TP.FLOAT) if self.embed_type == "f16" else x

    def gather_nbits(self, b: Builder, ids: str, name: str, t: NBitsTensor) -> str:
        """An 8-bit embedding table: one ``com.microsoft.GatherBlockQuantized`` node (codes ``[vocab, d]``)."""
        t.validate()
        n_out, n_in = t.shape
        names = self._add_inits(name, {"codes": t.codes.reshape(n_out, n_in), "scales": t.scales,
                                       "zero_points": t.zero_points})
        sc = b.op("Cast", [names["scales"]], to=TP.FLOAT)
        x = b.op(GATHER_NODE, [names["codes"], ids, sc, names["zero_points"]], domain=MS_DOMAIN,
                 gather_axis=0, quantize_axis=1, block_size=t.block_size, bits=t.bits)
        self.ms_ops = True
        self.table[name] = {"kind": "nbits", "node": GATHER_NODE, "shape": [n_out, n_in], "bits": t.bits,
                            "block_size": t.block_size, "scale_dtype": "f16", "inits": names, "method": _method(t)}
        return x

    def linear(self, b: Builder, x: str, name: str) -> str:
        if name == "output.weight" and self.embed_type == "int8":
            return self.matmul_nbits(b, x, name, self.int8(name))
        value = self.fetch(name)
        if self.outtype == "quantized" and isinstance(value, QuantizedTensor):
            return self.quantized(b, x, name, value)
        if self.outtype == "quantized" and isinstance(value, NBitsTensor):
            return self.matmul_nbits(b, x, name, value)
        if self.outtype == "quantized" and is_stored(value) and name not in EMBED_ROLES:
            raise QdllmError(f"{self.path}: tensor {name} is a {kind_of(value)} tensor, which ONNX does not store; "
                             "re-quantize for ONNX (--outtype int2|int4|int8|auto) or export with --outtype f16")
        if is_stored(value):
            value = value.dequantize()
        dtype = self.embed_type if name == "output.weight" else ("f32" if self.outtype == "f32" else "f16")
        w = self.floats(name, value, dtype, True)  # stored [n_in, n_out]: MatMul's B as is
        if dtype == "f16":
            w = b.op("Cast", [w], to=TP.FLOAT)
        return b.op("MatMul", [x, w])

    def _add_inits(self, name: str, inits: dict[str, np.ndarray]) -> dict[str, str]:
        names = {}
        for field_, arr in inits.items():
            names[field_] = f"{name}.{field_}"
            self.store.add(names[field_], arr)
        return names

    def quantized(self, b: Builder, x: str, name: str, q: QuantizedTensor) -> str:
        """A binary-plane linear: one ``qdllm.PlaneMatMul*`` function node."""
        q.validate()
        if q.n_planes == 0:
            raise QdllmError(f"{self.path}: quantized tensor {name} has no planes at all; store it as a float tensor")
        self.group_sizes.add(q.group_size)
        n_out, n_in = q.shape
        g = q.group_size
        inits = {"planes": q.planes}
        if self.kernel == "function":
            inits.update(signs=q.signs, row_scale=q.row_scale, col_scale=q.col_scale)
            fname, attrs = F_PLANE, {}
        else:
            if g < 16 or g & (g - 1):
                raise QdllmError(f"{self.path}: tensor {name} has group size {g}; MatMulNBits needs a power of two >= 16 "
                                 "(use kernel='function')")
            inits.update(codes=encode_codes(q), scales=np.ascontiguousarray(q.row_scale.T).reshape(-1),
                         col_scale=q.col_scale)
            fname = F_NBITS
            attrs = {"K": q.n_planes * g, "N": n_out, "block_size": g, "accuracy_level": 0}
        if q.mu is not None:
            inits["mu"] = q.mu
            fname = F_PLANE_MU if fname == F_PLANE else F_NBITS_MU
        names = self._add_inits(name, inits)
        self.functions.add(fname)
        self.table[name] = {"kind": "quantized", "shape": [n_out, n_in], "group_size": g, "n_planes": q.n_planes,
                            "mu": q.mu is not None, "inits": names, "method": _method(q)}
        order = ["planes", "codes" if self.kernel == "matmulnbits" else "signs",
                 "scales" if self.kernel == "matmulnbits" else "row_scale", "col_scale"] + (["mu"] if q.mu is not None else [])
        y = b.op(fname, [x] + [names[f] for f in order], domain=DOMAIN, **attrs)
        if attrs:
            self.acc_nodes.append(b.nodes[-1])
        return y

    def matmul_nbits(self, b: Builder, x: str, name: str, t: NBitsTensor) -> str:
        """A MatMulNBits linear: one ``com.microsoft.MatMulNBits`` node on the stored codes, scales and zero points."""
        t.validate()
        n_out, n_in = t.shape
        scales = t.scales if self.nbits_scales == "f16" else t.scales.astype(np.float32)
        names = self._add_inits(name, {"codes": t.codes, "scales": scales, "zero_points": t.zero_points})
        sc = b.op("Cast", [names["scales"]], to=TP.FLOAT) if self.nbits_scales == "f16" else names["scales"]
        y = b.op("MatMulNBits", [x, names["codes"], sc, names["zero_points"]], domain=MS_DOMAIN,
                 K=n_in, N=n_out, bits=t.bits, block_size=t.block_size, accuracy_level=0)
        self.acc_nodes.append(b.nodes[-1])
        if is_linear(self.hp, name):
            self.nbits.append(name)
        self.table[name] = {"kind": "nbits", "shape": [n_out, n_in], "bits": t.bits, "block_size": t.block_size,
                            "scale_dtype": self.nbits_scales, "inits": names, "method": _method(t)}
        return y

    def set_accuracy_level(self, level: int) -> None:
        for node in self.acc_nodes:
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level


def _method(t: Any) -> str | None:
    m = t.meta.get("method")
    return m if isinstance(m, str) else None


def _tokenizer_json(tokenizer: Any, source: TensorSource, where: Path) -> str | None:
    if tokenizer is None:
        folder = getattr(source, "folder", None)
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            tokenizer = Path(folder) / "tokenizer.json"
        else:
            return None
    if isinstance(tokenizer, (str, Path)):
        try:
            return Path(tokenizer).read_text(encoding="utf-8")
        except OSError as e:
            raise QdllmError(f"{where}: cannot read tokenizer {tokenizer} ({e.strerror})") from None
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    raise QdllmError(f"{where}: tokenizer must be a tokenizers.Tokenizer or the path of a tokenizer.json")


def _check_options(path: Path, outtype: str, kernel: str, embed_type: str | None, accuracy_level: int | None,
                   nbits_scales: str) -> str:
    """Refuse unknown option values; returns the effective embed type."""
    if outtype not in OUTTYPES:
        raise QdllmError(f"{path}: outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if kernel not in KERNELS:
        raise QdllmError(f"{path}: kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    embed_type = embed_type or ("f32" if outtype == "f32" else "f16")
    if embed_type not in EMBED_TYPES:
        raise QdllmError(f"{path}: embed_type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise QdllmError(f"{path}: accuracy_level {accuracy_level} is not one of 0-4")
    if nbits_scales not in NBITS_SCALE_TYPES:
        raise QdllmError(f"{path}: nbits_scales {nbits_scales!r} is not one of {', '.join(NBITS_SCALE_TYPES)}")
    return embed_type


def note_substitutes(table: dict[str, dict[str, Any]], source: TensorSource) -> None:
    """Mark in the tensor table each embedding / head table written in another type than the source holds it in
    (``"source_type": "Q4_K"``, e.g. a quantized checkpoint's Q4_K embedding written f16: ONNX has no Q4_K).
    ``verify`` then takes the file's own values of those tables as the reference's (docs/onnx-format.md 3c)."""
    stored = getattr(source, "stored_type", None)
    if stored is None:
        return
    for name in EMBED_ROLES:
        e = table[name]
        written = e["dtype"].upper() if e["kind"] == "float" else f"INT{e['bits']}"
        held = stored(name)
        if held != written:
            e["source_type"] = held


def _build_graph(ex: _Export, outtype: str, accuracy_level: int | None) -> tuple[Builder, int]:
    """The forward graph with every tensor encoded; returns it and the accuracy level its MatMulNBits nodes got."""
    hp, path = ex.hp, ex.path
    b = Builder()
    build_forward(b, hp, ex.linear, ex.vector, ex.embed)
    note_substitutes(ex.table, ex.source)
    missing = [n for n in canonical_names(hp) if n not in ex.table]
    if missing:  # e.g. a bias the family lacks in the graph; never expected
        raise QdllmError(f"{path}: internal error, tensors not exported: {missing}")
    if outtype == "quantized" and not ex.functions and not ex.nbits:
        raise QdllmError(f"{path}: outtype 'quantized' but the source holds no quantized tensor; "
                         "quantize the model first or export with outtype f16/f32")
    if len(ex.group_sizes) > 1:
        raise QdllmError(f"{path}: tensors use group sizes {sorted(ex.group_sizes)}; one file holds one group size")
    level = accuracy_level if accuracy_level is not None else (NBITS_DEFAULT_ACCURACY if ex.nbits else 0)
    ex.set_accuracy_level(level)
    return b, level


def _model_proto(ex: _Export, b: Builder, name: str | None) -> onnx.ModelProto:
    hp = ex.hp
    inputs, outputs, defaults = io_values(hp)
    graph = helper.make_graph(b.nodes, f"qdllm_{hp.family}", inputs, outputs,
                              initializer=defaults + b.small + ex.store.protos)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    if ex.acc_nodes or ex.ms_ops:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    fns = [make_function(f) for f in sorted(ex.functions)]
    return helper.make_model(graph, opset_imports=opsets, functions=fns, ir_version=IR_VERSION,
                             producer_name="qdllm-export", producer_version=_version(),
                             doc_string=f"{name or hp.family} diffusion LM exported by qdllm-export; raw logits "
                                        f"(shift_logits={str(hp.spec.shift_logits).lower()}); see docs/onnx-format.md")


def _metadata(ex: _Export, outtype: str, level: int, ids: dict[str, int], qdllm_meta: dict[str, Any] | None,
              tok: str | None, name: str | None) -> dict[str, str]:
    """The ``qdllm.*`` metadata properties (docs/onnx-format.md section 5)."""
    hp, path = ex.hp, ex.path
    meta = {
        "qdllm.format": FORMAT,
        "qdllm.format_version": str(NBITS_FORMAT_VERSION if any(e["kind"] == "nbits" for e in ex.table.values()) else FORMAT_VERSION),
        "qdllm.family": hp.family, "qdllm.hparams": _json(hp.to_dict(), "hparams", path),
        "qdllm.shift_logits": str(hp.spec.shift_logits).lower(), "qdllm.mask_token_id": str(hp.mask_token_id),
        "qdllm.special_ids": _json(ids, "special ids", path), "qdllm.outtype": outtype,
        "qdllm.kernel": ex.kernel if ex.functions else "none", "qdllm.embed_type": ex.embed_type,
        "qdllm.tensors": _json(ex.table, "tensor table", path), "qdllm.meta": _json(dict(qdllm_meta or {}), "qdllm_meta", path),
        "qdllm.name": name or f"{hp.family}-qdllm",
    }
    if ex.group_sizes:
        meta["qdllm.group_size"] = str(next(iter(ex.group_sizes)))
    if ex.acc_nodes:
        meta["qdllm.accuracy_level"] = str(level)
    cfg = getattr(ex.source, "config", None)
    if isinstance(cfg, dict):
        meta["qdllm.config.json"] = _json(cfg, "config", path)
    if tok is not None:
        meta["qdllm.tokenizer.json"] = tok
    return meta


def write_onnx(
    path: str | Path,
    source: TensorSource,
    *,
    outtype: str = "quantized",
    kernel: str = "function",
    qdllm_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    embed_type: str | None = None,
    accuracy_level: int | None = None,
    nbits_scales: str = "f16",
    tokenizer: Any = None,
    special_ids: dict[str, int] | None = None,
    external_data: bool | None = None,
    name: str | None = None,
) -> Path:
    """Write ``source`` (canonical names, checkpoint row order) as one ONNX model at ``path``.

    ``outtype``: "quantized" (each ``QuantizedTensor`` linear as a ``qdllm`` node, each ``NBitsTensor``
    linear as one ``com.microsoft.MatMulNBits`` node, other linears f16), "f32" or "f16" (every linear as
    a float ``MatMul``, quantized ones dequantized; f16 weights are cast to f32 in the graph).
    ``kernel`` (binary planes): "function" (standard ops, 1 bit per sign) or "matmulnbits"
    (``com.microsoft.MatMulNBits``, 2 bits per sign). ``accuracy_level`` of every MatMulNBits node: 0 =
    fp32 compute (exact), 4 = int8 activations (faster, ~1% error); None = 4 when the source holds
    ``NBitsTensor``\\ s, else 0. ``nbits_scales``: how MatMulNBits scales are stored, "f16" (the stored
    values, cast to f32 in the graph) or "f32". ``embed_type``: ``token_embd`` and ``output`` as "f32",
    "f16" (default f32 for outtype f32, else f16) or "int8" (8-bit grid, blocks of 32 columns: ``token_embd``
    a ``com.microsoft.GatherBlockQuantized`` node, ``output`` a MatMulNBits node; RTN-encoded here unless
    the source holds them as 8-bit ``NBitsTensor``\\ s). ``tokenizer``: a ``tokenizers.Tokenizer`` or a
    tokenizer.json path, stored in the metadata (default: the source folder's tokenizer.json).
    ``external_data``: None = only when the model would pass ~1.8 GB (``<path>.data``).
    The file is written under a temporary name and renamed at the end.
    """
    path = Path(path)
    stored = getattr(source, "stored_type", None)
    if embed_type is None and stored is not None and all(stored(n) == "F32" for n in EMBED_ROLES):
        embed_type = "f32"  # tables a quantized checkpoint holds in f32 stay exact
    embed_type = _check_options(path, outtype, kernel, embed_type, accuracy_level, nbits_scales)
    check_output_file(path, overwrite)
    data_name = path.name + ".data"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_data = path.with_name(f".{data_name}.{os.getpid()}.tmp")
    store = TensorStore(tmp_data, data_name)
    try:
        ex = _Export(path, source, store, outtype, kernel, embed_type, nbits_scales)
        b, level = _build_graph(ex, outtype, accuracy_level)
        tok = _tokenizer_json(tokenizer, source, path)
        ids = special_token_ids(source, special_ids)
        for key, val in ids.items():
            if not 0 <= val < ex.hp.n_vocab:
                raise QdllmError(f"{path}: {key} token id {val} is outside the vocabulary of {ex.hp.n_vocab}")
        inline = (store.nbytes + len(tok or "") < INLINE_LIMIT) if external_data is None else not external_data
        if inline and store.nbytes + len(tok or "") >= INLINE_LIMIT:
            raise QdllmError(f"{path}: {store.nbytes / 1e9:.2f} GB of weights do not fit one protobuf (2 GiB); "
                             "use external_data=True")
        store.finish(inline)
        model = _model_proto(ex, b, name)
        helper.set_model_props(model, _metadata(ex, outtype, level, ids, qdllm_meta, tok, name))
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        if not inline:
            os.replace(tmp_data, path.with_name(data_name))
        elif overwrite:
            path.with_name(data_name).unlink(missing_ok=True)  # a stale data file of an older export
        os.replace(tmp, path)
    except BaseException:
        store.abort()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qdllm-export")
    except Exception:
        return "0"
