"""Reading qdllm ONNX files: validation (``read_onnx_info``) and the tensors back (``OnnxTensors``).

Nothing here loads the weights to validate: ``formats.onnx_proto.scan_model`` reads the protobuf
structure and the initializer headers only. Layout: ``docs/onnx-format.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto as TP

from formats.errors import FormatError
from formats.families import FAMILIES, HParams
from formats.nbits import BLOCK_SIZES as NBITS_BLOCK_SIZES
from formats.nbits import NBITS, NBitsTensor
from formats.onnx_graph import DOMAIN, MS_DOMAIN
from formats.onnx_proto import ModelScan, scan_model
from formats.qtensor import QuantizedTensor, pack_signs
from formats.tensors import canonical_names, canonical_shape, is_linear

FORMAT = "qdllm-onnx"
FORMAT_VERSION = 1  # files of binary planes and floats only (readable by every qdllm-export)
NBITS_FORMAT_VERSION = 2  # files with MatMulNBits grid tensors (table kind "nbits")
SUPPORTED_VERSIONS = (1, 2)
OUTTYPES = ("quantized", "f32", "f16")
KERNELS = ("function", "matmulnbits")
NBITS_SCALE_TYPES = ("f16", "f32")
GATHER_NODE = "GatherBlockQuantized"  # the node of an int8 token_embd table (table entry "node")


def encode_codes(q: QuantizedTensor) -> np.ndarray:
    """MatMulNBits ``B`` ``[n_out, P, G/4]`` uint8: 2-bit codes 3 (+1) / 1 (-1), element e at bits 2e, LSB first."""
    n_out = q.shape[0]
    out = np.empty((n_out, q.n_planes, q.group_size // 4), np.uint8)
    for r in range(0, n_out, 1024):  # bounded temporaries for big weights
        bits = np.unpackbits(q.signs[:, r:r + 1024], axis=-1, bitorder="little")  # [P, rows, G]
        c = (1 + 2 * bits).transpose(1, 0, 2).reshape(bits.shape[1], q.n_planes, -1, 4)
        out[r:r + 1024] = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return out


def decode_codes(codes: np.ndarray, where: str) -> np.ndarray:
    """Inverse of ``encode_codes``: sign bits ``[P, n_out, G/8]``; codes other than 1 / 3 are an error."""
    c = np.stack([(codes >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(codes.shape[0], codes.shape[1], -1)
    if not np.isin(c, (1, 3)).all():
        raise FormatError(f"{where}: 2-bit codes other than 1 and 3 (not a binary plane)")
    return pack_signs(c.transpose(1, 0, 2) == 3)


# ---------------------------------------------------------------------------------------------- reader


@dataclass
class OnnxInfo:
    """What a qdllm ONNX file holds (everything but the weight bytes)."""

    path: Path
    format_version: int
    hparams: HParams
    outtype: str
    kernel: str  # "function" | "matmulnbits" | "none"
    embed_type: str
    shift_logits: bool
    accuracy_level: int | None
    group_size: int | None
    tensors: dict[str, dict[str, Any]]
    meta: dict[str, Any]
    special_ids: dict[str, int]
    metadata: dict[str, str] = field(repr=False)
    tokenizer_json: str | None = field(repr=False, default=None)
    config: dict[str, Any] | None = field(repr=False, default=None)
    file_size: int = 0  # .onnx plus external data
    external_files: list[str] = field(default_factory=list)
    n_params: int = 0
    quantized_weights: int = 0  # weights in quantized linears
    quantized_bits: int = 0  # their stored bits as QuantizedTensor / NBitsTensor count them
    quantized_file_bits: int = 0  # their initializers' bits in this file (2 bits per sign for matmulnbits,
    #                               32-bit scales for nbits tensors written with f32 scales)
    scan: ModelScan | None = field(repr=False, default=None)

    @property
    def bits_per_weight(self) -> float | None:
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else None

    @property
    def file_bits_per_weight(self) -> float | None:
        return self.quantized_file_bits / self.quantized_weights if self.quantized_weights else None

    def planes(self, name: str) -> np.ndarray:
        return self.scan.array(self.tensors[name]["inits"]["planes"])


_DT = {TP.FLOAT: "float32", TP.FLOAT16: "float16", TP.UINT8: "uint8", TP.INT64: "int64"}


def _expect(scan: ModelScan, where: str, init: str, shape: tuple[int, ...], dtype: int) -> None:
    ref = scan.inits.get(init)
    if ref is None:
        raise FormatError(f"{where}: initializer {init!r} is missing (the file is incomplete or was edited; re-export)")
    if tuple(ref.dims) != tuple(shape) or ref.dtype != dtype:
        raise FormatError(f"{where}: initializer {init!r} is {_DT.get(ref.dtype, ref.dtype)} {list(ref.dims)}, "
                          f"expected {_DT.get(dtype, dtype)} {list(shape)} for these hparams (the file is corrupt or was edited)")


def read_onnx_info(path: str | Path) -> OnnxInfo:
    """Validate a qdllm ONNX file and describe it; any defect raises ``FormatError`` naming the file."""
    path = Path(path)
    scan = scan_model(path)
    info = _parse_metadata(scan, path)
    _check_graph(scan, str(path))
    for name in canonical_names(info.hparams):
        _check_tensor(info, name)
    _check_nbits_nodes(info)
    _check_external_data(info)
    return info


def _parse_metadata(scan: ModelScan, path: Path) -> OnnxInfo:
    """The ``qdllm.*`` metadata: format marker and version, hparams, tensor table, options."""
    where = str(path)
    md = scan.metadata
    if md.get("qdllm.format") != FORMAT:
        raise FormatError(f"{where}: not a qdllm-export ONNX model (no qdllm.format metadata); "
                          "export one with `qdllm-export onnx`")
    try:
        version = int(md.get("qdllm.format_version", ""))
    except ValueError:
        raise FormatError(f"{where}: qdllm.format_version {md.get('qdllm.format_version')!r} is not a number") from None
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{where}: qdllm ONNX format version {version}; this qdllm-export reads "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade qdllm-export or re-export)")
    try:
        hp = HParams.from_dict(json.loads(md["qdllm.hparams"]))
        tensors = json.loads(md["qdllm.tensors"])
        meta = json.loads(md.get("qdllm.meta", "{}"))
        special = json.loads(md.get("qdllm.special_ids", "{}"))
        config = json.loads(md["qdllm.config.json"]) if "qdllm.config.json" in md else None
        outtype, kernel = md["qdllm.outtype"], md["qdllm.kernel"]
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: qdllm metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if hp.family not in FAMILIES or md.get("qdllm.family") != hp.family:
        raise FormatError(f"{where}: unknown or inconsistent family {md.get('qdllm.family')!r}")
    if outtype not in OUTTYPES or kernel not in KERNELS + ("none",):
        raise FormatError(f"{where}: unknown outtype {outtype!r} or kernel {kernel!r}")
    info = OnnxInfo(path=path, format_version=version, hparams=hp, outtype=outtype, kernel=kernel,
                    embed_type=md.get("qdllm.embed_type", "f32"), shift_logits=md.get("qdllm.shift_logits") == "true",
                    accuracy_level=int(md["qdllm.accuracy_level"]) if "qdllm.accuracy_level" in md else None,
                    group_size=int(md["qdllm.group_size"]) if "qdllm.group_size" in md else None,
                    tensors=tensors, meta=meta, special_ids=special, metadata=md,
                    tokenizer_json=md.get("qdllm.tokenizer.json"), config=config, scan=scan)
    if info.shift_logits != hp.spec.shift_logits:
        raise FormatError(f"{where}: qdllm.shift_logits contradicts the {hp.family} family")
    return info


def _check_graph(scan: ModelScan, where: str) -> None:
    """Inputs and outputs, and every ``qdllm`` node's function defined in the file."""
    names_in = [v.name for v in scan.inputs]
    if "input_ids" not in names_in or [v.name for v in scan.outputs] != ["logits"]:
        raise FormatError(f"{where}: graph inputs {names_in} / outputs {[v.name for v in scan.outputs]}; "
                          "expected input_ids (+ attention_mask) -> logits")
    functions = {(f.domain, f.name) for f in scan.functions}
    for node in scan.nodes:
        if node.domain == DOMAIN and (node.domain, node.op_type) not in functions:
            raise FormatError(f"{where}: node {node.name!r} uses {DOMAIN}.{node.op_type} but the file does not define "
                              "that function (the model is incomplete or was edited; re-export)")
    for domain in (DOMAIN, MS_DOMAIN):
        if any(n.domain == domain for n in scan.nodes) and domain not in scan.opsets:
            raise FormatError(f"{where}: the model does not import the {domain} domain")


