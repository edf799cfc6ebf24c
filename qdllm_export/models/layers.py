"""Pieces both families share, written as the official modeling files compute them."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats.families import HParams


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (LLaDA and Qwen2 order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[seq_len, head_dim]`` float32 for rotate-half RoPE, positions 0..seq_len-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32 on ``x [B, H, T, hd]``; returns x's dtype."""
    dtype = x.dtype
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (h * cos + rot * sin).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention; q ``[B, H, T, hd]``, k/v ``[B, Hkv, T, hd]``; key_mask bool ``[B, T]`` (True = attend)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, H*hd] -> [B, H, T, hd]``."""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, hd] -> [B, T, H*hd]``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class DiffusionLM(nn.Module):
    """``forward(ids [B, T] long, key_mask [B, T] bool | None) -> logits [B, T, V]``: the embedding, every block
    with the RoPE tables of ``T``, the head. A family gives ``blocks``, ``embed`` and ``head``; the alignment of
    the logits (row ``i`` scores token ``i`` or ``i + 1``) is the family's."""

    hp: HParams
    blocks: nn.ModuleList
    embed: Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] long -> x [B, T, d]
    head: Callable[[torch.Tensor], torch.Tensor]  # x [B, T, d] -> logits [B, T, V]

    def forward(self, ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        cos, sin = rope_tables(ids.shape[1], self.hp.head_dim, self.hp.rope_theta, ids.device)
        for blk in self.blocks:
            x = blk(x, cos, sin, key_mask)
        return self.head(x)


class DecoderStack(nn.Module):
    """The ``model.`` part of the Hugging Face layout Dream and LLaDA-MoE share: ``embed_tokens``, ``layers``
    (``n_layers`` of ``layer(hp)``), the final ``norm``."""

    def __init__(self, hp: HParams, layer: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(hp.n_vocab, hp.d_model)
        self.layers = nn.ModuleList(layer(hp) for _ in range(hp.n_layers))
        self.norm = RMSNorm(hp.d_model, hp.norm_eps)


class StackLM(DiffusionLM):
    """``model`` (a ``DecoderStack``) and an untied ``lm_head``: ``model.layers.N.*``, ``lm_head.weight``."""

    def __init__(self, hp: HParams, layer: type[nn.Module]):
        super().__init__()
        self.hp = hp
        self.model = DecoderStack(hp, layer)
        self.lm_head = nn.Linear(hp.d_model, hp.n_vocab, bias=False)

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))
