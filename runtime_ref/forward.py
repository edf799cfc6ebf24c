"""NumPy float32 forward pass of LLaDA and Dream from any ``TensorSource``, with llama.cpp semantics.

One function serves two purposes:

* the reference runtime of GGUF files: ``forward(read_gguf(p).tensors, ids)`` (``llada`` weights are in
  llama.cpp's permuted Q/K order, so the source says ``rope="norm"``: interleaved pairs);
* the independent NumPy reference of the PyTorch models: ``forward(HFTensors(folder), ids)``
  (checkpoint row order, rotate-half RoPE, ``rope="neox"``).

The RoPE kind defaults to the source's ``rope`` attribute ("neox" when it has none). The graph:
``x = token_embd[ids]``; per layer ``h = rms_norm(x) * attn_norm``; ``q, k, v = h W^T (+ bias)``;
RoPE on q and k; bidirectional softmax attention with scale ``1/sqrt(head_dim)`` (GQA: query head
``h`` reads key/value head ``h // (n_heads / n_kv_heads)``), optional key padding mask;
``x += attn_output(att)``; ``h = rms_norm(x) * ffn_norm``; ``x += ffn_down(silu(ffn_gate(h)) * ffn_up(h))``;
finally ``logits = output(rms_norm(x) * output_norm)``. ``llada-moe`` adds a per-head RMSNorm of q and k
(``attn_q_norm`` / ``attn_k_norm``) before RoPE, and its feed-forward is a mixture of experts (``moe``). Weights are fetched one at a time while their
layer runs (a quantized weight is dequantized for its one matmul), so a model is never whole in float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from formats.errors import QdllmError
from formats.stored import is_stored
from runtime_ref.backend import shift_right

ROPE_KINDS = ("norm", "neox")


def rope_kind(source: Any) -> str:
    """The RoPE a source's Q/K rows need: its ``rope`` attribute, else "neox" (checkpoint order)."""
    return getattr(source, "rope", None) or "neox"


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))) * w.astype(np.float32, copy=False)


def silu(x: np.ndarray) -> np.ndarray:
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x)))


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[..., T, head_dim/2]`` float32 for integer positions (angles computed in float64)."""
    inv = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.asarray(positions, dtype=np.float64)[..., None] * inv
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, kind: str) -> np.ndarray:
    """RoPE on ``x [B, H, T, hd]``; ``cos``/``sin`` ``[B or 1, 1, T, hd/2]``.

    "neox" rotates the pairs ``(i, i + hd/2)`` (HF rotate_half), "norm" the pairs ``(2i, 2i+1)``.
    """
    half = x.shape[-1] // 2
    if kind == "neox":
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if kind == "norm":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out
    raise QdllmError(f"unknown RoPE kind {kind!r} (expected one of {ROPE_KINDS})")


def linear(source: Any, name: str, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` for the weight ``name``; uses the source's own ``matmul`` when it has one."""
    mm = getattr(source, "matmul", None)
    if mm is not None:
        return np.asarray(mm(name, x), dtype=np.float32)
    w = source.get(name)
    w = w.dequantize() if is_stored(w) else np.asarray(w, dtype=np.float32)
    return x @ w.T


def embed(source: Any, ids: np.ndarray) -> np.ndarray:
    rows = getattr(source, "get_rows", None)
    if rows is not None:
        return np.asarray(rows("token_embd.weight", ids), dtype=np.float32)
    return np.asarray(source.get("token_embd.weight"), dtype=np.float32)[ids]


def _f32(source: Any, name: str) -> np.ndarray:
    return np.asarray(source.get(name), dtype=np.float32)


