"""Stock-type GGUF files run in llama.cpp (llama-cpp-python) as in our NumPy forward, every type family, both
bundled models; the llama.cpp runtime and its refusals.

llama.cpp rounds a matmul's activations to 8 bits (Q8_K for the k-/i-quants, Q8_0 for q8_0) before the dot
product. ``LlamaCppArithmetic`` makes the NumPy forward do the same, so one quantized tensor in an otherwise
float file is held to a tight tolerance: measured rel err 1e-6 where no rounding step flips, up to 1.1e-3
where a 1-ulp difference in llama.cpp's SIMD exp moves one activation across a rounding boundary. A file
whose every linear is quantized compounds such flips (measured rel 2-5e-2, argmax 0.90-0.98 on random
canvases): held to ``LLAMACPP_RTOL`` / ``LLAMACPP_MIN_AGREE``, the tolerances ``verify --runtime llama.cpp``
uses. The file's bytes come from ggml's own encoder here (fast); ours are checked bit for bit elsewhere
(tests/test_ggml_grids.py).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from formats.errors import QdllmError  # noqa: E402
from formats.ggml_tensor import GGMLTensor  # noqa: E402
from formats.gguf import write_gguf  # noqa: E402
from formats.gguf_types import STOCK_TYPES  # noqa: E402
from formats.gguf_read import read_gguf  # noqa: E402
from formats.tensors import DictTensors, HFTensors, canonical_names, is_linear  # noqa: E402
from formats.tokenizer import load_tokenizer  # noqa: E402
from qdllm_export.backends import resolve  # noqa: E402
from qdllm_export.verify import LLAMACPP_MIN_AGREE, LLAMACPP_RTOL  # noqa: E402
from runtime_ref.forward import forward  # noqa: E402
from runtime_ref.llamacpp import LlamaCppArithmetic, LlamaCppBackend  # noqa: E402

FAMILIES = {"k-quant": "q2_k", "legacy": "q8_0", "lattice": "iq2_xs"}


def _f32(w: np.ndarray) -> GGMLTensor:
    return GGMLTensor(w.shape, "F32", np.ascontiguousarray(w, np.float32).view(np.uint8).reshape(w.shape[0], -1))


def stock_file(path, model: str, type_of, embed=("q4_k", "q6_k"), outtype: str = "auto"):
    """The bundled ``model`` with each block linear in ``type_of(name)`` (gguf-py name; "F32" kept float)."""
    from qdllm_export.grids import libggml
    from qdllm_export.targets.tables import GridEncoder

    folder = resolve(model)
    hf = HFTensors(folder)
    hp = hf.hparams
    tensors = {}
    for n in canonical_names(hp):
        w = hf.get(n)
        t = type_of(n) if is_linear(hp, n) else None
        tensors[n] = w if t is None else _f32(w) if t == "F32" else GGMLTensor(w.shape, t, libggml.quantize_rows(w, t), name=n)
    src = DictTensors(hp, tensors)
    src.config = hf.config
    return write_gguf(path, src, tokenizer=load_tokenizer(folder), outtype=outtype, embed_type=embed[0],
                      head_type=embed[1], encoder=GridEncoder())


def canvas(hp, t: int = 64) -> np.ndarray:
    ids = np.random.default_rng(0).integers(0, hp.n_vocab - 1, (2, t))
    ids[:, 1::3] = hp.mask_token_id
    return ids


def rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float(np.abs(a - b).max() / np.abs(b).max()), float((a.argmax(-1) == b.argmax(-1)).mean())


CASES = [("tiny-llada", t) for t in STOCK_TYPES] + [("tiny-dream", "iq3_s")]  # llada: Q/K rows permuted; dream: GQA


@pytest.mark.parametrize("model,outtype", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_llama_cpp_reads_each_stock_type_as_we_do(tmp_path, model, outtype):
    """attn_q (rows permuted for llada) and attn_output of block 0 in the type, the rest f32."""
    ggml_type = STOCK_TYPES[outtype][0]
    pick = ("blk.0.attn_q.weight", "blk.0.attn_output.weight")
    path = stock_file(tmp_path / "m.gguf", model, lambda n: ggml_type if n in pick else "F32", embed=("f32", "f32"))
    m = read_gguf(path)
    assert m.tensor_types()["blk.0.attn_q.weight"] == ggml_type
    ids = canvas(m.hparams)
    theirs = LlamaCppBackend(path, threads=2).raw_logits(ids)
    err, agree = rel(theirs, forward(LlamaCppArithmetic(m), ids))
    print(f"{model} {outtype}: rel {err:.2e}, argmax {agree:.4f}")
    assert err <= 2e-3 and agree == 1.0


@pytest.mark.parametrize("model,family", [("tiny-llada", "k-quant"), ("tiny-dream", "k-quant"), ("tiny-llada", "lattice"),
                                          ("tiny-dream", "legacy")])
def test_whole_stock_file_in_llama_cpp(tmp_path, model, family):
    """Every linear in the family's type, token_embd q4_k, output q6_k: a file stock llama.cpp loads, whose
    metadata says the type, with no qdllm tensor; logits within llama.cpp's documented tolerance."""
    import gguf

    outtype = FAMILIES[family]
    path = stock_file(tmp_path / "m.gguf", model, lambda n: STOCK_TYPES[outtype][0], outtype=outtype)
    r = gguf.GGUFReader(path)
    assert r.fields["general.file_type"].contents() == STOCK_TYPES[outtype][1]
    assert not [t.name for t in r.tensors if "qdllm" in t.name]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    m = read_gguf(path)
    ids = canvas(m.hparams)
    be = LlamaCppBackend(path, threads=2)
    err, agree = rel(be.raw_logits(ids), forward(m.tensors, ids))
    print(f"{model} {outtype} whole file: rel {err:.2e}, argmax {agree:.4f}")
    assert err <= LLAMACPP_RTOL and agree >= LLAMACPP_MIN_AGREE
    aligned = be.logits(ids)  # Dream: row i scores token i
    raw = be.raw_logits(ids)
    np.testing.assert_array_equal(aligned[:, 1:], raw[:, 1:] if model == "tiny-llada" else raw[:, :-1])


def test_planes_file_refused_and_missing_extra_named(tmp_path, monkeypatch):
    from tests.test_gguf import quantized_source

    src, tok = quantized_source(tmp_path, "llada")
    path = write_gguf(tmp_path / "planes.gguf", src, tokenizer=tok)
    with pytest.raises(QdllmError, match="llama.cpp cannot run; export a stock type .*--outtype q2_k"):
        LlamaCppBackend(path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    f16 = stock_file(tmp_path / "f.gguf", "tiny-dream", lambda n: "F32", embed=("f16", "f16"), outtype="f16")
    with pytest.raises(QdllmError, match=r"pip install 'qdllm-export\[llamacpp\]'"):
        LlamaCppBackend(f16)
