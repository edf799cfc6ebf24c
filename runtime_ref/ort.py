"""``OrtBackend``: a qdllm ONNX file run by stock onnxruntime (the Backend protocol).

The packed weights must stay packed: onnxruntime inlines the ``qdllm`` functions, and its
ConstantFolding pass would precompute every dequantized weight in float32 at load time (16-32x the
packed size) if that dequantization were constant. The function makes it depend on its input (see
``docs/onnx-format.md``), so even a default session keeps the planes; for quantized files
``session_options(keep_packed=True)`` also disables that pass (other fusions stay on), or with
``fold="cap"`` caps the size of any folded tensor (session entry
``optimization.constant_folding_max_output_size_in_bytes``, onnxruntime >= 1.27).
``tests/test_onnx_memory.py`` checks all three on a model whose float weights are 13x its file.
Files holding only MatMulNBits grid tensors (no binary planes) need none of this: their weights are the
MatMulNBits node's own inputs, which onnxruntime prepacks, so they get default sessions.

``nbits_support(bits)`` asks the installed onnxruntime whether it runs MatMulNBits with ``bits`` on the
CPU (one tiny session); ``OrtBackend`` and the ``onnx`` verb refuse files it cannot run, naming the
onnxruntime versions that can (``NBITS_MIN_ORT``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from formats.tensors import canonical_shape, is_linear

from formats.errors import QdllmError
from formats.onnx import OnnxInfo, read_onnx_info
from runtime_ref.backend import shift_right

FOLD_CAP_BYTES = 65536  # fold="cap": constants up to this size are folded (plane lists, scale casts)
# first onnxruntime release whose CPU execution provider runs MatMulNBits with these bits (4: the op's
# first release; 8: x64 kernels, PR 24491; 2: PR 25582, which AVX2 / AVX-512 / ARM64 kernels later sped up)
NBITS_MIN_ORT = {4: "1.17.0", 8: "1.22.0", 2: "1.23.0"}
LUT_GEMM_KEY = "mlas.use_lut_gemm"  # opt-in T-MAC style 2-bit kernel (AVX2; K % 32 == 0, N % 128 == 0)


def session_options(threads: int | None = None, keep_packed: bool = True, fold: str = "disable",
                    log_level: int = 3, lut_gemm: bool = False) -> tuple[Any, list[str]]:
    """``(SessionOptions, disabled_optimizers)`` for ``onnxruntime.InferenceSession``.

    ``keep_packed``: never fold packed weights into float (``fold`` = "disable": no ConstantFolding
    pass; "cap": fold only outputs up to ``FOLD_CAP_BYTES``). ``threads``: intra-op threads (None:
    onnxruntime's default, all cores). ``log_level`` 3 hides the warning about the optional
    ``attention_mask`` input being an overridable initializer. ``lut_gemm``: onnxruntime's opt-in
    lookup-table kernel for 2-bit MatMulNBits (session entry ``mlas.use_lut_gemm``).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_level
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    if lut_gemm:
        so.add_session_config_entry(LUT_GEMM_KEY, "1")
    disabled: list[str] = []
    if keep_packed:
        if fold == "disable":
            disabled = ["ConstantFolding"]
        elif fold == "cap":
            so.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", str(FOLD_CAP_BYTES))
        else:
            raise QdllmError(f"fold must be 'disable' or 'cap', not {fold!r}")
    return so, disabled


def _tokenizer(text: str | None, where: str) -> Any:
    if text is None:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise QdllmError(f"{where}: the stored tokenizer.json does not load ({e})") from None


def nbits_support(bits: int) -> str | None:
    """None when the installed onnxruntime runs ``MatMulNBits`` with ``bits`` on the CPU, else why not
    (naming the onnxruntime versions that do). Probes a one-node model once per ``bits``."""
    if bits not in _NBITS_PROBED:
        _NBITS_PROBED[bits] = _probe_nbits(bits)
    return _NBITS_PROBED[bits]


_NBITS_PROBED: dict[int, str | None] = {}


def _probe_nbits(bits: int) -> str | None:
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    k, n, bs = 32, 8, 32
    inits = [numpy_helper.from_array(np.zeros((n, 1, bs * bits // 8), np.uint8), "B"),
             numpy_helper.from_array(np.ones((n, 1), np.float32), "S")]
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("X", TP.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TP.FLOAT, [1, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, {"X": np.ones((1, k), np.float32)})
        return None
    except Exception as e:  # onnxruntime's Fail / NotImplemented
        detail = str(e).strip().splitlines()[0]
        detail = detail.split(" was false. ")[-1] if " was false. " in detail else detail[-160:]
        return nbits_unsupported(bits, ort.__version__, detail)


def nbits_unsupported(bits: int, installed: str, detail: str) -> str:
    """The refusal of a ``bits``-bit MatMulNBits by onnxruntime ``installed``, naming the releases that run it."""
    need = NBITS_MIN_ORT.get(bits)
    want = f"onnxruntime >= {need} runs it on the CPU (pip install -U onnxruntime)" if need else \
        f"no onnxruntime release runs {bits}-bit MatMulNBits on the CPU (it runs {', '.join(map(str, sorted(NBITS_MIN_ORT)))})"
    return f"the installed onnxruntime {installed} cannot run {bits}-bit MatMulNBits ({detail}); {want}"


def nbits_bits_of(info: OnnxInfo) -> list[int]:
    """The distinct bits of a file's MatMulNBits grid tensors (empty for other files)."""
    return sorted({int(e["bits"]) for e in info.tensors.values() if e.get("kind") == "nbits"})


class OrtBackend:
    """A ``.onnx`` file written by ``formats.onnx.write_onnx``, in an onnxruntime CPU session."""

    def __init__(self, path: str | Path, threads: int | None = None, *, keep_packed: bool | None = None,
                 fold: str = "disable", providers: list[str] | None = None, lut_gemm: bool = False):
        import onnxruntime as ort

        self.info: OnnxInfo = read_onnx_info(path)
        self.hparams = self.info.hparams
        self.source = str(path)
        self.tokenizer = _tokenizer(self.info.tokenizer_json, self.source)
        for bits in nbits_bits_of(self.info):
            why = nbits_support(bits)
            if why:
                raise QdllmError(f"{path}: {why}")
        # binary planes must not be folded into float; MatMulNBits grid tensors are prepacked by their node
        self.keep_packed = self.info.kernel != "none" if keep_packed is None else keep_packed
        self.lut_gemm = lut_gemm
        so, disabled = session_options(threads, self.keep_packed, fold, lut_gemm=lut_gemm)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"],
                                                disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime's Fail / InvalidGraph / RuntimeException
            raise QdllmError(f"{path}: onnxruntime cannot load the model ({str(e).strip()[:500]})") from None

    def _feed(self, ids: np.ndarray, attn_mask: np.ndarray | None, positions: np.ndarray | None) -> dict[str, np.ndarray]:
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise QdllmError(f"token ids must be a non-empty int array [batch, seq], got {ids.dtype} {ids.shape}")
        n = self.hparams.n_vocab
        if ids.min() < 0 or ids.max() >= n:
            raise QdllmError(f"token ids must lie in [0, {n}), got {ids.min()}..{ids.max()}")
        feed = {"input_ids": ids.astype(np.int64, copy=False)}
        if attn_mask is not None:
            m = np.asarray(attn_mask)
            if m.shape != ids.shape:
                raise QdllmError(f"attn_mask has shape {m.shape}, expected {ids.shape}")
            feed["attention_mask"] = m.astype(np.int64)
        if positions is not None:
            pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), ids.shape)
            feed["position_ids"] = np.ascontiguousarray(pos)
        return feed

    def raw_logits(self, ids: np.ndarray, attn_mask: np.ndarray | None = None,
                   positions: np.ndarray | None = None) -> np.ndarray:
        """The graph's output: unshifted float32 logits ``[B, T, V]`` (Dream: row i predicts token i+1).

        ``attn_mask`` ``[B, T]``: 1 = real token, 0 = padding (masked as a key). ``positions``
        ``[B, T]`` or ``[T]``: RoPE positions (default ``0..T-1``; Dream's generator uses
        ``cumsum(mask) - 1`` for left-padded batches)."""
        return self.session.run(["logits"], self._feed(ids, attn_mask, positions))[0]

    def quantized_names(self) -> list[str]:
        """Every tensor the file stores quantized (linears, and an int8 embedding table and head)."""
        return [n for n, e in self.info.tensors.items() if e["kind"] != "float"]

    def substituted_names(self) -> list[str]:
        """Tables written in another type than the checkpoint they came from holds them in (``source_type``,
        docs/onnx-format.md section 3c): a reference of that checkpoint takes the file's values of these."""
        return [n for n, e in self.info.tensors.items() if "source_type" in e]

    def checkpoint_tensors(self):
        """The file's tensors as stored (a TensorSource; quantized linears bit for bit)."""
        from formats.onnx_read import OnnxTensors

        return OnnxTensors(self.source)

    def logits(self, ids: np.ndarray, attn_mask: np.ndarray | None = None, positions: np.ndarray | None = None) -> np.ndarray:
        """Aligned float32 logits ``[B, T, V]``: row ``i`` scores token ``i`` (Dream's shift applied)."""
        out = self.raw_logits(ids, attn_mask, positions)
        return shift_right(out) if self.info.shift_logits else out

    def describe(self) -> dict[str, Any]:
        """``inspect`` figures, one key per fact (see ``GGUFBackend.describe`` for the shared keys)."""
        info, hp = self.info, self.hparams
        types: dict[str, str] = {}
        planes = []
        nbits: dict[str, int] = {}
        for name, e in info.tensors.items():
            if e["kind"] == "float":
                types[name] = e["dtype"].upper()
            elif e["kind"] == "nbits":
                types[name] = f"{e.get('node', 'MatMulNBits')} int{e['bits']} (block {e['block_size']}, {e['scale_dtype']} scales)"
                if is_linear(hp, name):
                    nbits[f"int{e['bits']}"] = nbits.get(f"int{e['bits']}", 0) + 1
            else:
                k = info.planes(name)
                planes.append(k)
                kern = "MatMulNBits 2-bit" if info.kernel == "matmulnbits" else "PlaneMatMul 1-bit signs"
                types[name] = f"{kern} planes (K_j {k.min()}..{k.max()}, mean {k.mean():.3f}){' +mu' if e.get('mu') else ''}"
        all_planes = np.concatenate(planes) if planes else np.zeros(0)
        return {
            "format": "onnx",
            "path": self.source,
            "family": hp.family,
            "hparams": hp.to_dict(),
            "format_version": info.format_version,
            "outtype": info.outtype,
            "kernel": info.kernel,
            "accuracy_level": info.accuracy_level,
            "embed_type": info.embed_type,
            "shift_logits": info.shift_logits,
            "qdllm": dict(info.meta),
            "n_params": info.n_params,
            "n_quantized_linears": len(planes) + sum(nbits.values()),
            "nbits_linears": nbits,
            "lut_gemm": self.lut_gemm,
            "mean_planes": float(all_planes.mean()) if all_planes.size else None,
            "group_size": info.group_size,
            "bits_per_weight": 8.0 * info.file_size / info.n_params,  # the whole file (and its external data)
            "bits_per_weight_linear": info.file_bits_per_weight,  # the quantized linears' initializers in this file
            # ... and as the quantized tensors count them (1 bit per sign): differs for matmulnbits' 2-bit codes
            "bits_per_weight_linear_tensor": info.bits_per_weight,
            "tensors": [{"name": n, "shape": list(canonical_shape(hp, n)), "type": t,
                         "bits_per_weight": None} for n, t in types.items()],
            "size_bytes": info.file_size,
            "external_data": info.external_files,
            "keep_packed": self.keep_packed,
            "onnxruntime": _ort_version(),
            "vocab": None if self.tokenizer is None else self.tokenizer.get_vocab_size(),
        }


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
