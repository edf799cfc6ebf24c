"""Tiny random checkpoints in the published layouts, built in-process (torch-free).

``make_checkpoint(tmp, "llada")`` writes config.json, (sharded) safetensors and tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from formats.families import FAMILIES, HParams
from formats.safetensors_io import write_checkpoint
from formats.tokenizer import train_bpe

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
) * 4


def tiny_hparams(family: str, *, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
                 d_ff: int = 256, n_vocab: int = 300) -> HParams:
    """Small but GGUF/quantizer-compatible shapes (n_in multiples of 128). Dream defaults to GQA 4/2."""
    if n_kv_heads is None:
        n_kv_heads = 2 if family == "dream" else n_heads
    return HParams(
        family=family, n_vocab=n_vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_ff=d_ff, rope_theta=500000.0 if family == "llada" else 1e6, norm_eps=1e-5 if family == "llada" else 1e-6,
        mask_token_id=n_vocab - 1, context_length=512,
    )


def moe_hparams(*, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 4, n_expert: int = 4,
                n_expert_used: int = 2, d_ff_exp: int = 128, n_vocab: int = 300) -> HParams:
    """A tiny LLaDA-MoE (``llada-moe``): ``n_expert`` SwiGLU experts of ``d_ff_exp``, ``n_expert_used`` per token."""
    return HParams(
        family="llada-moe", n_vocab=n_vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_ff=d_ff_exp * n_expert_used, rope_theta=50000.0, norm_eps=1e-5, mask_token_id=n_vocab - 1,
        context_length=512, n_expert=n_expert, n_expert_used=n_expert_used, d_ff_exp=d_ff_exp,
    )


def random_weights(hp: HParams, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights: N(0, 0.02) linears (biases N(0, 0.02)), norms near 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (spec, _, shape) in hp.spec.expected(hp).items():
        if spec.role.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            scale = {"token_embd.weight": 0.5, "ffn_gate_inp.weight": 0.5}.get(spec.role, 0.06)  # a router that chooses
            out[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def make_tokenizer_json(path: Path, n_vocab: int) -> dict[str, int]:
    tok = train_bpe([TEXT], n_vocab)
    if tok.get_vocab_size() != n_vocab:  # tiny corpus: pad with unused tokens so ids line up with the config
        tok.add_tokens([f"<|unused{i}|>" for i in range(n_vocab - tok.get_vocab_size())])
    tok.save(str(path))
    return {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|bos|>", "<|mask|>")}


def make_checkpoint(folder: str | Path, family: str, *, hp: HParams | None = None, seed: int = 0, n_shards: int = 1,
                    dtype: str = "float32", with_tokenizer: bool = True) -> tuple[Path, HParams, dict[str, np.ndarray]]:
    """Write a random checkpoint; returns (folder, hparams, the float32 weights as stored, i.e. after bf16 rounding)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hp = hp or tiny_hparams(family)
    w = random_weights(hp, seed)
    ids = {"<|endoftext|>": hp.n_vocab - 3, "<|bos|>": hp.n_vocab - 2, "<|mask|>": hp.n_vocab - 1}
    if with_tokenizer:
        ids = make_tokenizer_json(folder / "tokenizer.json", hp.n_vocab)
    assert ids["<|mask|>"] == hp.mask_token_id, ids
    cfg = hp.spec.config_from_hparams(hp, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                      bos_token_id=ids["<|bos|>"], mask_token_id=ids["<|mask|>"], torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if dtype == "bfloat16":
        from formats.safetensors_io import bf16_to_f32, f32_to_bf16

        w = {k: bf16_to_f32(f32_to_bf16(v)) for k, v in w.items()}
        write_checkpoint(folder, w, n_shards, bf16=set(w))
    elif dtype == "float16":
        w = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
        write_checkpoint(folder, {k: v.astype(np.float16) for k, v in w.items()}, n_shards)
    else:
        write_checkpoint(folder, w, n_shards)
    return folder, hp, w


__all__ = ["FAMILIES", "tiny_hparams", "moe_hparams", "random_weights", "make_checkpoint", "TEXT"]
