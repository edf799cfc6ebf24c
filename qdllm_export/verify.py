"""Parity of exported files against a reference backend: logits on seeded masked inputs, and the tokens
of a greedy generation with every sampler algorithm of the family.

A file whose kernels compute exactly in float (every format, and ONNX MatMulNBits at accuracy level 0)
must match within ``rtol`` / ``min_agree`` with identical greedy tokens. ONNX files whose MatMulNBits
nodes run at accuracy level 4 quantize their activations to int8 per block: they are held to
``INT8_RTOL`` / ``INT8_MIN_AGREE`` (or the caller's looser values), and their greedy tokens are reported,
not required to match (one near-tie flipped by int8 rounding changes every later step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from formats.errors import QdllmError
from runtime_ref.backend import Backend
from runtime_ref.sampler import DREAM_ALGS, LLADA_REMASKING, sample

PROMPT_LEN = 8  # tokens of the seeded prompt the greedy generations start from
# accuracy level 4 (int8 activations): measured on the bundled models (int2 / int4 / int8 / auto and
# binary planes, int8 embeddings and head): rel err 0.5-4e-2, argmax agreement >= 0.95 (docs/onnx-format.md section 4b)
INT8_RTOL = 1e-1
INT8_MIN_AGREE = 0.9
# llama.cpp (--runtime llama.cpp) rounds a matmul's activations to 8 bits (Q8_K / Q8_0) for quantized weights and
# to f16 for f16 weights; a rounding step flipped by a 1-ulp difference (its SIMD exp / silu) moves the logits
# chaotically. Measured on the bundled models, every stock type, random 64-token canvases: rel err 2-5e-2,
# argmax agreement 0.90-0.98 (an f16 file: <= 1e-3) (docs/gguf-format.md section 7)
LLAMACPP_RTOL = 1e-1
LLAMACPP_MIN_AGREE = 0.85
LLAMACPP_F16_RTOL = 2e-3


@dataclass
class LogitCheck:
    mask_ratio: float
    max_abs: float
    rel: float  # max |a - b| / max |b|
    argmax_agree: float  # fraction of positions whose argmax matches


@dataclass
class GenCheck:
    algorithm: str
    identical: bool
    first_diff: int | None  # first differing position, None when identical
    tokens_ref: list[int]
    tokens: list[int]


@dataclass
class FileReport:
    path: str
    format: str
    reference: str
    logits: list[LogitCheck] = field(default_factory=list)
    generation: list[GenCheck] = field(default_factory=list)
    passed: bool = False
    rtol: float | None = None  # the tolerances this file is held to (see module doc); None: the caller's
    min_agree_required: float | None = None
    tokens_required: bool = True  # greedy generations must be identical
    tolerance_note: str = ""
    mismatch: str = ""  # tables the file holds in other types than REF (verify.table_mismatch)

    @property
    def worst_rel(self) -> float:
        return max(c.rel for c in self.logits)

    @property
    def min_agree(self) -> float:
        return min(c.argmax_agree for c in self.logits)

    def failures(self, rtol: float | None = None, min_agree: float | None = None) -> list[str]:
        """Why the file failed, one phrase per broken tolerance (empty when it passed); ``rtol`` /
        ``min_agree`` apply where the report has none of its own."""
        rtol = self.rtol if self.rtol is not None else rtol
        agree = self.min_agree_required if self.min_agree_required is not None else min_agree
        out = []
        if rtol is not None and self.worst_rel > rtol:
            out.append(f"rel err {self.worst_rel:.2e} > {rtol:g}")
        if agree is not None and self.min_agree < agree:
            out.append(f"argmax agree {self.min_agree:.4f} < {agree:g}")
        if self.tokens_required:
            out += [f"{g.algorithm} differs at token {g.first_diff}" for g in self.generation if not g.identical]
        return out


def tolerance_for(b: Any, rtol: float, min_agree: float) -> tuple[float, float, bool, str]:
    """``(rtol, min_agree, tokens_required, note)`` for backend ``b`` given the caller's exact-file tolerances."""
    level = getattr(getattr(b, "info", None), "accuracy_level", None)
    if level == 4:
        return (max(rtol, INT8_RTOL), min(min_agree, INT8_MIN_AGREE), False,
                "MatMulNBits accuracy level 4 (int8 activations): int8 tolerances, tokens reported")
    if getattr(b, "runtime", None) == "llama.cpp":
        if b.quantized_names():
            return (max(rtol, LLAMACPP_RTOL), min(min_agree, LLAMACPP_MIN_AGREE), False,
                    "llama.cpp (activations rounded to 8 bits for quantized weights): llama.cpp tolerances, tokens reported")
        return (max(rtol, LLAMACPP_F16_RTOL), min_agree, False,
                "llama.cpp (activations rounded to f16 for f16 weights): tokens reported")
    return rtol, min_agree, True, ""


