"""LLaDA and Dream samplers in NumPy, written once and driven by any backend's logits function.

Both samplers see the model only through ``logits_fn(ids int64 [B, T]) -> float32 [B, T, V]``,
*aligned* (row ``i`` scores token ``i``; Dream backends have already applied their shift, see
:mod:`runtime_ref.backend`). They follow the official algorithms:

* :func:`llada_generate` is ML-GSAI/LLaDA ``generate.py`` (``generate`` +
  ``get_num_transfer_tokens`` + ``add_gumbel_noise``): semi-autoregressive blocks, a fixed number
  of tokens committed per step, low-confidence or random remasking, classifier-free guidance.
* :func:`dream_generate` is Dream's ``generation_utils.DreamGenerationMixin._sample`` (+
  ``sample_tokens``, ``top_p_logits``, ``top_k_logits``) without an attention mask: ``origin``,
  ``maskgit_plus``, ``topk_margin`` and ``entropy``.

At temperature 0 (and ``alg_temp`` None/0, Dream ``alg != "origin"``) both are deterministic and
commit exactly the tokens the official code commits, given the same logits. Randomness comes only
from a ``numpy.random.Generator`` seeded with ``seed``; the official code draws from torch's RNG,
which cannot be reproduced, so stochastic runs match it in distribution, not token for token.

Precision and tie rules (the only places where bit-for-bit agreement with torch can differ, and only
for near-ties): confidences are computed in float64 from the float32 logits (the official code uses
float64 for LLaDA's Gumbel noise and the model's dtype for the rest), and every top-k is a stable
sort on ``-confidence``, so equal confidences commit the lowest position first.

Deliberate departures, none of which changes a greedy result:

* a step that cannot commit anything (LLaDA: a zero budget because ``steps_per_block`` exceeds the
  block's masks; Dream: ``int(n_mask * (1 - s/t)) == 0``, or no mask left) skips the model call;
* LLaDA's Gumbel-max takes the argmax of ``l - T * log(-log u)``, the log of the official
  ``exp(l) / (-log u) ** T`` (same token, no float64 overflow for logits above ~709);
* Dream's ``alg_temp > 0`` draws positions by Gumbel-top-k on ``confidence / alg_temp``, the same
  distribution as ``multinomial(softmax(.), n)`` without replacement, immune to underflow;
* Dream's top-p / top-k write ``-inf`` where the official code writes ``finfo.min`` (probability 0
  either way);
* Dream caps the per-row count at the row's masked count (the official code, when rows have drifted
  apart, would write the mask id over committed tokens);
* no attention mask / padding (all prompts in a batch have one length), and LLaDA's optional
  ``logits_eos_inf`` / ``confidence_eos_eot_inf`` tricks are not offered.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from runtime_ref.backend import Backend, LogitsFn
from runtime_ref.sampler_dream import dream_generate, dream_timesteps
from runtime_ref.sampler_llada import get_num_transfer_tokens, llada_generate
from runtime_ref.sampling import DREAM_ALGS, LLADA_REMASKING, Progress

__all__ = [
    "sample",
    "llada_generate",
    "dream_generate",
    "get_num_transfer_tokens",
    "dream_timesteps",
    "LLADA_REMASKING",
    "DREAM_ALGS",
]


def sample(backend: Backend, prompt: np.ndarray, opts: Mapping[str, Any], progress: Progress = None,
           logits_fn: LogitsFn | None = None) -> np.ndarray:
    """Run the family's sampler on ``backend``; returns the generated ids only, int64 ``[B, gen_length]``.

    ``prompt``: int64 ``[B, Lp]``. ``opts``: ``gen_length`` (required), ``steps`` (default gen_length),
    ``temperature``, ``seed``; LLaDA: ``block_length`` (default gen_length), ``remasking``, ``cfg_scale``;
    Dream: ``alg`` (default entropy), ``alg_temp``, ``top_p``, ``top_k``. Options of the other family are
    ignored. ``logits_fn`` replaces ``backend.logits``.
    """
    hp = backend.hparams
    fn = logits_fn or backend.logits
    gen = int(opts["gen_length"])
    steps = int(opts.get("steps") or gen)
    common = dict(mask_id=hp.mask_token_id, steps=steps, temperature=float(opts.get("temperature") or 0.0),
                  seed=int(opts.get("seed") or 0), progress=progress)
    if hp.spec.sampler_kind == "llada":
        out = llada_generate(fn, prompt, gen_length=gen, block_length=int(opts.get("block_length") or gen),
                             cfg_scale=float(opts.get("cfg_scale") or 0.0),
                             remasking=opts.get("remasking") or "low_confidence", **common)
    else:
        out = dream_generate(fn, prompt, max_new_tokens=gen, alg=opts.get("alg") or "entropy",
                             alg_temp=opts.get("alg_temp"), top_p=opts.get("top_p"), top_k=opts.get("top_k"), **common)
    return out[:, prompt.shape[1]:]