def _check_tensor(info: OnnxInfo, name: str) -> None:
    """One table entry against the hparams and the initializers; counts its parameters and bits."""
    where, scan, tensors = str(info.path), info.scan, info.tensors
    entry = tensors.get(name)
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: tensor {name} is missing from the qdllm.tensors table")
    shape = canonical_shape(info.hparams, name)
    if tuple(entry.get("shape", ())) != tuple(shape):
        raise FormatError(f"{where}: tensor {name} is recorded as {entry.get('shape')}, the hparams imply {list(shape)}")
    info.n_params += int(np.prod(shape))
    inits = entry.get("inits", {})
    kind = entry.get("kind")
    if kind == "float":
        dt = TP.FLOAT16 if entry.get("dtype") == "f16" else TP.FLOAT
        _expect(scan, where, inits.get("weight", name), shape[::-1] if entry.get("transposed") else shape, dt)
        return
    if kind == "quantized":
        bits = _check_planes(info, name, entry, shape)
    elif kind == "nbits":
        bits = _check_nbits(info, name, entry, shape)
    else:
        raise FormatError(f"{where}: tensor {name} has unknown kind {kind!r}")
    if not is_linear(info.hparams, name):
        return  # int8 embeddings / head: not counted with the quantized linears
    info.quantized_weights += shape[0] * shape[1]
    info.quantized_bits += bits
    info.quantized_file_bits += 8 * sum(scan.inits[i].length for i in inits.values())


