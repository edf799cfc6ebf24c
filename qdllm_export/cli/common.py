"""Helpers shared by verbs: the prompt's token ids and the text of token ids."""

from __future__ import annotations

from typing import Any

import numpy as np

from formats.errors import QdllmError


def prompt_ids(backend: Any, prompt: str | None, ids: str | None) -> np.ndarray:
    """The prompt as int64 ``[1, Lp]``: ``--prompt-ids 1,2,3`` verbatim, or text encoded with BOS first.

    ``backend``: a Backend or a ``ModelHeader`` (anything with ``hparams``, ``tokenizer`` and ``source``)."""
    hp = backend.hparams
    if ids is not None:
        try:
            out = [int(t) for t in ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise QdllmError(f"--prompt-ids {ids!r}: expected comma-separated integers like 12,7,99") from None
    else:
        if backend.tokenizer is None:
            raise QdllmError(f"{backend.source}: has no tokenizer; pass --prompt-ids instead of --prompt")
        out = backend.tokenizer.encode(prompt or "").ids
        if hp.bos_token_id >= 0:
            out = [hp.bos_token_id] + out
    if not out:
        raise QdllmError("the prompt is empty; give --prompt TEXT or --prompt-ids")
    bad = [t for t in out if not 0 <= t < hp.n_vocab]
    if bad:
        raise QdllmError(f"--prompt-ids: {bad[:5]} lie outside the vocabulary [0, {hp.n_vocab}) of {backend.source}")
    return np.asarray([out], dtype=np.int64)


def decode(backend: Any, ids: np.ndarray) -> str | None:
    """The text of int ids ``[L]``, special tokens kept; None when the model carries no tokenizer."""
    if backend.tokenizer is None:
        return None
    return backend.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)
