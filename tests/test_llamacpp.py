"""llama.cpp (through llama-cpp-python's low-level API) runs our float GGUF files like our NumPy forward.

Models: tiny random LLaDA and Dream checkpoints, a random *quantized* model exported dequantized, the
bundled models ``tiny-llada`` and ``tiny-dream`` (compared with the PyTorch model as well), and any folders listed in the
environment variable ``QDLLM_LLAMACPP_MODELS`` (``os.pathsep``-separated HF checkpoint folders).
Dream's rows are compared raw (row p scores token p+1) in both engines.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from formats.gguf import read_gguf, write_gguf  # noqa: E402
from formats.tensors import HFTensors  # noqa: E402
from formats.tokenizer import load_tokenizer  # noqa: E402
from runtime_ref.forward import forward  # noqa: E402
from tests.test_gguf import quantized_source  # noqa: E402
from tests.tiny import make_checkpoint, tiny_hparams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_LOG_CB = None


def _quiet() -> None:
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p())
        llama_cpp.llama_backend_init()


def llama_logits(path: Path, ids: np.ndarray, threads: int = 2) -> tuple[np.ndarray, dict]:
    """Raw logits ``[T, V]`` of one non-causal full-sequence decode, as llama-diffusion-cli runs it."""
    L = llama_cpp
    _quiet()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp could not load {path}"
    t = len(ids)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = t
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # FA would round K/V to f16
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(t, 0, 1)
    try:
        assert ctx, "llama.cpp could not create a context"
        L.llama_set_causal_attn(ctx, False)
        batch.n_tokens = t
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(tok), i, 1, 1
            batch.seq_id[i][0] = 0
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
        vocab = L.llama_model_get_vocab(model)
        nv = L.llama_vocab_n_tokens(vocab)
        out = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(t, nv)).copy()
        info = {"n_vocab": nv, "mask": L.llama_vocab_mask(vocab), "diffusion": L.llama_model_is_diffusion(model)}
    finally:
        L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)
    return out, info


def _cases() -> list:
    """(model, outtype): random checkpoints in f32 and f16, the rest in f32."""
    params = [pytest.param(f"random:{f}", o, id=f"random-{f}-{o}") for f in ("llada", "dream") for o in ("f32", "f16")]
    params += [pytest.param(f"quantized:{f}", "f32", id=f"quantized-{f}-f32") for f in ("llada", "dream")]
    params += [pytest.param("gqa:llada", "f32", id="random-llada-gqa-f32")]  # K permuted with n_kv_heads
    found = sorted(p.parent for p in (REPO / "qdllm_export" / "data").glob("tiny-*/config.json"))
    extra = [Path(p) for p in os.environ.get("QDLLM_LLAMACPP_MODELS", "").split(os.pathsep) if p]
    params += [pytest.param(str(p), "f32", id=p.name) for p in found + extra]
    return params


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(argmax agreement, max abs diff / max abs)."""
    return float((a.argmax(-1) == b.argmax(-1)).mean()), float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("model,outtype", _cases())
