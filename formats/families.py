"""The model families as data: config keys, tensor names and shapes, GGUF names and flags.

This is the one table every part reads (PyTorch models, quantizer, GGUF and ONNX writers, the
NumPy runtime). Shapes are NumPy / PyTorch order: a linear weight is ``[n_out, n_in]``.
Sources: ``shared/research/models.md`` (checkpoint layouts) and ``formats.md`` (llama.cpp names).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from formats.errors import QdllmError


@dataclass(frozen=True)
class HParams:
    """Architecture hyper-parameters, family-neutral. ``n_vocab`` is the number of logit rows."""

    family: str  # "llada" | "dream"
    n_vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    mask_token_id: int
    context_length: int
    head_dim: int = 0  # 0: d_model // n_heads
    bos_token_id: int = -1  # -1: none
    eos_token_id: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

    @property
    def spec(self) -> "Family":
        return FAMILIES[self.family]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HParams":
        return cls(**d)


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor. ``hf`` and ``gguf`` are name templates with ``{i}`` for the layer."""

    role: str  # llama.cpp short name, e.g. "attn_q.weight"; our canonical key
    hf: str
    gguf: str
    shape: Callable[[HParams], tuple[int, ...]]
    per_layer: bool
    linear: bool = False  # a quantizable matmul weight


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


@dataclass(frozen=True)
class Family:
    """Everything that differs between LLaDA and Dream, as data."""

    name: str  # our id and the llama.cpp architecture string
    model_types: tuple[str, ...]  # accepted config.json "model_type" values
    architecture: str  # config.json "architectures"[0] as published
    config_keys: dict[str, tuple[str, ...]]  # HParams field -> HF keys, first present wins
    defaults: dict[str, Any]
    tensors: tuple[TensorSpec, ...]
    shift_logits: bool  # logits row i predicts token i+1 (Dream): consumers shift right by one
    qkv_bias: bool
    gguf_rope: str  # "norm" (interleaved pairs, Q/K rows permuted on export) | "neox"
    layer_prefix: str  # HF prefix of block i, for streaming one block at a time
    config_constants: dict[str, Any]  # fixed fields of a published config.json

    def config_from_hparams(self, hp: HParams, **extra: Any) -> dict[str, Any]:
        """A ``config.json`` dict in the published layout for ``hp`` (token ids etc. in ``extra``)."""
        cfg: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_types[0]}
        cfg.update(self.config_constants)
        for fld, keys in self.config_keys.items():
            for k in keys:
                cfg[k] = getattr(hp, fld)
        cfg.update(extra)
        return cfg

    def hparams_from_config(self, cfg: dict[str, Any], where: str = "config.json") -> HParams:
        """Read an official ``config.json`` dict; a missing required key is a clear error."""
        values: dict[str, Any] = {}
        for fld, keys in self.config_keys.items():
            for k in keys:
                if k in cfg and cfg[k] is not None:
                    values[fld] = cfg[k]
                    break
            else:
                if fld in self.defaults:
                    values[fld] = self.defaults[fld](cfg) if callable(self.defaults[fld]) else self.defaults[fld]
                else:
                    raise QdllmError(
                        f"{where}: required key {' or '.join(repr(k) for k in keys)} is missing "
                        f"(a {self.name} config needs it; copy the config.json of the published checkpoint)"
                    )
        hp = HParams(family=self.name, **values)
        if hp.d_model % hp.n_heads or hp.n_heads % hp.n_kv_heads:
            raise QdllmError(f"{where}: d_model {hp.d_model}, heads {hp.n_heads}/{hp.n_kv_heads} do not divide")
        for key in ("weight_tying", "tie_word_embeddings", "include_bias"):
            if cfg.get(key):
                raise QdllmError(f"{where}: {key}=true is not supported (published {self.name} models have it false)")
        return hp

    def layer_tensors(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.per_layer]

    def global_tensors(self) -> list[TensorSpec]:
        return [t for t in self.tensors if not t.per_layer]

    def linear_roles(self) -> list[str]:
        return [t.role for t in self.tensors if t.linear]

    def hf_names(self, hp: HParams) -> dict[str, str]:
        """Canonical (llama.cpp) name -> Hugging Face name, for every tensor of the model."""
        return {spec.gguf.format(i=i): hf for hf, (spec, i, _) in self.expected(hp).items()}

    def expected(self, hp: HParams) -> dict[str, tuple[TensorSpec, int | None, tuple[int, ...]]]:
        """HF name -> (spec, layer index or None, shape) for every tensor of a checkpoint."""
        out = {}
        for t in self.tensors:
            layers = range(hp.n_layers) if t.per_layer else [None]
            for i in layers:
                out[t.hf.format(i=i)] = (t, i, t.shape(hp))
        return out


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

FAMILIES: dict[str, Family] = {"llada": LLADA, "dream": DREAM}


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
