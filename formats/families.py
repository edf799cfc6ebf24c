"""The model families as data: config keys, tensor names and shapes, GGUF names and flags.

This is the one table every part reads (PyTorch models, quantizer, GGUF and ONNX writers, the
NumPy runtime). Shapes are NumPy / PyTorch order: a linear weight is ``[n_out, n_in]``. The
schema the tables fill (``HParams``, ``TensorSpec``, ``Family``) is ``formats.family_schema``.
Sources: ``shared/research/models.md`` (checkpoint layouts) and ``formats.md`` (llama.cpp names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from formats.errors import QdllmError
from formats.family_schema import FAMILIES, MOE_FIELDS, Family, HParams, TensorSpec

__all__ = ["FAMILIES", "MOE_FIELDS", "Family", "HParams", "TensorSpec", "DREAM", "LLADA", "LLADA_MOE",
           "family_for_config", "read_config"]


def _layer_tensors(hf_names: dict[str, str], qkv_bias: bool) -> list[TensorSpec]:
    """The per-layer tensors of a LLaMA-style block, from a role -> HF name template map."""
    q = lambda h: (h.n_heads * h.head_dim, h.d_model)  # noqa: E731
    kv = lambda h: (h.n_kv_heads * h.head_dim, h.d_model)  # noqa: E731
    shapes: dict[str, Callable[[HParams], tuple[int, ...]]] = {
        "attn_norm.weight": lambda h: (h.d_model,),
        "attn_q.weight": q,
        "attn_k.weight": kv,
        "attn_v.weight": kv,
        "attn_output.weight": lambda h: (h.d_model, h.n_heads * h.head_dim),
        "ffn_norm.weight": lambda h: (h.d_model,),
        "ffn_gate.weight": lambda h: (h.d_ff, h.d_model),
        "ffn_up.weight": lambda h: (h.d_ff, h.d_model),
        "ffn_down.weight": lambda h: (h.d_model, h.d_ff),
    }
    if qkv_bias:
        shapes["attn_q.bias"] = lambda h: (h.n_heads * h.head_dim,)
        shapes["attn_k.bias"] = lambda h: (h.n_kv_heads * h.head_dim,)
        shapes["attn_v.bias"] = lambda h: (h.n_kv_heads * h.head_dim,)
    out = []
    for role, shape in shapes.items():
        linear = role.endswith(".weight") and not role.endswith("norm.weight")
        out.append(TensorSpec(role, hf_names[role], "blk.{i}." + role, shape, True, linear))
    return out


def _global_tensors(embd: str, norm: str, head: str) -> list[TensorSpec]:
    return [
        TensorSpec("token_embd.weight", embd, "token_embd.weight", lambda h: (h.n_vocab, h.d_model), False),
        TensorSpec("output_norm.weight", norm, "output_norm.weight", lambda h: (h.d_model,), False),
        TensorSpec("output.weight", head, "output.weight", lambda h: (h.n_vocab, h.d_model), False),
    ]




LLADA = Family(
    name="llada",
    model_types=("llada",),
    architecture="LLaDAModelLM",
    config_keys={
        "n_vocab": ("embedding_size", "vocab_size"),
        "d_model": ("d_model",),
        "n_layers": ("n_layers",),
        "n_heads": ("n_heads",),
        "n_kv_heads": ("n_kv_heads",),
        "d_ff": ("mlp_hidden_size",),
        "rope_theta": ("rope_theta",),
        "norm_eps": ("rms_norm_eps",),
        "mask_token_id": ("mask_token_id",),
        "context_length": ("max_sequence_length",),
        "bos_token_id": ("bos_token_id",),
        "eos_token_id": ("eos_token_id",),
    },
    defaults={
        "n_kv_heads": lambda c: c["n_heads"],
        "d_ff": lambda c: int(c.get("mlp_ratio", 4) * c["d_model"]),
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "context_length": 4096,
        "bos_token_id": -1,
        "eos_token_id": -1,
    },
    tensors=tuple(
        _global_tensors("model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight")
        + _layer_tensors(
            {
                "attn_norm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
                "attn_q.weight": "model.transformer.blocks.{i}.q_proj.weight",
                "attn_k.weight": "model.transformer.blocks.{i}.k_proj.weight",
                "attn_v.weight": "model.transformer.blocks.{i}.v_proj.weight",
                "attn_output.weight": "model.transformer.blocks.{i}.attn_out.weight",
                "ffn_norm.weight": "model.transformer.blocks.{i}.ff_norm.weight",
                "ffn_gate.weight": "model.transformer.blocks.{i}.ff_proj.weight",
                "ffn_up.weight": "model.transformer.blocks.{i}.up_proj.weight",
                "ffn_down.weight": "model.transformer.blocks.{i}.ff_out.weight",
            },
            qkv_bias=False,
        )
    ),
    shift_logits=False,
    qkv_bias=False,
    gguf_rope="norm",
    layer_prefix="model.transformer.blocks.{i}.",
    config_constants={
        "block_type": "llama", "rope": True, "rope_full_precision": True, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "activation_type": "silu",
        "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False,
        "weight_tying": False, "scale_logits": False, "input_emb_norm": False, "alibi": False,
        "use_cache": False, "init_fn": "mitchell", "init_std": 0.02, "precision": "amp_bf16",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    },
)

DREAM = Family(
    name="dream",
    model_types=("Dream", "dream"),
    architecture="DreamModel",
    config_keys={
        "n_vocab": ("vocab_size",),
        "d_model": ("hidden_size",),
        "n_layers": ("num_hidden_layers",),
        "n_heads": ("num_attention_heads",),
        "n_kv_heads": ("num_key_value_heads",),
        "d_ff": ("intermediate_size",),
        "rope_theta": ("rope_theta",),
        "norm_eps": ("rms_norm_eps",),
        "mask_token_id": ("mask_token_id",),
        "context_length": ("max_position_embeddings",),
        "bos_token_id": ("bos_token_id",),
        "eos_token_id": ("eos_token_id",),
    },
    defaults={
        "n_kv_heads": lambda c: c["num_attention_heads"],
        "rope_theta": 10000.0,
        "norm_eps": 1e-6,
        "context_length": 2048,
        "bos_token_id": -1,
        "eos_token_id": -1,
    },
    tensors=tuple(
        _global_tensors("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        + _layer_tensors(
            {
                "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
                "attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
                "attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
                "attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
                "attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
                "attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
                "attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
                "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
                "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
                "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
                "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
                "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
            },
            qkv_bias=True,
        )
    ),
    shift_logits=True,
    qkv_bias=True,
    gguf_rope="neox",
    layer_prefix="model.layers.{i}.",
    config_constants={
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_dropout": 0.0,
        "use_cache": False, "use_sliding_window": False, "torch_dtype": "bfloat16",
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    },
)


def _moe_layer_tensors() -> list[TensorSpec]:
    """LLaDA-MoE's per-layer tensors: Qwen2-style attention without biases plus per-head q/k RMSNorm, the router
    (``ffn_gate_inp``, kept in float: not a quantized linear) and the routed experts (no shared expert)."""
    p = "model.layers.{i}."
    q = lambda h: (h.n_heads * h.head_dim, h.d_model)  # noqa: E731
    kv = lambda h: (h.n_kv_heads * h.head_dim, h.d_model)  # noqa: E731
    vec = lambda h: (h.d_model,)  # noqa: E731
    head = lambda h: (h.head_dim,)  # noqa: E731
    return [
        TensorSpec("attn_norm.weight", p + "input_layernorm.weight", "blk.{i}.attn_norm.weight", vec, True),
        TensorSpec("attn_q.weight", p + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight", q, True, True),
        TensorSpec("attn_k.weight", p + "self_attn.k_proj.weight", "blk.{i}.attn_k.weight", kv, True, True),
        TensorSpec("attn_v.weight", p + "self_attn.v_proj.weight", "blk.{i}.attn_v.weight", kv, True, True),
        TensorSpec("attn_q_norm.weight", p + "self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", head, True),
        TensorSpec("attn_k_norm.weight", p + "self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", head, True),
        TensorSpec("attn_output.weight", p + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight",
                   lambda h: (h.d_model, h.n_heads * h.head_dim), True, True),
        TensorSpec("ffn_norm.weight", p + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", vec, True),
        TensorSpec("ffn_gate_inp.weight", p + "mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight",
                   lambda h: (h.n_expert, h.d_model), True),
        TensorSpec("ffn_gate_exps.weight", p + "mlp.experts.{x}.gate_proj.weight", "blk.{i}.ffn_gate_exps.{x}.weight",
                   lambda h: (h.d_ff_exp, h.d_model), True, True, True, "blk.{i}.ffn_gate_exps.weight"),
        TensorSpec("ffn_up_exps.weight", p + "mlp.experts.{x}.up_proj.weight", "blk.{i}.ffn_up_exps.{x}.weight",
                   lambda h: (h.d_ff_exp, h.d_model), True, True, True, "blk.{i}.ffn_up_exps.weight"),
        TensorSpec("ffn_down_exps.weight", p + "mlp.experts.{x}.down_proj.weight", "blk.{i}.ffn_down_exps.{x}.weight",
                   lambda h: (h.d_model, h.d_ff_exp), True, True, True, "blk.{i}.ffn_down_exps.weight"),
    ]


# LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct; llama.cpp's ``llada-moe``, src/models/llada-moe.cpp and
# convert_hf_to_gguf's LLaDAMoEModel): softmax router over all experts, top-k, weights NOT renormalised, no routed
# scaling, no shared expert, every layer MoE, per-head q/k RMSNorm, NEOX RoPE (llama.cpp does not permute Q/K).
LLADA_MOE = Family(
    name="llada-moe",
    model_types=("llada_moe", "lladamoe"),
    architecture="LLaDAMoEModelLM",
    config_keys={
        "n_vocab": ("vocab_size",),
        "d_model": ("hidden_size",),
        "n_layers": ("num_hidden_layers",),
        "n_heads": ("num_attention_heads",),
        "n_kv_heads": ("num_key_value_heads",),
        "d_ff": ("dense_intermediate_size",),
        "rope_theta": ("rope_theta",),
        "norm_eps": ("rms_norm_eps",),
        "mask_token_id": ("mask_token_id",),
        "context_length": ("max_position_embeddings",),
        "bos_token_id": ("bos_token_id",),
        "eos_token_id": ("eos_token_id",),
        "n_expert": ("num_experts", "num_local_experts"),
        "n_expert_used": ("num_experts_per_tok",),
        "d_ff_exp": ("expert_intermediate_size", "moe_intermediate_size"),
    },
    defaults={
        "n_kv_heads": lambda c: c["num_attention_heads"],
        "d_ff": lambda c: int(c.get("expert_intermediate_size") or c.get("moe_intermediate_size") or 0)
        * int(c.get("num_experts_per_tok") or 0),
        "rope_theta": 50000.0,
        "norm_eps": 1e-5,
        "mask_token_id": 156895,  # hard-coded by llama.cpp's converter for LLaDA-MoE
        "context_length": 8192,
        "bos_token_id": -1,
        "eos_token_id": -1,
    },
    tensors=tuple(
        _global_tensors("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight") + _moe_layer_tensors()
    ),
    shift_logits=False,
    qkv_bias=False,
    gguf_rope="neox",
    layer_prefix="model.layers.{i}.",
    config_constants={
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "qk_layernorm": True,
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False, "norm_topk_prob": False,
        "routed_scaling_factor": 1, "shared_expert_intermediate_size": None, "partial_rotary_factor": 1.0,
        "rope_scaling": None, "use_cache": False, "torch_dtype": "bfloat16",
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                     "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    },
    sampler="llada",
    qk_norm=True,
    config_checks={
        "hidden_act": (("silu",), "the experts are SwiGLU with SiLU"),
        "qk_layernorm": ((True,), "llama.cpp's llada-moe always applies the q/k RMSNorm"),
        "moe_router_score_function": (("softmax",), "the router is a softmax over all experts (llama.cpp's llada-moe)"),
        "moe_router_enable_expert_bias": ((False, None), "no expert-selection bias in llama.cpp's llada-moe"),
        "norm_topk_prob": ((False, None), "llama.cpp's llada-moe does not renormalise the top-k weights"),
        "routed_scaling_factor": ((1, 1.0, None), "llama.cpp's llada-moe does not scale the routed weights"),
        "shared_expert_intermediate_size": ((None, 0), "shared experts are not in llama.cpp's llada-moe"),
        "moe_layer_freq": ((1,), "every layer must be a mixture of experts (dense layers are not in llama.cpp's "
                                 "llada-moe)"),
        "partial_rotary_factor": ((1.0, 1, None), "partial RoPE is not supported"),
        "attention_bias": ((False, None), "LLaDA-MoE's attention has no biases"),
        "rope_scaling": ((None,), "RoPE scaling is not supported"),
    },
)

FAMILIES.update({"llada": LLADA, "dream": DREAM, "llada-moe": LLADA_MOE})


def family_for_config(cfg: dict[str, Any], where: str = "config.json") -> Family:
    """The family of an HF ``config.json`` dict, by ``model_type`` (then ``architectures``)."""
    mt = cfg.get("model_type")
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    archs = cfg.get("architectures") or []
    for fam in FAMILIES.values():
        if fam.architecture in archs:
            return fam
    known = ", ".join(repr(t) for f in FAMILIES.values() for t in f.model_types)
    raise QdllmError(f"{where}: unknown model_type {mt!r}; qdllm-export supports {known}")


def read_config(folder: str | Path) -> tuple[Family, HParams, dict[str, Any]]:
    """Family, hyper-parameters and raw dict of the ``config.json`` in ``folder``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise QdllmError(f"{path}: not found; a model folder needs the config.json it was published with")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QdllmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise QdllmError(f"{path}: expected a JSON object")
    fam = family_for_config(cfg, str(path))
    return fam, fam.hparams_from_config(cfg, str(path)), cfg
