"""Helpers shared by verbs: prompts, the generation call, token text."""

from __future__ import annotations

from typing import Any

import numpy as np

from formats.errors import QdllmError
from runtime_ref.backend import Backend

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def prompt_ids(backend: Backend, prompt: str | None, ids: str | None) -> np.ndarray:
    """The prompt as int64 ``[1, Lp]``: ``--prompt-ids 1,2,3`` verbatim, or text encoded with BOS first."""
    hp = backend.hparams
    if ids:
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
        raise QdllmError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {hp.n_vocab})")
    return np.asarray([out], dtype=np.int64)


def sample(backend: Backend, prompt: np.ndarray, opts: dict[str, Any], progress=None, logits_fn=None) -> np.ndarray:
    """Run the family's sampler; returns the generated ids ``[B, gen_length]`` only."""
    from runtime_ref.sampler import dream_generate, llada_generate

    hp = backend.hparams
    fn = logits_fn or backend.logits
    gen = int(opts["gen_length"])
    steps = int(opts.get("steps") or gen)
    if hp.family == "llada":
        if opts.get("remasking", "low_confidence") not in LLADA_REMASKING:
            raise QdllmError(f"--remasking must be one of {', '.join(LLADA_REMASKING)}")
        out = llada_generate(fn, prompt, mask_id=hp.mask_token_id, steps=steps, gen_length=gen,
                             block_length=int(opts.get("block_length") or gen), temperature=float(opts.get("temperature", 0.0)),
                             cfg_scale=float(opts.get("cfg_scale", 0.0)), remasking=opts.get("remasking", "low_confidence"),
                             seed=int(opts.get("seed", 0)), progress=progress)
    else:
        alg = opts.get("alg") or "entropy"
        if alg not in DREAM_ALGS:
            raise QdllmError(f"--alg must be one of {', '.join(DREAM_ALGS)}")
        out = dream_generate(fn, prompt, mask_id=hp.mask_token_id, max_new_tokens=gen, steps=steps, alg=alg,
                             alg_temp=opts.get("alg_temp"), temperature=float(opts.get("temperature", 0.0)),
                             top_p=opts.get("top_p"), top_k=opts.get("top_k"), seed=int(opts.get("seed", 0)), progress=progress)
    return out[:, prompt.shape[1]:]


def decode(backend: Backend, ids: np.ndarray) -> str | None:
    if backend.tokenizer is None:
        return None
    return backend.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)