def masked_inputs(backend: Backend, ratios: list[float], n_seq: int, seq_len: int, seed: int) -> list[np.ndarray]:
    """For each mask ratio, ``[n_seq, seq_len]`` int64 inputs: random tokens, position 0 BOS (if any),
    every later position masked independently with probability ``ratio``."""
    hp = backend.hparams
    rng = np.random.default_rng(seed)
    out = []
    for r in ratios:
        ids = rng.integers(0, hp.n_vocab, (n_seq, seq_len))
        ids[ids == hp.mask_token_id] = 0
        if hp.bos_token_id >= 0:
            ids[:, 0] = hp.bos_token_id
        m = rng.random((n_seq, seq_len)) < r
        m[:, 0] = False
        ids[m] = hp.mask_token_id
        out.append(ids.astype(np.int64))
    return out


def algorithms(family: str) -> list[tuple[str, dict[str, Any]]]:
    if family == "llada":
        return [(f"llada/{r}", {"remasking": r}) for r in LLADA_REMASKING]
    return [(f"dream/{a}", {"alg": a}) for a in DREAM_ALGS]


def reference_for(ref: Backend, other: Backend) -> tuple[Backend, str]:
    """The reference ``other`` is compared with, and how it was made.

    * A float checkpoint against a file of quantized tensors: the PyTorch model of the checkpoint with the
      file's stored tensors (dequantized in PyTorch) in place of its own, so the check is of the format and
      its runtime, not of quantization error.
    * A quantized checkpoint against a file that declares tables it could not hold as the checkpoint does
      (an ONNX file's f16 copy of a Q4_K embedding: ``substituted_names``): the checkpoint with the file's
      values of those tables.
    * Otherwise ``ref`` itself: the file must hold what the checkpoint holds.
    """
    from formats.tensors import HFTensors, OverlaySource
    from qdllm_export.backends import TorchBackend

    planes = getattr(other, "checkpoint_tensors", None)
    if not isinstance(ref, TorchBackend) or planes is None:
        return ref, ref.source
    if isinstance(ref.source_tensors, HFTensors):
        mine, theirs = tensor_types(other), tensor_types(ref)
        names = [n for n, t in mine.items() if t != theirs.get(n)]  # quantized, or floats of another width
        overlay = OverlaySource(ref.source_tensors, planes(), names)
        what = "tensors as stored"
    else:
        subs = getattr(other, "substituted_names", lambda: [])()
        if not subs:
            return ref, ref.source
        overlay = OverlaySource(ref.source_tensors, planes(), subs)
        what = ", ".join(subs) + " as stored"
    if not overlay.quantized:
        return ref, ref.source
    return TorchBackend(overlay, ref.folder, device=ref.device), f"{ref.source} + {what} in {other.source}"


def tensor_types(b: Any) -> dict[str, str]:
    """The type ``b`` holds each tensor in (``Q4_K``, ``planes``, ``F16``, ``INT8``...), as far as it tells."""
    src = getattr(b, "source_tensors", None)
    if src is not None:
        stored = getattr(src, "stored_type", None) or (lambda n: src.ckpt.dtype(src.hf_name(n)))
        return {n: stored(n) for n in src.names()}
    model = getattr(b, "model_file", None) or getattr(b, "model", None)
    if hasattr(model, "tensor_types"):
        return dict(model.tensor_types())
    info = getattr(b, "info", None)
    if info is not None and hasattr(info, "tensors"):
        return {n: (e["dtype"].upper() if e["kind"] == "float" else f"INT{e['bits']}" if e["kind"] == "nbits" else "planes")
                for n, e in info.tensors.items()}
    return {}


def table_types(b: Any) -> dict[str, str]:
    """The types ``b`` holds the embedding and the head in."""
    from formats.gguf_types import EMBED_ROLES

    return {n: t for n, t in tensor_types(b).items() if n in EMBED_ROLES}


