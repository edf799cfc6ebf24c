"""The schema of a model family table: hyper-parameters (``HParams``), one tensor's names and shape
(``TensorSpec``) and a family's config keys, tensors and GGUF names (``Family``).

The tables themselves (LLaDA, Dream, LLaDA-MoE) are ``formats.families``, which fills ``FAMILIES`` and
re-exports these names: import them from there, so that ``HParams.spec`` finds its family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from formats.errors import QdllmError

@dataclass(frozen=True)
class HParams:
    """Architecture hyper-parameters, family-neutral. ``n_vocab`` is the number of logit rows."""

    family: str  # "llada" | "dream" | "llada-moe"
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
    n_expert: int = 0  # experts per layer (0: a dense model)
    n_expert_used: int = 0  # experts each token is routed to
    d_ff_exp: int = 0  # one expert's hidden size
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
        if not self.n_expert:  # dense models keep the dict they always had (imatrix fingerprints, ONNX metadata)
            for k in MOE_FIELDS:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HParams":
        return cls(**d)


MOE_FIELDS = ("n_expert", "n_expert_used", "d_ff_exp")


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor. ``hf`` and ``gguf`` are name templates with ``{i}`` for the layer (and ``{x}`` for
    the expert of a ``per_expert`` tensor).

    An expert's linear is a 2-D tensor of its own everywhere but in llama.cpp's files: canonical name
    ``blk.{i}.ffn_gate_exps.{x}.weight`` (role ``ffn_gate_exps.weight``), and ``stacked`` names the 3-D tensor
    ``[n_expert, n_out, n_in]`` (NumPy order) that holds all experts of a layer in a GGUF file, one ggml type.
    """

    role: str  # llama.cpp short name, e.g. "attn_q.weight"; our canonical key
    hf: str
    gguf: str
    shape: Callable[[HParams], tuple[int, ...]]
    per_layer: bool
    linear: bool = False  # a quantizable matmul weight
    per_expert: bool = False
    stacked: str = ""  # llama.cpp's name of the layer's stacked experts ("blk.{i}.ffn_gate_exps.weight")




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
    sampler: str = ""  # "llada" | "dream": whose sampler and options (default: the family's name)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm, [head_dim])
    # config.json keys whose value must be one this family computes: key -> (accepted values, why); a missing
    # key counts as its first accepted value
    config_checks: dict[str, tuple[tuple[Any, ...], str]] = field(default_factory=dict)

    @property
    def sampler_kind(self) -> str:
        return self.sampler or self.name

    def config_from_hparams(self, hp: HParams, **extra: Any) -> dict[str, Any]:
        """A ``config.json`` dict in the published layout for ``hp`` (token ids etc. in ``extra``)."""
        cfg: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_types[0]}
        cfg.update(self.config_constants)
        for fld, keys in self.config_keys.items():
            for k in keys[:1] if fld in MOE_FIELDS else keys:
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
        for key, (ok, why) in self.config_checks.items():
            val = cfg.get(key, ok[0])
            if val not in ok and not (isinstance(val, list) and all(v in ok for v in val)):
                raise QdllmError(f"{where}: {key}={json.dumps(val)} is not supported: {why}")
        if self.has_experts():
            if hp.n_expert <= 0 or not 0 < hp.n_expert_used <= hp.n_expert or hp.d_ff_exp <= 0:
                raise QdllmError(f"{where}: {hp.n_expert_used} experts used per token of {hp.n_expert} (expert size "
                                 f"{hp.d_ff_exp}): a {self.name} config needs 0 < num_experts_per_tok <= num_experts "
                                 "and expert_intermediate_size > 0")
        return hp

    def has_experts(self) -> bool:
        return any(t.per_expert for t in self.tensors)

    def layer_tensors(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.per_layer]

    def layer_names(self, hp: HParams, i: int) -> list[str]:
        """Canonical names of layer ``i``'s tensors, in table order (an expert tensor: experts 0..n-1)."""
        out = []
        for t in self.layer_tensors():
            xs = range(hp.n_expert) if t.per_expert else [None]
            out.extend(t.gguf.format(i=i, x=x) for x in xs)
        return out

    def spec_of(self, name: str) -> tuple[TensorSpec, int | None, int | None] | None:
        """(spec, layer, expert) of a canonical name, or None when the family has no such tensor."""
        if not name.startswith("blk."):
            return next(((t, None, None) for t in self.tensors if not t.per_layer and t.gguf == name), None)
        _, layer, rest = name.split(".", 2)
        if not layer.isdigit():
            return None
        expert = None
        parts = rest.split(".")
        if len(parts) == 3 and parts[1].isdigit():
            rest, expert = f"{parts[0]}.{parts[2]}", int(parts[1])
        for t in self.layer_tensors():
            if t.role == rest and (expert is not None) == t.per_expert:
                return t, int(layer), expert
        return None

    def global_tensors(self) -> list[TensorSpec]:
        return [t for t in self.tensors if not t.per_layer]

    def linear_roles(self) -> list[str]:
        return [t.role for t in self.tensors if t.linear]

    def hf_names(self, hp: HParams) -> dict[str, str]:
        """Canonical (llama.cpp) name -> Hugging Face name, for every tensor of the model."""
        return {canonical: hf for hf, (_, _, _, canonical) in self.expected_named(hp).items()}

    def expected(self, hp: HParams) -> dict[str, tuple[TensorSpec, int | None, tuple[int, ...]]]:
        """HF name -> (spec, layer index or None, shape) for every tensor of a checkpoint."""
        return {hf: (t, i, shape) for hf, (t, i, shape, _) in self.expected_named(hp).items()}

    def expected_named(self, hp: HParams) -> dict[str, tuple[TensorSpec, int | None, tuple[int, ...], str]]:
        """HF name -> (spec, layer index or None, shape, canonical name) for every tensor of a checkpoint."""
        out = {}
        for t in self.tensors:
            layers = range(hp.n_layers) if t.per_layer else [None]
            experts = range(hp.n_expert) if t.per_expert else [None]
            for i in layers:
                for x in experts:
                    out[t.hf.format(i=i, x=x)] = (t, i, t.shape(hp), t.gguf.format(i=i, x=x))
        return out


FAMILIES: dict[str, Family] = {}  # name -> table, filled by formats.families
