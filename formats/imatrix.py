"""llama.cpp's importance-matrix file, GGUF form (what ``llama-imatrix -o X.imatrix.gguf`` writes and
``llama-quantize --imatrix`` reads; llama.cpp tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp).

=========================  ========  ==============  ===============================================
entry                      type      ne              content
=========================  ========  ==============  ===============================================
``general.type``           string                    ``"imatrix"``
``imatrix.datasets``       string[]                  the calibration text(s)
``imatrix.chunk_count``    u32                       chunks (windows) of ``chunk_size`` tokens seen
``imatrix.chunk_size``     u32                       tokens per chunk
``<weight>.in_sum2``       F32       ``{n_in, n_mat}``  sum over rows of ``x_j^2``, per input column ``j``
``<weight>.counts``        F32       ``{1, n_mat}``     rows (tokens) summed
=========================  ========  ==============  ===============================================

``<weight>`` is a llama.cpp tensor name (``blk.0.attn_q.weight``, ``output.weight``); ``n_mat`` is 1 for a
dense weight. llama-quantize uses ``in_sum2 / counts`` as the importance of each input column; it refuses
a file without the three metadata keys. No ``general.architecture`` (llama-imatrix writes none). Our
files add ``qdllm.format_version`` (so ``--force`` knows the file is ours) and ``qdllm.*`` notes (MCS on or
off), which llama.cpp ignores, among them which model the file was made from: ``qdllm.model`` (its path) and
``qdllm.model_fingerprint`` (:func:`model_fingerprint`: its hyper-parameters and the first values of a few of
its tensors, so two models of the same shapes are told apart). ``gguf --imatrix`` refuses a file whose
fingerprint is another model's; a file without one (``llama-imatrix``'s) is checked by names and widths only.

NumPy and gguf-py only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.errors import FormatError, QdllmError
from formats.gguf_container import parse_gguf, raw_array
from formats.outputs import check_output_file, gguf_file_writer
from formats.safetensors_io import f32_to_bf16
from formats.tensors import HFTensors

SUM2, COUNTS = ".in_sum2", ".counts"
FINGERPRINT_VALUES = 4096  # values of each fingerprinted tensor hashed (its first ones, in storage order)


@dataclass
class Imatrix:
    """``in_sum2[name]`` float32 ``[n_mat, n_in]`` and ``counts[name]`` float32 ``[n_mat]`` per weight."""

    in_sum2: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    model: str = ""  # the model it was made from (its path), "" when unknown (llama-imatrix's files)
    fingerprint: str = ""  # model_fingerprint of that model, "" when unknown

    def importances(self, name: str) -> np.ndarray:
        """float32 ``[n_mat, n_in]``: mean ``x_j^2`` per input column of each matrix (``in_sum2 / counts``, as
        llama-quantize computes it; 1 for a matrix nothing was counted for, e.g. an expert no token reached)."""
        s, c = self.in_sum2[name].astype(np.float64), self.counts[name].astype(np.float64)
        return np.where(c[:, None] > 0, s / np.maximum(c, 1e-30)[:, None], 1.0).astype(np.float32)

    def importance(self, name: str, mat: int = 0) -> np.ndarray:
        """float32 ``[n_in]``: :meth:`importances` of matrix ``mat`` (an expert of a stacked tensor; 0 when dense)."""
        return self.importances(name)[mat]

    def widths(self) -> dict[str, int]:
        return {n: int(a.shape[-1]) for n, a in self.in_sum2.items()}


def model_fingerprint(src: HFTensors) -> str:
    """16 hex digits naming one model: a hash of its hyper-parameters (shapes, RoPE, special ids) and of the first
    ``FINGERPRINT_VALUES`` values of its embedding, first and last block linears, final norm and head, each
    rounded to bf16 (so the float32 and bf16 copies of one model agree). Reads a few kilobytes, not the model."""
    hp = src.hparams
    h = hashlib.sha256(json.dumps(hp.to_dict(), sort_keys=True).encode())
    last = f"blk.{hp.n_layers - 1}.ffn_down{'_exps.0' if hp.n_expert else ''}.weight"  # a mixture: its first expert's
    for name in ("token_embd.weight", "blk.0.attn_q.weight", last, "output_norm.weight", "output.weight"):
        hf = src.hf_name(name)
        f = src.ckpt.file_of(hf)
        raw = f.head(hf, FINGERPRINT_VALUES)
        bits = raw if f.dtype(hf) == "BF16" else f32_to_bf16(raw.astype(np.float32))
        h.update(name.encode() + np.ascontiguousarray(bits, "<u2").tobytes())
    return h.hexdigest()[:16]


def write_imatrix(path: str | Path, im: Imatrix, overwrite: bool = False, notes: dict[str, str] | None = None) -> Path:
    """Write ``im`` in llama.cpp's GGUF imatrix format (temporary file, renamed at the end); ``notes``
    become ``qdllm.<key>`` strings, after ``qdllm.model`` / ``qdllm.model_fingerprint`` from ``im`` (a note of
    the same key replaces them)."""
    import gguf

    path = Path(path)
    check_output_file(path, overwrite)
    for name, s in im.in_sum2.items():
        c = im.counts.get(name)
        if s.ndim != 2 or c is None or c.shape != (s.shape[0],):
            raise QdllmError(f"{path}: imatrix entry {name}: in_sum2 {s.shape} / counts "
                             f"{None if c is None else c.shape} are not [n_mat, n_in] / [n_mat]")
        if not (np.isfinite(s).all() and np.isfinite(c).all()):
            raise QdllmError(f"{path}: imatrix entry {name} holds NaN or inf")
    with gguf_file_writer(path, "imatrix") as w:
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [str(d) for d in im.datasets] or ["unknown"])
        w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
        w.add_uint32("qdllm.format_version", 1)
        made_from = {k: v for k, v in (("model", im.model), ("model_fingerprint", im.fingerprint)) if v}
        for key, val in {**made_from, **(notes or {})}.items():
            w.add_string(f"qdllm.{key}", str(val))
        for name in im.in_sum2:
            w.add_tensor(name + SUM2, np.ascontiguousarray(im.in_sum2[name], dtype=np.float32))
            w.add_tensor(name + COUNTS, np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return path


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix file (ours or llama-imatrix's); ``FormatError`` naming the file otherwise."""
    path = Path(path)
    _, meta, infos, mm = parse_gguf(path)
    if meta.get("general.type") != "imatrix":
        raise FormatError(f"{path}: not an imatrix file (general.type is {meta.get('general.type')!r}, expected "
                          "'imatrix'); make one with `qdllm-export imatrix MODEL OUT.imatrix.gguf`")
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in meta:
            raise FormatError(f"{path}: imatrix metadata key {key!r} is missing (llama-quantize refuses such a file)")
    im = Imatrix(datasets=[str(d) for d in meta["imatrix.datasets"]], chunk_count=int(meta["imatrix.chunk_count"]),
                 chunk_size=int(meta["imatrix.chunk_size"]), model=str(meta.get("qdllm.model", "")),
                 fingerprint=str(meta.get("qdllm.model_fingerprint", "")))
    for tname, info in infos.items():
        if not tname.endswith(SUM2):
            continue
        name = tname[: -len(SUM2)]
        cinfo = infos.get(name + COUNTS)
        if cinfo is None or info.ggml_type != "F32" or cinfo.ggml_type != "F32":
            raise FormatError(f"{path}: imatrix entry {name} lacks F32 {COUNTS} beside its F32 {SUM2}")
        s = np.array(raw_array(mm, info), dtype=np.float32).reshape(-1, info.ne[0])
        c = np.array(raw_array(mm, cinfo), dtype=np.float32).reshape(-1)
        if c.shape[0] != s.shape[0]:
            raise FormatError(f"{path}: imatrix entry {name}: {s.shape[0]} matrices but {c.shape[0]} counts")
        im.in_sum2[name], im.counts[name] = s, c
    if not im.in_sum2:
        raise FormatError(f"{path}: the imatrix holds no {SUM2} tensors")
    return im