def table_mismatch(ref: Backend, b: Backend, reference: str) -> str:
    """A sentence naming the tables ``b`` holds in other types than the reference it was compared with (empty
    when they agree or the reference took the file's own values)."""
    if reference != ref.source:
        return ""
    mine, theirs = table_types(b), table_types(ref)
    diff = [f"{n.split('.')[0]} as {mine[n]} where REF holds {theirs[n]}" for n in mine if n in theirs and mine[n] != theirs[n]]
    if not diff:
        return ""
    return (f"the file holds {'; '.join(diff)}: it is another model than REF (write it from REF, e.g. qdllm-export gguf "
            "REF FILE, whose tables follow REF's)")


def check_comparable(ref: Any, others: list[Any]) -> None:
    """Refuse models of another architecture than ``ref`` (anything with ``hparams`` and ``source``)."""
    hp = ref.hparams
    for b in others:
        if (b.hparams.family, b.hparams.n_vocab, b.hparams.d_model, b.hparams.n_layers) != (hp.family, hp.n_vocab, hp.d_model, hp.n_layers):
            raise QdllmError(f"{b.source}: a {b.hparams.family} model of d_model {b.hparams.d_model}, "
                             f"{b.hparams.n_layers} layers, vocab {b.hparams.n_vocab} cannot be compared with "
                             f"{ref.source} ({hp.family}, {hp.d_model}, {hp.n_layers}, {hp.n_vocab})")


def verify_files(ref: Backend, others: list[Backend], *, ratios: list[float], n_seq: int, seq_len: int, seed: int,
                 gen_length: int, rtol: float, min_agree: float, prompt: np.ndarray | None = None,
                 progress=None) -> list[FileReport]:
    hp = ref.hparams
    check_comparable(ref, others)
    inputs = masked_inputs(ref, ratios, n_seq, seq_len, seed)
    if prompt is None:
        prompt = masked_inputs(ref, [0.0], 1, PROMPT_LEN, seed + 1)[0]
    block = gen_length // 2 if gen_length % 2 == 0 else gen_length
    opts_base = dict(gen_length=gen_length, steps=gen_length, block_length=block, temperature=0.0, seed=seed)
    cache: dict[str, tuple[list[np.ndarray], dict[str, np.ndarray]]] = {}
    if progress:
        progress(0, len(others))
    reports = []
    for k, b in enumerate(others):
        rb, ref_name = reference_for(ref, b)
        if ref_name not in cache:
            cache[ref_name] = ([rb.logits(x) for x in inputs],
                               {name: sample(rb, prompt, {**opts_base, **o})[0] for name, o in algorithms(hp.spec.sampler_kind)})
        ref_logits, ref_gen = cache[ref_name]
        tol, agree, tokens, note = tolerance_for(b, rtol, min_agree)
        rep = FileReport(b.source, type(b).__name__.replace("Backend", "").lower(), reference=ref_name, rtol=tol,
                         min_agree_required=agree, tokens_required=tokens, tolerance_note=note,
                         mismatch=table_mismatch(ref, b, ref_name))
        for r, x, lr in zip(ratios, inputs, ref_logits):
            lb = b.logits(x)
            diff = np.abs(lb.astype(np.float64) - lr)
            rep.logits.append(LogitCheck(r, float(diff.max()), float(diff.max() / np.abs(lr).max()),
                                         float((lb.argmax(-1) == lr.argmax(-1)).mean())))
        for name, o in algorithms(hp.spec.sampler_kind):
            toks = sample(b, prompt, {**opts_base, **o})[0]
            same = np.array_equal(toks, ref_gen[name])
            first = None if same else int(np.nonzero(toks != ref_gen[name])[0][0])
            rep.generation.append(GenCheck(name, same, first, ref_gen[name].tolist(), toks.tolist()))
        rep.passed = not rep.failures()
        reports.append(rep)
        if progress:
            progress(k + 1, len(others))
    return reports


def report_dict(ref: Backend, reports: list[FileReport], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "ref": ref.source,
        "settings": settings,
        "passed": all(r.passed for r in reports),
        "files": [{**asdict(r), "worst_rel": r.worst_rel, "min_argmax_agree": r.min_agree} for r in reports],
    }