def test_llama_cpp_matches_numpy_forward(tmp_path, model, outtype):
    kind, _, family = model.partition(":")
    if kind in ("random", "gqa"):
        hp = tiny_hparams(family, n_kv_heads=2) if kind == "gqa" else None
        folder, hp, _ = make_checkpoint(tmp_path / "ck", family, hp=hp, seed=11)
        src, tok = HFTensors(folder), load_tokenizer(folder)
    elif kind == "quantized":
        src, tok = quantized_source(tmp_path, family, seed=5)
    else:
        src, tok = HFTensors(model), load_tokenizer(model)
    hp = src.hparams
    path = write_gguf(tmp_path / "model.gguf", src, tokenizer=tok, outtype=outtype)
    t = min(64, hp.context_length)
    ids = np.random.default_rng(0).integers(0, hp.n_vocab, t)
    ids[t // 2 :: 3] = hp.mask_token_id  # a diffusion canvas: some masked positions
    ours = forward(read_gguf(path).tensors, ids[None])[0]
    theirs, info = llama_logits(path, ids)
    assert info == {"n_vocab": hp.n_vocab, "mask": hp.mask_token_id, "diffusion": True}
    agree, err = compare(theirs, ours)
    print(f"{model} {outtype}: argmax agreement {agree:.4f}, max|diff|/max|logit| {err:.2e}")
    assert agree >= 0.99 and err <= 1e-3
    if kind not in ("random", "gqa", "quantized"):  # a real checkpoint: also against the PyTorch model
        import torch

        from qdllm_export.models import load_model

        with torch.no_grad():
            ref = load_model(src)(torch.from_numpy(ids[None]))[0].numpy()
        agree, err = compare(theirs, ref)
        print(f"{model} {outtype} vs PyTorch: argmax agreement {agree:.4f}, max|diff|/max|logit| {err:.2e}")
        assert agree >= 0.99 and err <= 1e-3


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_llama_cpp_reads_our_q1_0_bytes(tmp_path, family):
    """One binary plane per linear as a plain ggml Q1_0 tensor (our encoder): llama.cpp's Q1_0 kernels and
    our Q1_0 decoder agree, and decoding the bits MSB-first instead would not (checks the byte layout)."""
    import gguf

    from formats.gguf_layout import q1_0_encode
    from formats.tensors import DictTensors, is_linear
    from tests.test_gguf_errors import rewrite

    folder, hp, _ = make_checkpoint(tmp_path / "ck", family, seed=3)
    f32 = write_gguf(tmp_path / "f32.gguf", HFTensors(folder), tokenizer=load_tokenizer(folder), outtype="f32")
    rep = {}
    for t in gguf.GGUFReader(f32).tensors:
        if is_linear(hp, t.name):
            w = np.array(t.data).reshape(t.data.shape[0], -1, 128)  # [n_out, blocks, 128]
            signs = np.packbits(w > 0, axis=-1, bitorder="little").transpose(1, 0, 2)
            d = np.abs(w).mean(-1).T.astype(np.float16)
            rep[t.name] = (q1_0_encode(np.ascontiguousarray(signs), d, 128), gguf.GGMLQuantizationType.Q1_0)
    path = rewrite(f32, tmp_path / "q1_0.gguf", replace=rep)
    m = read_gguf(path)
    assert m.tensor_types()["blk.0.ffn_down.weight"] == "Q1_0"
    ids = np.random.default_rng(0).integers(0, hp.n_vocab, 64)
    ours = forward(m.tensors, ids[None])[0]
    theirs, _ = llama_logits(path, ids)
    agree, err = compare(theirs, ours)
    print(f"{family} Q1_0: argmax agreement {agree:.4f}, max|diff|/max|logit| {err:.2e}")
    assert agree >= 0.95 and err <= 2e-2  # llama.cpp rounds activations to Q8_0 for Q1_0 dot products

    def msb_first(name):
        raw = rep[name][0].reshape(-1, 18)
        bits = np.unpackbits(raw[:, 2:], axis=-1, bitorder="big").astype(np.float32)
        d = raw[:, :2].copy().view("<f2").astype(np.float32)
        return (d * (2 * bits - 1)).reshape(rep[name][0].shape[0], -1)

    wrong = DictTensors(hp, {n: msb_first(n) if n in rep else m.tensors.get(n) for n in m.tensors.names()})
    wrong.rope = m.tensors.rope
    assert compare(theirs, forward(wrong, ids[None])[0])[1] > 0.1


def test_stock_llama_cpp_refuses_plane_files_cleanly(tmp_path):
    """A `quantized` (planes) file needs a qdllm kernel: stock llama.cpp must fail to load it, not crash."""
    src, tok = quantized_source(tmp_path, "llada")
    path = write_gguf(tmp_path / "planes.gguf", src, tokenizer=tok)
    _quiet()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert not model
