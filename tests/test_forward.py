"""The NumPy forward: RoPE kinds vs llama.cpp's permutation, and an independent torch reference."""

from __future__ import annotations

import numpy as np
import pytest

from formats.errors import QdllmError
from formats.gguf import read_gguf, write_gguf
from formats.tensors import HFTensors
from formats.tokenizer import load_tokenizer
from runtime_ref.forward import forward, forward_aligned
from tests.test_gguf import quantized_source
from tests.tiny import make_checkpoint


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_gguf_forward_matches_checkpoint_forward(tmp_path, family):
    """Permuted Q/K + NORM RoPE (GGUF file order) == checkpoint order + NEOX RoPE: checks the permutation."""
    src, tok = quantized_source(tmp_path, family, seed=3)
    m = read_gguf(write_gguf(tmp_path / "m.gguf", src, tokenizer=tok, embed_type="f32"))
    ids = np.random.default_rng(0).integers(0, src.hparams.n_vocab, (2, 33))
    ref = forward(src, ids, rope="neox")
    got = forward(m.tensors, ids)  # rope from the source: norm for llada, neox for dream
    assert m.tensors.rope == ("norm" if family == "llada" else "neox")
    assert rel(got, ref) < 1e-5
    assert rel(forward(m.checkpoint_tensors(), ids), ref) < 1e-5
    if family == "llada":  # the test can fail: the wrong RoPE on permuted rows is far off
        assert rel(forward(m.tensors, ids, rope="neox"), ref) > 1e-2


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_float_gguf_forward_matches_hf(tmp_path, family):
    folder, hp, _ = make_checkpoint(tmp_path / "ck", family)
    hf = HFTensors(folder)
    m = read_gguf(write_gguf(tmp_path / "m.gguf", hf, tokenizer=load_tokenizer(folder), outtype="f32"))
    ids = np.random.default_rng(1).integers(0, hp.n_vocab, (1, 50))
    assert rel(forward(m.tensors, ids), forward(hf, ids)) < 1e-5


def torch_reference(w: dict[str, np.ndarray], hp, ids: np.ndarray) -> np.ndarray:
    """A straightforward float64 per-head implementation from the HF tensors (rotate-half RoPE)."""
    import torch

    t = {k: torch.from_numpy(v).double() for k, v in w.items()}
    llada = hp.family == "llada"
    pre = "model.transformer." if llada else "model."

    def lin(x, name, bias=None):
        y = x @ t[name].T
        return y + t[bias] if bias is not None else y

    def norm(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hp.norm_eps) * t[name]

    T = ids.shape[0]
    x = t[pre + ("wte.weight" if llada else "embed_tokens.weight")][torch.from_numpy(ids)]
    hd = hp.head_dim
    inv = 1.0 / (hp.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rot(v):  # v [T, hd]
        return v * cos + torch.cat([-v[:, hd // 2:], v[:, : hd // 2]], -1) * sin

    for i in range(hp.n_layers):
        if llada:
            b = f"{pre}blocks.{i}."
            names = dict(n1=b + "attn_norm.weight", q=b + "q_proj.weight", k=b + "k_proj.weight", v=b + "v_proj.weight",
                         o=b + "attn_out.weight", n2=b + "ff_norm.weight", g=b + "ff_proj.weight", u=b + "up_proj.weight",
                         d=b + "ff_out.weight")
            bias = dict(q=None, k=None, v=None)
        else:
            b = f"{pre}layers.{i}."
            names = dict(n1=b + "input_layernorm.weight", q=b + "self_attn.q_proj.weight", k=b + "self_attn.k_proj.weight",
                         v=b + "self_attn.v_proj.weight", o=b + "self_attn.o_proj.weight",
                         n2=b + "post_attention_layernorm.weight", g=b + "mlp.gate_proj.weight",
                         u=b + "mlp.up_proj.weight", d=b + "mlp.down_proj.weight")
            bias = {c: b + f"self_attn.{c}_proj.bias" for c in "qkv"}
        h = norm(x, names["n1"])
        q, k, v = (lin(h, names[c], bias[c]) for c in "qkv")
        heads = []
        for head in range(hp.n_heads):
            kv = head // (hp.n_heads // hp.n_kv_heads)
            qh = rot(q[:, head * hd:(head + 1) * hd])
            kh = rot(k[:, kv * hd:(kv + 1) * hd])
            p = torch.softmax(qh @ kh.T / hd ** 0.5, dim=-1)  # bidirectional: no causal mask
            heads.append(p @ v[:, kv * hd:(kv + 1) * hd])
        x = x + lin(torch.cat(heads, -1), names["o"])
        h = norm(x, names["n2"])
        x = x + lin(torch.nn.functional.silu(lin(h, names["g"])) * lin(h, names["u"]), names["d"])
    x = norm(x, pre + ("ln_f.weight" if llada else "norm.weight"))
    return lin(x, pre + "ff_out.weight" if llada else "lm_head.weight").numpy()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_neox_forward_matches_independent_torch(tmp_path, family):
    pytest.importorskip("torch")
    folder, hp, w = make_checkpoint(tmp_path / "ck", family, seed=7)
    ids = np.random.default_rng(2).integers(0, hp.n_vocab, 37)
    ref = torch_reference(w, hp, ids)
    got = forward(HFTensors(folder), ids[None])[0]
    assert rel(got, ref) < 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padding_mask_and_alignment(tmp_path, family):
    folder, hp, _ = make_checkpoint(tmp_path / "ck", family)
    hf = HFTensors(folder)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, hp.n_vocab, (2, 20))
    short = forward(hf, ids[:1, :12])
    padded = ids.copy()
    padded[0, 12:] = 0
    mask = np.ones((2, 20), bool)
    mask[0, 12:] = False
    full = forward(hf, padded, attn_mask=mask)
    assert rel(full[0, :12], short[0]) < 1e-5  # padding keys are invisible to real tokens
    assert rel(full[1], forward(hf, ids[1:])[0]) < 1e-6  # batch rows are independent
    al = forward_aligned(hf, ids)
    raw = forward(hf, ids)
    if family == "dream":
        np.testing.assert_array_equal(al[:, 1:], raw[:, :-1])
        np.testing.assert_array_equal(al[:, 0], raw[:, 0])
    else:
        np.testing.assert_array_equal(al, raw)


class CountingSource:
    def __init__(self, inner):
        self.inner, self.hparams, self.log = inner, inner.hparams, []
        self.rope = getattr(inner, "rope", None)

    def names(self):
        return self.inner.names()

    def get(self, name):
        self.log.append(name)
        return self.inner.get(name)


def test_streams_layer_by_layer(tmp_path):
    src, _ = quantized_source(tmp_path, "llada")
    c = CountingSource(src)
    forward(c, np.arange(8)[None])
    assert sorted(c.log) == sorted(src.names()) and len(c.log) == len(set(c.log))  # each tensor once
    layers = [int(n.split(".")[1]) for n in c.log if n.startswith("blk.")]
    assert layers == sorted(layers)  # layer 0 finished before layer 1 starts


def test_bad_ids(tmp_path):
    folder, hp, _ = make_checkpoint(tmp_path / "ck", "llada")
    hf = HFTensors(folder)
    with pytest.raises(QdllmError, match="token ids"):
        forward(hf, np.array([[0, hp.n_vocab]]))
    with pytest.raises(QdllmError, match="RoPE"):
        forward(hf, np.array([[0, 1]]), rope="yarn")
