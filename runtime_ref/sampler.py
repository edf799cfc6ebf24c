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


from runtime_ref.sampler_dream import dream_generate, dream_timesteps
from runtime_ref.sampler_llada import get_num_transfer_tokens, llada_generate
from runtime_ref.sampling import DREAM_ALGS, LLADA_REMASKING

__all__ = [
    "llada_generate",
    "dream_generate",
    "get_num_transfer_tokens",
    "dream_timesteps",
    "LLADA_REMASKING",
    "DREAM_ALGS",
]