def check_imatrix(im: Imatrix, widths: dict[str, int], where: str, model: str, optional: tuple[str, ...] = (),
                  fingerprint: str = "") -> None:
    """Refuse an imatrix made for another model: one whose recorded fingerprint is not ``fingerprint`` (the
    model's :func:`model_fingerprint`; a file without one, as llama-imatrix writes, skips this), then by
    ``widths`` (llama.cpp name -> n_in, the weights the model has; ``optional`` ones may be absent from the
    imatrix), naming the first tensor missing, of another width, or unknown."""
    if im.fingerprint and fingerprint and im.fingerprint != fingerprint:
        raise QdllmError(f"{where}: was made from {im.model or 'another model'} (fingerprint {im.fingerprint}), not from "
                         f"{model} (fingerprint {fingerprint}); run `qdllm-export imatrix` on {model}")
    have = im.widths()
    for name, n_in in widths.items():
        if name not in have and name in optional:
            continue
        if name not in have:
            raise QdllmError(f"{where}: has no entry for {name} of {model} (its entries start with "
                             f"{next(iter(have))}); it was made for another model: run `qdllm-export imatrix` on {model}")
        if have[name] != n_in:
            raise QdllmError(f"{where}: entry {name} has {have[name]} columns but {model}'s tensor has {n_in}; "
                             f"it was made for another model: run `qdllm-export imatrix` on {model}")
    extra = [n for n in have if n not in widths]
    if extra:
        raise QdllmError(f"{where}: entry {extra[0]} is not a weight of {model}; it was made for another model: "
                         f"run `qdllm-export imatrix` on {model}")
