"""Dream's ``diffusion_generate``: origin / maskgit_plus / topk_margin / entropy. See ``runtime_ref.sampler``."""

from __future__ import annotations

from typing import Optional

import numpy as np

from formats.errors import QdllmError
from runtime_ref.sampling import (DREAM_ALGS, LogitsFn, Progress, _call_logits, _check_float, _check_int,
                                  _check_prompt, _log_softmax64, _report, _top_indices)


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
    """``torch.linspace(1, eps, steps + 1)`` in float32, bit for bit.

    torch computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for the
    second, in float32 with a fused multiply-add; a product of a float32 and a small integer is exact
    in float64, so doing the sum in float64 and rounding once reproduces the FMA.
    """
    n = steps + 1
    start = np.float32(1.0)
    end = np.float32(eps)
    if n == 1:
        return np.array([start], dtype=np.float32)
    step = np.float32((end - start) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(start) + np.float64(step) * i
    hi = np.float64(end) - np.float64(step) * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def _filter_logits(logits: np.ndarray, temperature: float, top_p, top_k) -> np.ndarray:
    """Dream ``sample_tokens`` preprocessing in float64: temperature, then top-p, then top-k.

    Removed entries become ``-inf`` (the official code writes ``finfo.min``; both get probability 0).
    """
    z = logits.astype(np.float64)
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        order = np.argsort(-z, axis=-1, kind="stable")
        sorted_z = np.take_along_axis(z, order, axis=-1)
        cum = np.cumsum(np.exp(_log_softmax64(sorted_z)), axis=-1)
        remove_sorted = cum > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].copy()
        remove_sorted[..., 0] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        z = np.where(remove, -np.inf, z)
    if top_k is not None:
        k = min(int(top_k), z.shape[-1])
        kth = np.partition(z, z.shape[-1] - k, axis=-1)[..., z.shape[-1] - k : z.shape[-1] - k + 1]
        z = np.where(z < kth, -np.inf, z)
    return z


def _sample_tokens(
    logits: np.ndarray,
    temperature: float,
    top_p,
    top_k,
    rng: np.random.Generator,
    confidence_kind: str = "prob",
) -> tuple[np.ndarray, np.ndarray]:
    """Dream ``sample_tokens`` on ``[M, V]`` float32 logits -> (confidence float64 [M], x0 int64 [M]).

    ``confidence_kind``: ``"prob"`` (probability of the chosen token; ``maskgit_plus``),
    ``"margin"`` (top-1 minus top-2 probability; ``topk_margin``) or ``"neg_entropy"``
    (``sum p log(p + 1e-10)``; ``entropy``).
    """
    M, V = logits.shape
    z = _filter_logits(logits, temperature, top_p, top_k)
    logp = _log_softmax64(z)
    probs = np.exp(logp)
    if temperature > 0:
        # Categorical(probs).sample() via Gumbel-max on the log-probabilities.
        g = rng.gumbel(size=logp.shape) if M else np.zeros_like(logp)
        x0 = np.argmax(logp + g, axis=-1)
    else:
        x0 = np.argmax(logp, axis=-1)
    x0 = x0.astype(np.int64)
    if confidence_kind == "prob":
        conf = np.take_along_axis(probs, x0[:, None], axis=-1)[:, 0]
    elif confidence_kind == "margin":
        if V < 2:
            conf = probs[:, 0].copy()
        else:
            top2 = np.partition(probs, V - 2, axis=-1)[:, V - 2 :]
            conf = top2[:, 1] - top2[:, 0]
    elif confidence_kind == "neg_entropy":
        conf = np.sum(probs * np.log(probs + 1e-10), axis=-1)
    else:  # pragma: no cover - internal
        raise ValueError(confidence_kind)
    return conf, x0


_CONFIDENCE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


def dream_generate(
    logits_fn: LogitsFn,
    prompt: np.ndarray,
    *,
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: Optional[float] = None,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: int = 0,
    progress: Progress = None,
) -> np.ndarray:
    """Dream reverse diffusion (official ``DreamGenerationMixin._sample``, no attention mask).

    Args:
        logits_fn: ``ids int64 [B, T] -> float32 [B, T, V]``, *aligned* (the Dream backend has
            already shifted its logits right by one), ``T = Lp + max_new_tokens``.
        prompt: int64 ``[B, Lp]``, ``Lp >= 1`` (row 0 of Dream's shifted logits is a dummy).
        mask_id: the mask token id (151666 for Dream-v0-7B).
        max_new_tokens: number of generated tokens.
        steps: number of diffusion steps; the timesteps are ``linspace(1, eps, steps + 1)``.
        eps: final timestep.
        alg: ``"origin"`` (each masked token is revealed with probability ``1 - s/t``, all at the
            last step), or ``"maskgit_plus"`` / ``"topk_margin"`` / ``"entropy"`` (commit the
            ``int(n_mask * (1 - s/t))`` most confident masked tokens, all remaining at the last
            step, where ``n_mask`` is the mask count averaged over the batch as in the official code).
        alg_temp: None or 0 commits the top-confidence positions; > 0 samples the positions without
            replacement from ``softmax(confidence / alg_temp)``.
        temperature, top_p, top_k: token sampling (``sample_tokens``); temperature 0 takes the argmax
            of the (top-p / top-k filtered) distribution.
        seed: seeds the ``numpy.random.Generator`` (token sampling, ``origin`` reveals, ``alg_temp``).
        progress: optional ``progress(step_done, total_steps)`` called after every step.

    Returns:
        int64 ``[B, Lp + max_new_tokens]``.
    """
    prompt = _check_prompt(prompt, mask_id)
    max_new_tokens, steps, eps, alg_temp, temperature, top_p, top_k, seed = _check_dream_args(
        max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p, top_k, seed)
    if prompt.shape[1] < 1:
        raise QdllmError(
            "Dream needs a prompt of at least one token (its shifted logits have no prediction for "
            "position 0)"
        )

    rng = np.random.default_rng(seed)
    B, Lp = prompt.shape
    x = np.full((B, Lp + max_new_tokens), mask_id, dtype=np.int64)
    x[:, :Lp] = prompt
    timesteps = dream_timesteps(steps, eps)
    sampling = (temperature, top_p, top_k, rng)

    for i in range(steps):
        t, s, last = timesteps[i], timesteps[i + 1], i == steps - 1
        if alg == "origin":
            _origin_step(logits_fn, x, mask_id, t, s, last, sampling)
        else:
            _confident_step(logits_fn, x, mask_id, t, s, last, alg, alg_temp, sampling)
        _report(progress, i + 1, steps)
    return x


