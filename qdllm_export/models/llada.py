"""LLaDA (``LLaDAModelLM``), as the published modeling_llada.py computes it for ``block_type: llama``.

Parameter names mirror the checkpoint (``model.transformer.blocks.N.q_proj.weight``), so a state dict
loads by name. Bidirectional attention, rotate-half RoPE in fp32, RMSNorm in fp32,
SwiGLU ``ff_out(silu(ff_proj(h)) * up_proj(h))`` (``ff_proj`` is the gate), untied head, no logit shift.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats.families import HParams
from qdllm_export.models.layers import DiffusionLM, RMSNorm, apply_rope, attention, merge_heads, split_heads


class LLaDABlock(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        d, hd = hp.d_model, hp.head_dim
        self.n_heads, self.n_kv_heads = hp.n_heads, hp.n_kv_heads
        self.attn_norm = RMSNorm(d, hp.norm_eps)
        self.q_proj = nn.Linear(d, hp.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, hp.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, hp.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(hp.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, hp.norm_eps)
        self.ff_proj = nn.Linear(d, hp.d_ff, bias=False)
        self.up_proj = nn.Linear(d, hp.d_ff, bias=False)
        self.ff_out = nn.Linear(hp.d_ff, d, bias=False)

    def linears(self) -> dict[str, nn.Linear]:
        """Canonical role -> module, in the order their inputs become available."""
        return {"attn_q": self.q_proj, "attn_k": self.k_proj, "attn_v": self.v_proj, "attn_output": self.attn_out,
                "ffn_gate": self.ff_proj, "ffn_up": self.up_proj, "ffn_down": self.ff_out}

    def norms(self) -> dict[str, RMSNorm]:
        """Canonical name -> the RMSNorm before the attention and the FFN."""
        return {"attn_norm": self.attn_norm, "ffn_norm": self.ff_norm}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), cos, sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        x = x + self.attn_out(merge_heads(attention(q, k, v, key_mask)))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(hp.n_vocab, hp.d_model),
                "blocks": nn.ModuleList(LLaDABlock(hp) for _ in range(hp.n_layers)),
                "ln_f": RMSNorm(hp.d_model, hp.norm_eps),
                "ff_out": nn.Linear(hp.d_model, hp.n_vocab, bias=False),
            }
        )


class LLaDAModelLM(DiffusionLM):
    """``forward(ids [B, T] long) -> logits [B, T, V]``; row i scores token i."""

    def __init__(self, hp: HParams):
        super().__init__()
        self.hp = hp
        self.model = LLaDAModel(hp)

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.transformer["blocks"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](ids)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["ff_out"](self.model.transformer["ln_f"](x))


Block = LLaDABlock
Model = LLaDAModelLM
