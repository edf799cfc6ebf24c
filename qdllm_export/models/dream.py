"""Dream (``DreamModel``): Qwen2 layout and names, q/k/v biases, grouped-query attention, bidirectional.

Parameter names mirror the checkpoint (``model.layers.N.self_attn.q_proj.weight``, ``lm_head.weight``).
The raw logits keep the autoregressive alignment of the model it was adapted from: row ``i`` scores
token ``i + 1``; consumers shift (``formats.families.DREAM.shift_logits``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats.families import HParams
from qdllm_export.models.layers import RMSNorm, StackLM, apply_rope, attention, merge_heads, split_heads


class DreamAttention(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        d, hd = hp.d_model, hp.head_dim
        self.n_heads, self.n_kv_heads = hp.n_heads, hp.n_kv_heads
        self.q_proj = nn.Linear(d, hp.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, hp.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, hp.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(hp.n_heads * hd, d, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), cos, sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        return self.o_proj(merge_heads(attention(q, k, v, key_mask)))


class DreamMLP(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.gate_proj = nn.Linear(hp.d_model, hp.d_ff, bias=False)
        self.up_proj = nn.Linear(hp.d_model, hp.d_ff, bias=False)
        self.down_proj = nn.Linear(hp.d_ff, hp.d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DreamDecoderLayer(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.input_layernorm = RMSNorm(hp.d_model, hp.norm_eps)
        self.self_attn = DreamAttention(hp)
        self.post_attention_layernorm = RMSNorm(hp.d_model, hp.norm_eps)
        self.mlp = DreamMLP(hp)

    def linears(self) -> dict[str, nn.Linear]:
        """Canonical role -> module, in the order their inputs become available."""
        a, m = self.self_attn, self.mlp
        return {"attn_q": a.q_proj, "attn_k": a.k_proj, "attn_v": a.v_proj, "attn_output": a.o_proj,
                "ffn_gate": m.gate_proj, "ffn_up": m.up_proj, "ffn_down": m.down_proj}

    def norms(self) -> dict[str, RMSNorm]:
        """Canonical name -> the RMSNorm before the attention and the FFN."""
        return {"attn_norm": self.input_layernorm, "ffn_norm": self.post_attention_layernorm}

    @property
    def n_heads(self) -> int:
        return self.self_attn.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.self_attn.n_kv_heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamModel(StackLM):
    """``forward(ids [B, T] long) -> raw logits [B, T, V]``; row i scores token i + 1."""

    def __init__(self, hp: HParams):
        super().__init__(hp, DreamDecoderLayer)


Block = DreamDecoderLayer
Model = DreamModel