def _check_dream_args(max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p, top_k, seed) -> tuple:
    """Validated ``(max_new_tokens, steps, eps, alg_temp, temperature, top_p, top_k, seed)``."""
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    steps = _check_int("steps", steps, 1)
    eps = _check_float("eps", eps)
    if not 0.0 < eps < 1.0:
        raise QdllmError(f"eps must be in (0, 1), got {eps}")
    if alg not in DREAM_ALGS:
        raise QdllmError(f"alg must be one of {', '.join(DREAM_ALGS)}; got {alg!r}")
    if alg_temp is not None:
        alg_temp = _check_float("alg_temp", alg_temp)
    temperature = _check_float("temperature", temperature)
    if top_p is not None:
        top_p = _check_float("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise QdllmError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 1)
    return max_new_tokens, steps, eps, alg_temp, temperature, top_p, top_k, _check_int("seed", seed, 0)


def _origin_step(logits_fn: LogitsFn, x: np.ndarray, mask_id: int, t: np.float32, s: np.float32, last: bool,
                 sampling: tuple) -> None:
    """``origin``, in place: each masked token is revealed with probability ``1 - s/t`` (all at the last step)."""
    mask_index = x == mask_id
    if not mask_index.any():
        return
    logits = _call_logits(logits_fn, x)
    r, c = np.nonzero(mask_index)  # row-major, like torch's boolean indexing
    p_transfer = 1.0 if last else float(np.float32(1.0) - s / t)
    temperature, top_p, top_k, rng = sampling
    transfer = rng.random(r.shape[0]) < p_transfer
    if transfer.any():
        _, x0 = _sample_tokens(logits[r[transfer], c[transfer]], temperature, top_p, top_k, rng)
        x[r[transfer], c[transfer]] = x0


def _transfer_count(n_masked: int, batch: int, t: np.float32, s: np.float32, last: bool) -> int:
    """Tokens to commit per row this step: ``int(n_mask * (1 - s/t))`` (all remaining at the last step), with
    ``n_mask`` the batch's mean mask count, in float32 exactly as the official code (0-dim tensors, int())."""
    num_mask_token = np.float32(n_masked) / np.float32(batch)
    return int(num_mask_token) if last else int(num_mask_token * (np.float32(1.0) - s / t))


def _confident_step(logits_fn: LogitsFn, x: np.ndarray, mask_id: int, t: np.float32, s: np.float32, last: bool,
                    alg: str, alg_temp: Optional[float], sampling: tuple) -> None:
    """``maskgit_plus`` / ``topk_margin`` / ``entropy``, in place: commit the most confident masked tokens."""
    B, T = x.shape
    mask_index = x == mask_id
    n_transfer = _transfer_count(int(mask_index.sum()), B, t, s, last)
    if n_transfer <= 0:
        return  # the official code runs the model and commits nothing; we skip the call
    temperature, top_p, top_k, rng = sampling
    logits = _call_logits(logits_fn, x)
    r, c = np.nonzero(mask_index)
    conf, x0 = _sample_tokens(logits[r, c], temperature, top_p, top_k, rng, _CONFIDENCE[alg])
    full_conf = np.full((B, T), -np.inf, dtype=np.float64)
    full_conf[r, c] = conf
    x_ = np.full((B, T), mask_id, dtype=np.int64)
    x_[r, c] = x0
    row_masked = mask_index.sum(axis=1)
    for j in range(B):
        # The official code takes n_transfer positions in every row; where a row has fewer masked
        # positions than that (rows drifted apart because the model predicted the mask token) it would
        # write the mask id over committed tokens. We cap at the row's masked count instead.
        k = min(n_transfer, int(row_masked[j]))
        if k:
            sel = _choose_positions(full_conf[j], mask_index[j], k, alg_temp, rng)
            x[j, sel] = x_[j, sel]


def _choose_positions(conf: np.ndarray, masked: np.ndarray, k: int, alg_temp: Optional[float],
                      rng: np.random.Generator) -> np.ndarray:
    """``k`` positions of one row: the top-k confidences, or with ``alg_temp > 0`` a draw without
    replacement from ``softmax(conf / alg_temp)`` (torch.multinomial), done as Gumbel-top-k on
    ``conf / alg_temp`` (the same distribution; immune to underflow)."""
    if not alg_temp:
        return _top_indices(conf, k)
    keys = np.full(conf.shape[0], -np.inf)
    keys[masked] = conf[masked] / alg_temp + rng.gumbel(size=int(masked.sum()))
    return _top_indices(keys, k)
