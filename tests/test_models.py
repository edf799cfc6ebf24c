"""PyTorch LLaDA / Dream against the independent NumPy forward, on official-layout checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.tensors import HFTensors
from qdllm_export.backends import TorchBackend, open_model
from runtime_ref.sampler import sample
from qdllm_export.models import load_model
from runtime_ref.forward import forward, forward_aligned


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype,shards", [("float32", 1), ("bfloat16", 3), ("float16", 2)])
def test_torch_matches_numpy(tiny_ckpts, family, dtype, shards):
    src = HFTensors(tiny_ckpts[(family, dtype, shards)])
    model = load_model(src)
    ids = np.random.default_rng(0).integers(0, src.hparams.n_vocab, (2, 24))
    with torch.no_grad():
        ours = model(torch.from_numpy(ids)).numpy()
    ref = forward(src, ids, rope="neox")
    assert ours.shape == (2, 24, src.hparams.n_vocab)
    assert rel(ours, ref) < 1e-5


def test_dream_alignment(tiny_ckpts):
    """The backend's logits are aligned: Dream's row i is the raw row i - 1."""
    folder = tiny_ckpts[("dream", "float32", 1)]
    be = open_model(str(folder))
    ids = np.random.default_rng(1).integers(0, be.hparams.n_vocab, (1, 10))
    raw = forward(be.source_tensors, ids, rope="neox")
    al = be.logits(ids)
    np.testing.assert_allclose(al[:, 1:], raw[:, :-1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(al[:, 0], raw[:, 0], rtol=0, atol=1e-4)


def test_bf16_compute_close(tiny_ckpts):
    src = HFTensors(tiny_ckpts[("llada", "bfloat16", 3)])
    ids = np.arange(16)[None] % src.hparams.n_vocab
    with torch.no_grad():
        lo = load_model(src, torch.bfloat16)(torch.from_numpy(ids)).float().numpy()
    assert rel(lo, forward(src, ids, rope="neox")) < 0.05


@pytest.mark.parametrize("family,opts", [
    ("llada", dict(gen_length=16, steps=16, block_length=8)),
    ("llada", dict(gen_length=12, steps=6, block_length=4, cfg_scale=0.5)),
    ("dream", dict(gen_length=12, steps=12, alg="maskgit_plus")),
    ("dream", dict(gen_length=12, steps=6, alg="entropy")),
    ("dream", dict(gen_length=12, steps=12, alg="topk_margin")),
])
def test_greedy_generation_matches_numpy_logits(tiny_ckpts, family, opts):
    """Greedy sampling driven by PyTorch logits gives the same tokens as driven by the NumPy forward."""
    be = open_model(str(tiny_ckpts[(family, "float32", 1)]))
    assert isinstance(be, TorchBackend)
    prompt = np.array([[be.hparams.bos_token_id, 5, 17, 42]], dtype=np.int64)
    a = sample(be, prompt, opts)
    b = sample(be, prompt, opts, logits_fn=lambda ids: forward_aligned(be.source_tensors, ids, rope="neox"))
    assert a.shape == (1, opts["gen_length"]) and (a != be.hparams.mask_token_id).all()
    assert np.array_equal(a, b)


def test_cli_generate_json(cli, tiny_ckpts):
    import json

    code, out, _ = cli("generate", tiny_ckpts[("llada", "bfloat16", 3)], "--prompt", "Shall I", "--gen-length", "8",
                       "--block-length", "4", "--json")
    assert code == 0
    obj = json.loads(out)
    assert len(obj["tokens"]) == 8 and isinstance(obj["text"], str)
