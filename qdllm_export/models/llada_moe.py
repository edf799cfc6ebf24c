"""LLaDA-MoE (``LLaDAMoEModelLM``), as the published modeling_lladamoe.py computes it.

Parameter names mirror the checkpoint (``model.layers.N.self_attn.q_proj.weight``,
``model.layers.N.mlp.gate.weight``, ``model.layers.N.mlp.experts.X.gate_proj.weight``, ``lm_head.weight``).
Bidirectional attention without biases; q and k get a per-head RMSNorm (weight ``[head_dim]``) before
rotate-half RoPE; the feed-forward is a mixture of SwiGLU experts: router logits ``gate(h) [T, E]``,
``p = softmax(logits)`` in fp32, the ``k`` largest ``p`` pick the experts (ties: lowest index), and the output
is ``sum_j p_j * expert_j(h)`` with the weights **not** renormalised (``norm_topk_prob = False``). No logit shift.

Each expert is an ``nn.Linear`` triple called only on the tokens routed to it, so a forward hook on an expert
sees exactly its routed inputs (the pipeline's per-expert Hessians) and an expert no token reaches is not called.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats.families import HParams
from qdllm_export.models.layers import RMSNorm, StackLM, apply_rope, attention, merge_heads, split_heads

EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


class LLaDAMoEAttention(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        d, hd = hp.d_model, hp.head_dim
        self.n_heads, self.n_kv_heads = hp.n_heads, hp.n_kv_heads
        self.q_proj = nn.Linear(d, hp.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, hp.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, hp.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(hp.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, hp.norm_eps)
        self.k_norm = RMSNorm(hd, hp.norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q = apply_rope(self.q_norm(split_heads(self.q_proj(h), self.n_heads)), cos, sin)
        k = apply_rope(self.k_norm(split_heads(self.k_proj(h), self.n_kv_heads)), cos, sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        return self.o_proj(merge_heads(attention(q, k, v, key_mask)))


class LLaDAMoEExpert(nn.Module):
    """One expert: ``down(silu(gate(x)) * up(x))`` on its routed tokens ``x [n, d]``."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights ``[T, k]`` float32, expert ids ``[T, k]`` long) of router ``logits [T, E]``: softmax in fp32, the
    ``k`` largest probabilities, not renormalised. Ties go to the lowest expert id (a stable sort)."""
    p = torch.softmax(logits.float(), dim=-1)
    idx = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.gather(p, 1, idx), idx


# Calibration fill (``mlp.fill``, on only for the pipeline's Hessian passes: ``block_pass.collect_hessians``): an
# expert that receives fewer than FILL_SHARE of its fair share ``N * k / E`` of a batch's N tokens also sees all N
# tokens, scaled so that together they weigh as the missing tokens: its Hessian ``sum_routed x x^T + (m / N) sum_all
# x x^T`` (m = fair share - routed) is damped toward the layer's pooled one instead of resting on a handful of tokens
# (or none: an all-zero H). The fill runs before the routed loop, one hooked call of the expert on its routed and the
# scaled tokens together, so a pass that stops once every hook has fired cannot skip it; the outputs are unchanged:
# a filled expert's routed output is computed again without hooks.
FILL_SHARE = 0.25


class LLaDAMoESparseMoeBlock(nn.Module):
    def __init__(self, hp: HParams, fill: bool = False):
        super().__init__()
        self.top_k = hp.n_expert_used
        self.gate = nn.Linear(hp.d_model, hp.n_expert, bias=False)
        self.experts = nn.ModuleList(LLaDAMoEExpert(hp.d_model, hp.d_ff_exp) for _ in range(hp.n_expert))
        self.fill = fill
        self.last_counts: torch.Tensor | None = None  # tokens routed to each expert by the last forward
        self.filled: list[int] = []  # experts the last forward filled (calibration)
        self.tally: dict[str, torch.Tensor | int] | None = None  # set by the pipeline: see :meth:`add_tally`

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        w, idx = route(self.gate(x), self.top_k)
        out = torch.zeros_like(x)
        counts = torch.bincount(idx.reshape(-1), minlength=len(self.experts))
        self.last_counts = counts
        if self.tally is not None:
            self.add_tally(counts, x.shape[0])
        # routed slots grouped by expert, tokens ascending within each (a stable sort of the flat [T * k] ids):
        # one host sync for the counts instead of one per expert
        order = torch.sort(idx.reshape(-1), stable=True).indices
        rows_all, slot_all = order // self.top_k, order % self.top_k
        sizes = counts.tolist()
        starts = [0, *itertools.accumulate(sizes)]
        self.filled = self._starved(sizes, x.shape[0]) if self.fill else []
        for e in self.filled:
            self._fill(self.experts[e], x, rows_all[starts[e] : starts[e] + sizes[e]], sizes[e])
        for e, c in enumerate(sizes):
            if c == 0:
                continue
            rows, slot = rows_all[starts[e] : starts[e] + c], slot_all[starts[e] : starts[e] + c]
            y = _unhooked(self.experts[e], x[rows]) if e in self.filled else self.experts[e](x[rows])
            out.index_add_(0, rows, (y * w[rows, slot, None].to(y.dtype)).to(out.dtype))  # autocast: y may be bf16
        return out.reshape(shape)

    def _fair(self, n: int) -> float:
        """An expert's fair share of ``n`` tokens: ``n * k / E`` routed slots."""
        return n * self.top_k / len(self.experts)

    def add_tally(self, counts: torch.Tensor, n: int) -> None:
        """Accumulate into ``tally``: ``tokens`` (int), ``batches`` (int), ``routed`` long ``[E]`` (tokens routed to
        each expert) and ``starved`` long ``[E]`` (batches in which an expert got under ``FILL_SHARE`` of its fair
        share ``n * k / E``: those the calibration fill damps toward the pooled Hessian)."""
        t = self.tally
        E = len(self.experts)
        starved = (counts < FILL_SHARE * self._fair(n)).long().cpu()
        if not t:
            t.update(tokens=0, batches=0, routed=torch.zeros(E, dtype=torch.long), starved=torch.zeros(E, dtype=torch.long))
        t["tokens"] += n
        t["batches"] += 1
        t["routed"] += counts.cpu()
        t["starved"] += starved

    def _starved(self, counts: list[int], n: int) -> list[int]:
        """Experts under ``FILL_SHARE`` of their fair share of ``n`` tokens."""
        return [e for e, c in enumerate(counts) if c < FILL_SHARE * self._fair(n)]

    @torch.no_grad()
    def _fill(self, ex: LLaDAMoEExpert, x: torch.Tensor, rows: torch.Tensor, c: int) -> None:
        """One hooked call of ``ex`` on its ``c`` routed tokens ``x[rows]`` and all ``n`` tokens scaled by
        ``s = sqrt((fair - c) / n)``; the result is discarded."""
        n = x.shape[0]
        s = ((self._fair(n) - c) / n) ** 0.5
        z = torch.cat([x[rows], x * s])
        g, u = ex.gate_proj(z), ex.up_proj(z)  # the hooks see the scaled tokens; g[c:] = s * gate(x)
        # the down's input: silu(gate(x)) * up(x) for the routed rows, s times that for the filled ones
        ex.down_proj(torch.cat([F.silu(g[:c]) * u[:c], F.silu(g[c:] / s) * u[c:]]))


