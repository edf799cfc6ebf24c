"""What both diffusion samplers share: argument checks, the logits call, confidences, progress."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from formats.errors import QdllmError

LogitsFn = Callable[[np.ndarray], np.ndarray]
Progress = Optional[Callable[[int, int], None]]

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _check_prompt(prompt: np.ndarray, mask_id: int) -> np.ndarray:
    arr = np.asarray(prompt)
    if arr.ndim == 1:
        raise QdllmError(
            f"prompt must be a 2-D int array [batch, prompt_len], got shape {arr.shape}; "
            "wrap a single prompt as prompt[None, :]"
        )
    if arr.ndim != 2:
        raise QdllmError(f"prompt must be a 2-D int array [batch, prompt_len], got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise QdllmError("prompt has an empty batch (shape[0] == 0)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise QdllmError(f"prompt must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise QdllmError(f"prompt holds a negative token id ({int(arr.min())})")
    if isinstance(mask_id, bool) or not isinstance(mask_id, (int, np.integer)) or mask_id < 0:
        raise QdllmError(f"mask_id must be a non-negative int, got {mask_id!r}")
    return arr.astype(np.int64, copy=False)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QdllmError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise QdllmError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value, minimum: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QdllmError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < minimum:
        raise QdllmError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return v


def _call_logits(logits_fn: LogitsFn, x: np.ndarray) -> np.ndarray:
    """Run the backend and check its answer: float32 ``[B, T, V]`` with no NaN."""
    out = np.asarray(logits_fn(x))
    if out.ndim != 3 or out.shape[:2] != x.shape:
        raise QdllmError(
            f"logits_fn returned shape {out.shape} for ids of shape {x.shape}; "
            f"expected ({x.shape[0]}, {x.shape[1]}, vocab)"
        )
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    if np.isnan(out).any():
        raise QdllmError("logits_fn returned NaN logits; the backend or the model weights are broken")
    return out


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Stable float64 log-softmax over the last axis (``-inf`` entries stay ``-inf``)."""
    z = logits.astype(np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
    return z - lse


def _top_indices(conf_row: np.ndarray, k: int) -> np.ndarray:
    """``torch.topk(conf_row, k).indices`` with a deterministic tie rule: lowest position first."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.argsort(-conf_row, kind="stable")[:k]


def _report(progress: Progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)
