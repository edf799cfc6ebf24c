"""Parity of exported files against a reference backend: logits on seeded masked inputs, and the tokens
of a greedy generation with every sampler algorithm of the family."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from formats.errors import QdllmError
from runtime_ref.backend import Backend
from runtime_ref.sampler import DREAM_ALGS, LLADA_REMASKING, sample

PROMPT_LEN = 8  # tokens of the seeded prompt the greedy generations start from


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

    @property
    def worst_rel(self) -> float:
        return max(c.rel for c in self.logits)

    @property
    def min_agree(self) -> float:
        return min(c.argmax_agree for c in self.logits)


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

    A float checkpoint against a file of quantized planes: the PyTorch model of the checkpoint with the
    file's planes (dequantized in PyTorch) in place of its linears, so the check is of the format and
    its runtime, not of quantization error. Otherwise ``ref`` itself.
    """
    from formats.tensors import HFTensors, OverlaySource
    from qdllm_export.backends import TorchBackend

    planes = getattr(other, "checkpoint_tensors", None)
    if not isinstance(ref, TorchBackend) or not isinstance(ref.source_tensors, HFTensors) or planes is None:
        return ref, ref.source
    overlay = OverlaySource(ref.source_tensors, planes())
    if not overlay.quantized:
        return ref, ref.source
    return TorchBackend(overlay, ref.folder, device=ref.device), f"{ref.source} + quantized planes of {other.source}"


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
                               {name: sample(rb, prompt, {**opts_base, **o})[0] for name, o in algorithms(hp.family)})
        ref_logits, ref_gen = cache[ref_name]
        rep = FileReport(b.source, type(b).__name__.replace("Backend", "").lower(), reference=ref_name)
        for r, x, lr in zip(ratios, inputs, ref_logits):
            lb = b.logits(x)
            diff = np.abs(lb.astype(np.float64) - lr)
            rep.logits.append(LogitCheck(r, float(diff.max()), float(diff.max() / np.abs(lr).max()),
                                         float((lb.argmax(-1) == lr.argmax(-1)).mean())))
        for name, o in algorithms(hp.family):
            toks = sample(b, prompt, {**opts_base, **o})[0]
            same = np.array_equal(toks, ref_gen[name])
            first = None if same else int(np.nonzero(toks != ref_gen[name])[0][0])
            rep.generation.append(GenCheck(name, same, first, ref_gen[name].tolist(), toks.tolist()))
        rep.passed = rep.worst_rel <= rtol and rep.min_agree >= min_agree and all(g.identical for g in rep.generation)
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