def _unhooked(ex: LLaDAMoEExpert, x: torch.Tensor) -> torch.Tensor:
    """``ex(x)`` computed as its forward computes it, without calling its linears' forward hooks."""
    return F.linear(F.silu(F.linear(x, ex.gate_proj.weight)) * F.linear(x, ex.up_proj.weight), ex.down_proj.weight)


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.input_layernorm = RMSNorm(hp.d_model, hp.norm_eps)
        self.self_attn = LLaDAMoEAttention(hp)
        self.post_attention_layernorm = RMSNorm(hp.d_model, hp.norm_eps)
        self.mlp = LLaDAMoESparseMoeBlock(hp)
        self.n_heads, self.n_kv_heads = hp.n_heads, hp.n_kv_heads

    def norms(self) -> dict[str, RMSNorm]:
        """Canonical name -> the RMSNorm before the attention and the mixture."""
        return {"attn_norm": self.input_layernorm, "ffn_norm": self.post_attention_layernorm}

    def linears(self) -> dict[str, nn.Linear]:
        """Canonical role -> module, in the order their inputs become available; an expert's role is
        ``ffn_gate_exps.X`` (its canonical name ``blk.N.ffn_gate_exps.X.weight``). The router is not a linear
        to quantize."""
        a = self.self_attn
        out: dict[str, nn.Linear] = {"attn_q": a.q_proj, "attn_k": a.k_proj, "attn_v": a.v_proj, "attn_output": a.o_proj}
        for role, attr in zip(EXPERT_ROLES, ("gate_proj", "up_proj", "down_proj")):
            for x, e in enumerate(self.mlp.experts):
                out[f"{role}.{x}"] = getattr(e, attr)
        return out

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDAMoEModelLM(StackLM):
    """``forward(ids [B, T] long) -> logits [B, T, V]``; row i scores token i."""

    def __init__(self, hp: HParams):
        super().__init__(hp, LLaDAMoEDecoderLayer)


Block = LLaDAMoEDecoderLayer
Model = LLaDAMoEModelLM
