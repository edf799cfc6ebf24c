"""Masked Calibration Simulation (MCS): calibration windows as the model sees them while denoising.

The released scheme (``utils/mcs.py`` of the Quant-dLLM release, see research/algorithm.md 1.2):
sample ``i`` of ``N`` gets timestep ``t = (i + 1) / N``; its first ``int(prefix_ratio * L)`` tokens stay
visible and every other token is replaced by the mask id independently with probability ``t``, drawn
from a generator seeded with ``seed + i``. Dream never masks position 0 (its shifted logits row 0 is
a dummy), which the visible prefix already guarantees when it is non-empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import QdllmError
from formats.families import HParams
from qdllm_export.textfile import read_text

DEFAULT_CALIB = Path(__file__).parent / "data" / "shakespeare" / "train.txt"


@dataclass
class CalibConfig:
    """Where calibration tokens come from and how they are masked."""

    path: str | None = None  # text or JSONL file; None: the bundled Shakespeare training text
    n_samples: int = 128
    seq_len: int = 256
    mcs: bool = True
    prefix_ratio: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise QdllmError(f"--calib-samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise QdllmError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.prefix_ratio < 1.0:
            raise QdllmError(f"MCS prefix ratio must be in [0, 1), got {self.prefix_ratio}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path or DEFAULT_CALIB)
        return d


def calibration_windows(tokenizer, hp: HParams, cfg: CalibConfig) -> np.ndarray:
    """``[n_samples, seq_len]`` int64 windows of the calibration text, BOS first when the model has one.

    Window ``i`` starts at a seeded random offset inside the ``i``-th of ``n_samples`` equal strides of
    the text (``cfg.seed``), so every seed covers the whole text with different windows; when the text
    holds fewer than ``n_samples`` windows they overlap. Text shorter than one window is an error
    naming the file.
    """
    path = Path(cfg.path) if cfg.path else DEFAULT_CALIB
    if tokenizer is None:
        raise QdllmError(f"calibration needs the model's tokenizer.json to encode {path}")
    ids = np.asarray(tokenizer.encode(read_text(path)).ids, dtype=np.int64)
    bos = hp.bos_token_id >= 0
    body = cfg.seq_len - (1 if bos else 0)
    if len(ids) < body:
        raise QdllmError(
            f"{path}: calibration text has {len(ids)} tokens, shorter than one window of {body}; "
            "give a longer --calib file or a smaller --seq-len"
        )
    stride = (len(ids) - body) / cfg.n_samples
    jitter = np.random.default_rng(cfg.seed).random(cfg.n_samples)
    starts = np.minimum(((np.arange(cfg.n_samples) + jitter) * stride).astype(np.int64), len(ids) - body)
    win = np.stack([ids[s : s + body] for s in starts])
    if bos:
        win = np.concatenate([np.full((cfg.n_samples, 1), hp.bos_token_id, np.int64), win], axis=1)
    return win


def apply_mcs(windows: np.ndarray, mask_id: int, prefix_ratio: float = 0.25, seed: int = 0,
              protect_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mask windows ``[N, L]`` with the released MCS scheme; returns (masked ids, mask bool ``[N, L]``)."""
    n, length = windows.shape
    prefix = int(prefix_ratio * length)
    if protect_first:
        prefix = max(prefix, 1)
    out = windows.copy()
    masked = np.zeros_like(windows, dtype=bool)
    for i in range(n):
        t = (i + 1) / n
        u = np.random.default_rng(seed + i).random(length)
        m = u < t
        m[:prefix] = False
        masked[i] = m
        out[i, m] = mask_id
    return out, masked
