"""What every backend (PyTorch, NumPy-from-GGUF, onnxruntime) offers the samplers, eval and verify."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from formats.families import HParams

LogitsFn = Callable[[np.ndarray], np.ndarray]
"""``logits_fn(ids int64 [B, T]) -> float32 [B, T, V]``, *aligned*: row ``i`` scores token ``i``.

Backends of a shifted family (Dream) apply the shift themselves (``cat([l[:, :1], l[:, :-1]])``), so
samplers and the likelihood never need to know about it."""


class Backend(Protocol):
    """A loaded model of any format."""

    hparams: HParams
    tokenizer: Any  # tokenizers.Tokenizer or None
    source: str  # path it was loaded from

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Aligned float32 logits ``[B, T, V]`` for int64 ids ``[B, T]``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Figures for ``inspect``: format, family, shapes, parameter count, bits per weight, size."""
        ...


def shift_right(logits: np.ndarray) -> np.ndarray:
    """Dream's alignment: row ``i`` of the result is row ``i - 1`` of ``logits`` (row 0 kept)."""
    return np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
