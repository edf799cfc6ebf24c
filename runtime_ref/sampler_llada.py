"""LLaDA's ``generate``: semi-autoregressive blocks, low-confidence (or random) remasking. See ``runtime_ref.sampler``."""

from __future__ import annotations

import numpy as np

from formats.errors import QdllmError
from runtime_ref.sampling import (LLADA_REMASKING, LogitsFn, Progress, _call_logits, _check_float, _check_int,
                                  _check_prompt, _log_softmax64, _report, _top_indices)


def get_num_transfer_tokens(mask_index: np.ndarray, steps: int) -> np.ndarray:
    """LLaDA's per-step token budget for one block.

    ``mask_index``: bool ``[B, L]`` (masked positions of the block); returns int64 ``[B, steps]``:
    each row spreads its mask count over ``steps`` evenly, ``base = n // steps`` per step and the
    remainder ``n % steps`` given one extra token each to the first steps.
    """
    mask_num = np.asarray(mask_index).sum(axis=1).astype(np.int64)  # [B]
    base = mask_num // steps
    remainder = mask_num % steps
    out = np.broadcast_to(base[:, None], (mask_num.shape[0], steps)).copy()
    out += (np.arange(steps)[None, :] < remainder[:, None]).astype(np.int64)
    return out


def llada_generate(
    logits_fn: LogitsFn,
    prompt: np.ndarray,
    *,
    mask_id: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    seed: int = 0,
    progress: Progress = None,
) -> np.ndarray:
    """LLaDA reverse diffusion (official ``generate.py``), semi-autoregressive over blocks.

    Args:
        logits_fn: ``ids int64 [B', T] -> float32 [B', T, V]`` (aligned, no shift for LLaDA).
            Called once per step with ``B' = B`` (or ``2B`` with ``cfg_scale > 0``: conditional rows
            then unconditional rows) and ``T = Lp + gen_length``.
        prompt: int64 ``[B, Lp]`` token ids; all rows have the same length (no padding support).
        mask_id: the ``[MASK]`` token id (126336 for LLaDA-8B).
        steps: total sampling steps, a multiple of the number of blocks.
        gen_length: number of generated tokens, a multiple of ``block_length``.
        block_length: semi-autoregressive block size (``== gen_length``: one block).
        temperature: 0 is greedy argmax; > 0 samples with Gumbel-max noise in float64.
        cfg_scale: classifier-free guidance; the unconditional copy has every prompt position set
            to ``mask_id`` and ``logits = un + (cfg_scale + 1) * (cond - un)``.
        remasking: ``"low_confidence"`` (commit the tokens with the highest softmax probability of
            the un-noised logits) or ``"random"`` (commit uniformly random positions).
        seed: seeds the ``numpy.random.Generator`` used for Gumbel noise and random remasking.
        progress: optional ``progress(step_done, total_steps)`` called after every step.

    Returns:
        int64 ``[B, Lp + gen_length]``: the prompt followed by the generated tokens. Committed tokens
        are never remasked; the prompt is returned unchanged (unless it contains ``mask_id`` itself,
        which the official code also treats as a position to fill).
    """
    prompt = _check_prompt(prompt, mask_id)
    steps, gen_length, block_length, temperature, cfg_scale, seed = _check_llada_args(
        steps, gen_length, block_length, temperature, cfg_scale, remasking, seed)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks

    rng = np.random.default_rng(seed)
    B, Lp = prompt.shape
    x = np.full((B, Lp + gen_length), mask_id, dtype=np.int64)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id

    done = 0
    for num_block in range(num_blocks):
        b1 = Lp + (num_block + 1) * block_length
        num_transfer = get_num_transfer_tokens(x[:, b1 - block_length:b1] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            # A step that cannot commit anything (more steps than masks) leaves the canvas as it is; the
            # official code still runs the model, we skip the call.
            if num_transfer[:, i].any():
                r, c, logits = _candidate_logits(logits_fn, x, prompt_index, b1, mask_id, cfg_scale)
                x0c = _predict(logits, temperature, rng)
                conf = _confidence(logits, x0c, remasking, rng)
                _commit(x, r, c, x0c, conf, num_transfer[:, i])
            done += 1
            _report(progress, done, steps)
    return x


def _check_llada_args(steps, gen_length, block_length, temperature, cfg_scale, remasking,
                      seed) -> tuple[int, int, int, float, float, int]:
    """Validated ``(steps, gen_length, block_length, temperature, cfg_scale, seed)``."""
    steps = _check_int("steps", steps, 1)
    gen_length = _check_int("gen_length", gen_length, 1)
    block_length = _check_int("block_length", block_length, 1)
    temperature = _check_float("temperature", temperature)
    cfg_scale = _check_float("cfg_scale", cfg_scale)
    if remasking not in LLADA_REMASKING:
        raise QdllmError(f"remasking must be one of {', '.join(LLADA_REMASKING)}; got {remasking!r}")
    if gen_length % block_length != 0:
        raise QdllmError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
            f"e.g. block_length={gen_length} for a single block"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise QdllmError(
            f"steps ({steps}) must be a multiple of the number of blocks "
            f"({num_blocks} = gen_length {gen_length} / block_length {block_length})"
        )
    return steps, gen_length, block_length, temperature, cfg_scale, _check_int("seed", seed, 0)


def _candidate_logits(logits_fn: LogitsFn, x: np.ndarray, prompt_index: np.ndarray, block_end: int, mask_id: int,
                      cfg_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions that may be committed now and their logits: ``(rows, cols, float32 [M, V])``.

    Candidates are the masked positions of the current block and before it. The official code computes
    x0 and the confidence everywhere and then sets the rest to x / -inf; computing them only where they
    can matter gives the same result with less memory. With ``cfg_scale > 0`` the model also sees an
    unconditional copy (prompt masked) and ``logits = un + (cfg_scale + 1) * (cond - un)`` in float32.
    """
    B = x.shape[0]
    cand = x == mask_id
    cand[:, block_end:] = False
    r, c = np.nonzero(cand)
    if cfg_scale > 0.0:
        un_x = x.copy()
        un_x[prompt_index] = mask_id
        both = _call_logits(logits_fn, np.concatenate([x, un_x], axis=0))
        cond, un = both[:B][r, c], both[B:][r, c]
        return r, c, un + np.float32(cfg_scale + 1.0) * (cond - un)
    return r, c, _call_logits(logits_fn, x)[r, c]


def _predict(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """The token each candidate would become, int64 ``[M]``: argmax, or Gumbel-max at ``temperature > 0``.

    Official: argmax of ``exp(l) / (-log u) ** T`` in float64. We take the argmax of its log,
    ``l - T * log(-log u)``: the same token (log is monotonic) without overflowing exp for large logits.
    """
    if temperature == 0.0:
        return np.argmax(logits, axis=-1)
    u = rng.random(logits.shape)
    with np.errstate(divide="ignore"):
        g = np.log(-np.log(u))
    return np.argmax(logits.astype(np.float64) - temperature * g, axis=-1)


def _confidence(logits: np.ndarray, x0c: np.ndarray, remasking: str, rng: np.random.Generator) -> np.ndarray:
    """float64 ``[M]``: the softmax probability of the predicted token under the un-noised logits
    (``low_confidence``), or uniform noise (``random``)."""
    if remasking == "low_confidence":
        logp = _log_softmax64(logits)
        return np.exp(logp[np.arange(logits.shape[0]), x0c])
    return rng.random(x0c.shape[0])


def _commit(x: np.ndarray, r: np.ndarray, c: np.ndarray, x0c: np.ndarray, conf: np.ndarray, counts: np.ndarray) -> None:
    """In place: in each row ``j`` of ``x``, write the ``counts[j]`` most confident candidates' tokens."""
    B, T = x.shape
    x0 = x.copy()
    x0[r, c] = x0c
    confidence = np.full((B, T), -np.inf)
    confidence[r, c] = conf
    for j in range(B):
        sel = _top_indices(confidence[j], int(counts[j]))
        x[j, sel] = x0[j, sel]