def block(source: Any, i: int, x: np.ndarray, rope: str, cos: np.ndarray, sin: np.ndarray,
          attn_mask: np.ndarray | None = None) -> np.ndarray:
    """One transformer layer ``i`` on the residual stream ``x [B, T, d_model]``."""
    hp = source.hparams
    b, t, _ = x.shape
    hd, nh, nkv = hp.head_dim, hp.n_heads, hp.n_kv_heads
    p = f"blk.{i}."
    h = rms_norm(x, _f32(source, p + "attn_norm.weight"), hp.norm_eps)
    q, k, v = (linear(source, p + f"attn_{c}.weight", h) for c in "qkv")
    if hp.spec.qkv_bias:
        q, k, v = (y + _f32(source, p + f"attn_{c}.bias") for y, c in zip((q, k, v), "qkv"))
    q, k = q.reshape(b, t, nh, hd).transpose(0, 2, 1, 3), k.reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
    if hp.spec.qk_norm:
        q = rms_norm(q, _f32(source, p + "attn_q_norm.weight"), hp.norm_eps)
        k = rms_norm(k, _f32(source, p + "attn_k_norm.weight"), hp.norm_eps)
    q, k = apply_rope(q, cos, sin, rope), apply_rope(k, cos, sin, rope)
    v = v.reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
    if nh != nkv:
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hd))  # [B, H, T, T]
    if attn_mask is not None:
        scores = np.where(attn_mask[:, None, None, :], scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    att = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
    x = x + linear(source, p + "attn_output.weight", att)
    h = rms_norm(x, _f32(source, p + "ffn_norm.weight"), hp.norm_eps)
    if hp.n_expert:
        return x + moe(source, i, h)
    ff = silu(linear(source, p + "ffn_gate.weight", h)) * linear(source, p + "ffn_up.weight", h)
    return x + linear(source, p + "ffn_down.weight", ff)


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights ``[T, k]`` float32, expert ids ``[T, k]``) of router ``logits [T, E]``: softmax over all experts,
    the ``k`` largest probabilities (ties: lowest id), not renormalised (llama.cpp's llada-moe)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(p, idx, axis=-1).astype(np.float32), idx


def moe(source: Any, i: int, h: np.ndarray, counts: list | None = None) -> np.ndarray:
    """The mixture-of-experts feed-forward of layer ``i`` on ``h [B, T, d]``: each expert runs on its routed
    tokens only, ``sum_j w_j * down_j(silu(gate_j(h)) * up_j(h))``. ``counts``: if a list, the tokens routed to
    each expert are appended to it (an int array ``[n_expert]``)."""
    hp = source.hparams
    p = f"blk.{i}."
    x = h.reshape(-1, h.shape[-1])
    w, idx = route(linear(source, p + "ffn_gate_inp.weight", x), hp.n_expert_used)
    out = np.zeros_like(x)
    if counts is not None:
        counts.append(np.bincount(idx.reshape(-1), minlength=hp.n_expert))
    for e in np.unique(idx).tolist():
        rows, slot = np.nonzero(idx == e)
        xr = x[rows]
        ff = silu(linear(source, p + f"ffn_gate_exps.{e}.weight", xr)) * linear(source, p + f"ffn_up_exps.{e}.weight", xr)
        out[rows] += linear(source, p + f"ffn_down_exps.{e}.weight", ff) * w[rows, slot, None]  # rows are distinct
    return out.reshape(h.shape)


def head(source: Any, x: np.ndarray) -> np.ndarray:
    """Final norm and output projection: raw logits ``[B, T, V]``."""
    h = rms_norm(x, _f32(source, "output_norm.weight"), source.hparams.norm_eps)
    return linear(source, "output.weight", h)


def forward(source: Any, ids: np.ndarray, rope: str | None = None, attn_mask: np.ndarray | None = None,
            positions: np.ndarray | None = None, hidden: list | None = None) -> np.ndarray:
    """Raw float32 logits ``[B, T, V]`` (row ``i`` is the model's output at position ``i``).

    ``ids`` int ``[B, T]``; ``rope`` "norm" | "neox" (default: ``rope_kind(source)``); ``attn_mask``
    ``[B, T]`` (true / 1 = a real token every position may attend to; padding keys are masked);
    ``positions`` ``[B, T]`` or ``[T]`` (default ``0..T-1``); ``hidden``: if a list, the residual stream
    after the embedding and after every layer is appended to it.
    """
    hp = source.hparams
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise QdllmError(f"token ids must be a non-empty int array [batch, seq], got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= hp.n_vocab:
        raise QdllmError(f"token ids must lie in [0, {hp.n_vocab}), got {ids.min()}..{ids.max()}")
    rope = rope or rope_kind(source)
    if rope not in ROPE_KINDS:
        raise QdllmError(f"unknown RoPE kind {rope!r} (expected one of {ROPE_KINDS})")
    b, t = ids.shape
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask).astype(bool)
        if attn_mask.shape != (b, t):
            raise QdllmError(f"attn_mask has shape {attn_mask.shape}, expected {(b, t)}")
    pos = np.arange(t) if positions is None else np.asarray(positions)
    cos, sin = rope_tables(pos, hp.head_dim, hp.rope_theta)
    cos, sin = cos.reshape(-1, 1, t, hp.head_dim // 2), sin.reshape(-1, 1, t, hp.head_dim // 2)
    x = embed(source, ids)
    if hidden is not None:
        hidden.append(x)
    for i in range(hp.n_layers):
        x = block(source, i, x, rope, cos, sin, attn_mask)
        if hidden is not None:
            hidden.append(x)
    return head(source, x).astype(np.float32, copy=False)


def forward_aligned(source: Any, ids: np.ndarray, **kw: Any) -> np.ndarray:
    """Logits aligned to tokens (row ``i`` scores token ``i``): Dream's shift applied (Backend contract)."""
    logits = forward(source, ids, **kw)
    return shift_right(logits) if source.hparams.spec.shift_logits else logits
