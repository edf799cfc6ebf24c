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
    steps_per_block = steps // num_blocks
    seed = _check_int("seed", seed, 0)

    rng = np.random.default_rng(seed)
    B, Lp = prompt.shape
    T = Lp + gen_length
    x = np.full((B, T), mask_id, dtype=np.int64)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id
    cfg = np.float32(cfg_scale + 1.0)

    done = 0
    for num_block in range(num_blocks):
        b0 = Lp + num_block * block_length
        b1 = b0 + block_length
        num_transfer = get_num_transfer_tokens(x[:, b0:b1] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            if not num_transfer[:, i].any():
                # Nothing can be committed this step (more steps than masks): the official code
                # still runs the model, but the canvas cannot change, so we skip the call.
                done += 1
                _report(progress, done, steps)
                continue
            mask_index = x == mask_id
            # Only masked positions of the current block (and before it) can be committed: the
            # official code computes x0 and the confidence everywhere and then sets the rest to
            # x / -inf; we compute them only where they can matter (the same result, less memory).
            cand = mask_index.copy()
            cand[:, b1:] = False
            r, c = np.nonzero(cand)
            if cfg_scale > 0.0:
                un_x = x.copy()
                un_x[prompt_index] = mask_id
                both = _call_logits(logits_fn, np.concatenate([x, un_x], axis=0))
                cond, un = both[:B][r, c], both[B:][r, c]
                logits = un + cfg * (cond - un)  # float32, as the official code computes it
            else:
                logits = _call_logits(logits_fn, x)[r, c]  # [M, V]

            if temperature == 0.0:
                x0c = np.argmax(logits, axis=-1)
            else:
                # Official: argmax of exp(l) / (-log u) ** T in float64. We take the argmax of its
                # log, l - T * log(-log u): the same token (log is monotonic) without overflowing
                # exp for large logits.
                u = rng.random(logits.shape)
                with np.errstate(divide="ignore"):
                    g = np.log(-np.log(u))
                x0c = np.argmax(logits.astype(np.float64) - temperature * g, axis=-1)

            if remasking == "low_confidence":
                # softmax probability of the chosen token, of the un-noised logits
                logp = _log_softmax64(logits)
                pc = np.exp(logp[np.arange(logits.shape[0]), x0c])
            else:
                pc = rng.random(r.shape[0])

            x0 = x.copy()
            x0[r, c] = x0c
            confidence = np.full((B, T), -np.inf)
            confidence[r, c] = pc
            for j in range(B):
                sel = _top_indices(confidence[j], int(num_transfer[j, i]))
                x[j, sel] = x0[j, sel]
            done += 1
            _report(progress, done, steps)
    return x


# --------------------------------------------------------------------------------------------
# Dream
# --------------------------------------------------------------------------------------------