def _check_planes(info: OnnxInfo, name: str, entry: dict[str, Any], shape: tuple[int, ...]) -> int:
    """A binary-plane linear's initializers; returns its stored bits as ``QuantizedTensor`` counts them."""
    where, scan, inits = str(info.path), info.scan, entry.get("inits", {})
    n_out, n_in = shape
    g = int(entry["group_size"])
    if g <= 0 or g % 8 or n_in % g:
        raise FormatError(f"{where}: tensor {name} has group size {g}, which does not divide n_in={n_in}")
    nb = n_in // g
    _expect(scan, where, inits.get("planes", ""), (nb,), TP.UINT8)
    p = int(scan.array(inits["planes"]).astype(np.int64).sum())
    if p != int(entry.get("n_planes", -1)):
        raise FormatError(f"{where}: tensor {name} has {p} planes, the table says {entry.get('n_planes')}")
    if info.kernel == "matmulnbits":
        _expect(scan, where, inits.get("codes", ""), (n_out, p, g // 4), TP.UINT8)
        _expect(scan, where, inits.get("scales", ""), (n_out * p,), TP.FLOAT16)
    else:
        _expect(scan, where, inits.get("signs", ""), (p, n_out, g // 8), TP.UINT8)
        _expect(scan, where, inits.get("row_scale", ""), (p, n_out), TP.FLOAT16)
    _expect(scan, where, inits.get("col_scale", ""), (p, g), TP.FLOAT16)
    bits = p * n_out * g + 16 * p * (n_out + g) + 8 * nb
    if entry.get("mu"):
        _expect(scan, where, inits.get("mu", ""), (n_out, nb), TP.FLOAT16)
        bits += 16 * n_out * nb
    return bits


def _check_nbits(info: OnnxInfo, name: str, entry: dict[str, Any], shape: tuple[int, ...]) -> int:
    """A MatMulNBits linear's initializers; returns its stored bits as ``NBitsTensor`` counts them (fp16 scales)."""
    where, scan, inits = str(info.path), info.scan, entry.get("inits", {})
    n_out, n_in = shape
    bits, bs, sdt = entry.get("bits"), entry.get("block_size"), entry.get("scale_dtype")
    if bits not in NBITS or bs not in NBITS_BLOCK_SIZES or n_in % bs or sdt not in NBITS_SCALE_TYPES:
        raise FormatError(f"{where}: tensor {name} has bits {bits!r}, block size {bs!r}, scales {sdt!r}: expected bits "
                          f"in {NBITS}, a block size in {NBITS_BLOCK_SIZES} dividing n_in={n_in}, scales f16 or f32")
    nb = n_in // bs
    zp_bytes = (nb * bits + 7) // 8
    gather = entry.get("node") == GATHER_NODE
    if gather and (bits != 8 or name != "token_embd.weight"):
        raise FormatError(f"{where}: tensor {name} is recorded as an embedding of {bits} bits; only token_embd.weight "
                          "may be a GatherBlockQuantized table, of 8 bits")
    _expect(scan, where, inits.get("codes", ""), (n_out, n_in) if gather else (n_out, nb, bs * bits // 8), TP.UINT8)
    _expect(scan, where, inits.get("scales", ""), (n_out, nb), TP.FLOAT16 if sdt == "f16" else TP.FLOAT)
    _expect(scan, where, inits.get("zero_points", ""), (n_out, zp_bytes), TP.UINT8)
    return n_out * (n_in * bits + 16 * nb + 8 * zp_bytes)


def _check_nbits_nodes(info: OnnxInfo) -> None:
    """Each MatMulNBits tensor feeds one ``com.microsoft.MatMulNBits`` node (an int8 embedding table: one
    ``GatherBlockQuantized`` node) whose attributes match the table."""
    where = str(info.path)
    reads = {(n.op_type, n.input[0 if n.op_type == GATHER_NODE else 1]): n for n in info.scan.nodes
             if n.domain == MS_DOMAIN and len(n.input) > 1}
    for name, entry in info.tensors.items():
        if entry.get("kind") != "nbits":
            continue
        op = entry.get("node", "MatMulNBits")
        node = reads.get((op, entry["inits"].get("codes")))
        attrs = {a.name: a.i for a in node.attribute} if node is not None else {}
        want = {"bits": entry["bits"], "block_size": entry["block_size"]}
        want.update({"gather_axis": 0, "quantize_axis": 1} if op == GATHER_NODE else {"K": entry["shape"][1], "N": entry["shape"][0]})
        if any(attrs.get(k) != v for k, v in want.items()):
            raise FormatError(f"{where}: tensor {name} is not read by a {op} node with {want} "
                              "(the file is corrupt or was edited; re-export)")


def _check_external_data(info: OnnxInfo) -> None:
    """External data files exist and hold every initializer they should; sets the file size."""
    where, scan, path = str(info.path), info.scan, info.path
    info.external_files = sorted(scan.external_files())
    info.file_size = path.stat().st_size
    for fname in info.external_files:
        fp = path.parent / fname
        if not fp.is_file():
            raise FormatError(f"{where}: its external data file {fp} is missing (keep it next to the .onnx)")
        size = fp.stat().st_size
        info.file_size += size
        for ref in scan.inits.values():
            if ref.file == fname and ref.offset + ref.length > size:
                raise FormatError(f"{where}: initializer {ref.name!r} lies past the end of {fp} (truncated?)")


class OnnxTensors:
    """The tensors of a qdllm ONNX file as a ``TensorSource`` (lazy: one tensor read per ``get``; exact round trip)."""

    def __init__(self, path: str | Path):
        self.info = read_onnx_info(path)
        self.path = self.info.path
        self.hparams = self.info.hparams
        self.config = self.info.config

    def names(self) -> list[str]:
        return canonical_names(self.hparams)

    def get(self, name: str) -> np.ndarray | QuantizedTensor | NBitsTensor:
        entry = self.info.tensors[name]
        scan = self.info.scan
        arr = {k: scan.array(v) for k, v in entry["inits"].items()}
        if entry["kind"] == "float":
            w = arr["weight"].astype(np.float32)
            return np.ascontiguousarray(w.T) if entry.get("transposed") else w
        meta = {"method": entry["method"]} if entry.get("method") else {}
        if entry["kind"] == "nbits":
            s16 = arr["scales"].astype(np.float16)
            if not np.array_equal(s16.astype(np.float32), arr["scales"].astype(np.float32)):
                raise FormatError(f"{self.path}: tensor {name}: its scales are not float16 values (not written by qdllm-export)")
            arr["scales"] = s16
            if entry.get("node") == GATHER_NODE:  # stored [vocab, d] as GatherBlockQuantized takes it
                n_out, n_in = entry["shape"]
                arr["codes"] = arr["codes"].reshape(n_out, n_in // int(entry["block_size"]), -1)
            return NBitsTensor.from_arrays(tuple(entry["shape"]), int(entry["bits"]), int(entry["block_size"]), arr,
                                           name=name, meta=meta)
        n_out = entry["shape"][0]
        if "codes" in arr:
            arr["signs"] = decode_codes(arr.pop("codes"), f"{self.path}: tensor {name}")
            arr["row_scale"] = np.ascontiguousarray(arr.pop("scales").reshape(n_out, -1).T)
        return QuantizedTensor.from_arrays(tuple(entry["shape"]), int(entry["group_size"]), arr, name=name, meta=meta)
