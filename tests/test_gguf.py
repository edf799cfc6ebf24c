"""GGUF writer/reader round trips (both families), llama.cpp keys, the documented plane layout."""

from __future__ import annotations

import numpy as np
import pytest

from formats.errors import QdllmError
from formats.families import HParams
from formats.gguf import read_gguf, write_gguf
from formats.gguf_layout import qk_permutation
from formats.qtensor import QuantizedTensor
from formats.tensors import DictTensors, HFTensors, canonical_names, is_linear
from formats.tokenizer import load_tokenizer
from runtime_ref.gguf_model import GGUFBackend
from tests.tiny import TEXT, make_checkpoint, tiny_hparams

PATTERNS = [[1, 2, 3, 2], [2, 2], [1, 3], [3], [0, 2], [2, 1, 0, 3]]


def small_hparams(family: str) -> HParams:
    """d_model 256 / d_ff 512 so the down projection has 4 blocks of 128."""
    return tiny_hparams(family, d_model=256, d_ff=512, n_heads=4)


def random_qtensor(rng: np.random.Generator, shape: tuple[int, int], planes, mu: bool, name: str = "",
                   g: int = 128) -> QuantizedTensor:
    n_out, n_in = shape
    nb = n_in // g
    planes = np.resize(np.asarray(planes, np.uint8), nb).astype(np.uint8)
    p = int(planes.sum())
    return QuantizedTensor(
        shape=shape, group_size=g, planes=planes,
        signs=rng.integers(0, 256, (p, n_out, g // 8), dtype=np.uint8),
        row_scale=(rng.random((p, n_out)) * 0.04 + 0.002).astype(np.float16),
        col_scale=(rng.random((p, g)) + 0.5).astype(np.float16),
        mu=(rng.standard_normal((n_out, nb)) * 0.01).astype(np.float16) if mu else None,
        name=name, meta={"method": "random"},
    )


def quantized_source(tmp_path, family: str, seed: int = 0, keep_float: tuple[str, ...] = ()) -> tuple[DictTensors, object]:
    """A tiny checkpoint whose linears are random QuantizedTensors (every 3rd one with mu)."""
    folder, _, _ = make_checkpoint(tmp_path / f"{family}-ckpt", family, hp=small_hparams(family), seed=seed)
    hf = HFTensors(folder)
    hp = hf.hparams  # with the config's bos / eos ids
    rng = np.random.default_rng(seed + 1)
    tensors: dict = {}
    for i, name in enumerate(canonical_names(hp)):
        if is_linear(hp, name) and name not in keep_float:
            shape = hf.get(name).shape
            tensors[name] = random_qtensor(rng, shape, PATTERNS[i % len(PATTERNS)], mu=i % 3 == 0, name=name)
        else:
            tensors[name] = hf.get(name)
    src = DictTensors(hp, tensors)
    src.config = hf.config  # special token ids, as HFTensors offers them
    return src, load_tokenizer(folder)


@pytest.fixture(scope="module", params=["llada", "dream"])
def written(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    src, tok = quantized_source(tmp, family, keep_float=("blk.1.ffn_up.weight",))
    path = write_gguf(tmp / "model.gguf", src, tokenizer=tok, outtype="quantized",
                      qdllm_meta={"method": "random", "bits": 2.0, "group_size": 128, "calib": {"n": 4}})
    return family, src, tok, path


def test_round_trip_bit_identical(written):
    family, src, _, path = written
    m = read_gguf(path)
    hp = src.hparams
    assert m.hparams == hp and hp.bos_token_id >= 0 and hp.eos_token_id >= 0
    assert m.permuted == (family == "llada") and m.tensors.rope == ("norm" if family == "llada" else "neox")
    ck = m.checkpoint_tensors()
    assert ck.rope == "neox" and ck.names() == src.names()
    for name in src.names():
        want, got = src.get(name), ck.get(name)
        if isinstance(want, QuantizedTensor):
            assert isinstance(got, QuantizedTensor) and got.equal(want), name
        elif name in ("token_embd.weight", "output.weight") or is_linear(hp, name):
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert m.tensor_types()["blk.1.ffn_up.weight"] == "F16"
    eos = src.config["eos_token_id"]
    assert m.special_ids == {"bos": hp.bos_token_id, "eos": eos, "pad": src.config["pad_token_id"], "mask": hp.mask_token_id}
    assert m.qdllm_meta["format_version"] == 1 and m.qdllm_meta["method"] == "random"
    assert m.qdllm_meta["bits"] == 2.0 and m.qdllm_meta["group_size"] == 128 and m.qdllm_meta["calib.json"] == '{"n": 4}'


def test_file_order_is_llama_cpp_permutation(written):
    family, src, _, path = written
    hp, t = src.hparams, read_gguf(path).tensors
    q, k = src.get("blk.0.attn_q.weight"), src.get("blk.1.attn_k.weight")
    if family == "llada":
        q = q.permute_rows(qk_permutation(hp.n_heads * hp.head_dim, hp.n_heads))
        k = k.permute_rows(qk_permutation(hp.n_kv_heads * hp.head_dim, hp.n_kv_heads))
    assert t.get("blk.0.attn_q.weight").equal(q) and t.get("blk.1.attn_k.weight").equal(k)
    assert t.get("blk.0.attn_v.weight").equal(src.get("blk.0.attn_v.weight"))


def test_llama_cpp_keys_with_gguf_py(written):
    """The file opens with gguf-py's reader and carries every key llama.cpp's loader reads."""
    import gguf

    family, src, tok, path = written
    hp = src.hparams
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    a = family + "."
    assert f["general.architecture"] == family
    assert f[a + "context_length"] == hp.context_length and f[a + "embedding_length"] == hp.d_model
    assert f[a + "block_count"] == hp.n_layers and f[a + "feed_forward_length"] == hp.d_ff
    assert f[a + "attention.head_count"] == hp.n_heads and f[a + "attention.head_count_kv"] == hp.n_kv_heads
    assert f[a + "rope.freq_base"] == pytest.approx(hp.rope_theta) and f[a + "rope.dimension_count"] == hp.head_dim
    assert f[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(hp.norm_eps)
    assert f[a + "attention.causal"] is False and f[a + "vocab_size"] == hp.n_vocab
    assert f["diffusion.shift_logits"] is (family == "dream")
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.mask_token_id"] == hp.mask_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|endoftext|>")
    assert f["tokenizer.ggml.bos_token_id"] == tok.token_to_id("<|bos|>")
    assert f["tokenizer.ggml.add_bos_token"] is False
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == hp.n_vocab and types[hp.mask_token_id] == gguf.TokenType.CONTROL and types[0] == 1
    assert len(f["tokenizer.ggml.merges"]) > 0 and f["qdllm.format_version"] == 1
    types_by_name = {t.name: t.tensor_type.name for t in r.tensors}
    assert types_by_name["blk.0.attn_q.weight.qdllm.plane0"] == "Q1_0"
    assert types_by_name["blk.0.attn_q.weight.qdllm.nplanes"] == "I8"
    assert types_by_name["token_embd.weight"] == "F16" and types_by_name["output_norm.weight"] == "F32"
    assert "blk.0.attn_q.weight" not in types_by_name


def _reconstruct_from_doc(r, base: str, n_out: int, n_in: int, g: int = 128) -> np.ndarray:
    """W rebuilt from gguf-py's raw tensors exactly as docs/gguf-format.md describes (independent code)."""
    t = {x.name: x for x in r.tensors if x.name.startswith(base + ".qdllm.")}
    kj = np.array(t[base + ".qdllm.nplanes"].data, dtype=np.int64)
    w = np.zeros((n_out, n_in), np.float64)
    if base + ".qdllm.mu" in t:
        w += np.repeat(np.array(t[base + ".qdllm.mu"].data, np.float64), g, axis=1)
    for k in range(kj.max()):
        blocks = [j for j in range(len(kj)) if kj[j] > k]
        raw = np.array(t[f"{base}.qdllm.plane{k}"].data)  # [n_out, n_k * g/128 * 18] bytes
        cs = np.array(t[f"{base}.qdllm.cscale{k}"].data, np.float64)  # [n_k, g]
        assert raw.shape == (n_out, len(blocks) * g // 128 * 18) and cs.shape == (len(blocks), g)
        for m, j in enumerate(blocks):
            for sub in range(g // 128):
                blk = raw[:, (m * g // 128 + sub) * 18 : (m * g // 128 + sub + 1) * 18]
                d = blk[:, :2].copy().view("<f2").astype(np.float64)  # [n_out, 1]
                bits = (blk[:, 2:, None] >> np.arange(8)) & 1  # byte b, bit i -> column 8b + i
                sign = 2.0 * bits.reshape(n_out, 128) - 1.0
                cols = slice(j * g + sub * 128, j * g + (sub + 1) * 128)
                w[:, cols] += d * cs[m, sub * 128 : (sub + 1) * 128] * sign
    return w


def test_documented_layout_reconstructs_weights(written):
    import gguf

    family, src, _, path = written
    hp = src.hparams
    r = gguf.GGUFReader(path)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.1.attn_k.weight"):
        q = src.get(name)
        from formats.gguf_layout import row_permutation

        perm = row_permutation(hp, name)
        want = (q if perm is None else q.permute_rows(perm)).dequantize()
        got = _reconstruct_from_doc(r, name, *q.shape)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_tokenizer_rebuilt_from_gguf(written):
    _, src, tok, path = written
    t2 = read_gguf(path).tokenizer
    for text in (TEXT[:200], "Rough winds <|mask|> do shake <|endoftext|>", "  spaces\nand\ttabs 123 ünïcode"):
        a, b = tok.encode(text), t2.encode(text)
        assert a.ids == b.ids, text
        assert t2.decode(b.ids, skip_special_tokens=False) == tok.decode(a.ids, skip_special_tokens=False)
    assert t2.get_vocab_size() == src.hparams.n_vocab


def test_backend_describe(written):
    family, src, _, path = written
    be = GGUFBackend(path)
    d = be.describe()
    assert d["format"] == "gguf" and d["family"] == family and d["size_bytes"] == path.stat().st_size
    n_lin = sum(isinstance(src.get(n), QuantizedTensor) for n in src.names())
    assert d["n_quantized_linears"] == n_lin and d["qk_permuted"] == (family == "llada")
    qs = [src.get(n) for n in src.names() if isinstance(src.get(n), QuantizedTensor)]
    want_bpw = sum(q.stored_bits() for q in qs) / sum(q.shape[0] * q.shape[1] for q in qs)
    assert d["bits_per_weight_linear"] == pytest.approx(want_bpw, rel=1e-12)
    assert {r["name"]: r["type"] for r in d["tensors"]}["blk.0.attn_q.weight"].startswith("Q1_0 planes")
    ids = np.arange(12)[None] % src.hparams.n_vocab
    logits = be.logits(ids)
    assert logits.shape == (1, 12, src.hparams.n_vocab) and logits.dtype == np.float32
    raw = be.raw_logits(ids)
    if family == "dream":
        np.testing.assert_array_equal(logits[:, 1:], raw[:, :-1])
        np.testing.assert_array_equal(logits[:, 0], raw[:, 0])
    else:
        np.testing.assert_array_equal(logits, raw)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("outtype,embed", [("f32", None), ("f16", "q8_0"), ("quantized", "f32")])
def test_float_outtypes(tmp_path, family, outtype, embed):
    src, tok = quantized_source(tmp_path, family)
    path = write_gguf(tmp_path / "m.gguf", src, tokenizer=tok, outtype=outtype, embed_type=embed)
    m = read_gguf(path)
    types = m.tensor_types()
    want_lin = {"f32": "F32", "f16": "F16", "quantized": "planes"}[outtype]
    assert types["blk.0.ffn_gate.weight"] == want_lin and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == (embed or outtype).upper()
    ck = m.checkpoint_tensors()
    q = src.get("blk.1.attn_q.weight")
    got = ck.get("blk.1.attn_q.weight")
    if outtype == "quantized":
        assert got.equal(q)
    else:
        tol = 0 if outtype == "f32" else 1e-3
        np.testing.assert_allclose(got, q.dequantize(), rtol=tol, atol=tol * 0.05)
    emb = src.get("token_embd.weight")
    atol = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2}[embed or outtype]
    np.testing.assert_allclose(ck.get("token_embd.weight"), emb, atol=atol)


def test_float_checkpoint_streamed_bf16_sharded(tmp_path):
    folder, hp, w = make_checkpoint(tmp_path / "ck", "llada", n_shards=3, dtype="bfloat16")
    path = write_gguf(tmp_path / "m.gguf", HFTensors(folder), tokenizer=load_tokenizer(folder), outtype="f32")
    ck = read_gguf(path).checkpoint_tensors()
    np.testing.assert_array_equal(ck.get("blk.1.attn_k.weight"), w["model.transformer.blocks.1.k_proj.weight"])
    np.testing.assert_array_equal(ck.get("output.weight"), w["model.transformer.ff_out.weight"])


def test_writer_refuses_and_leaves_no_temp(tmp_path):
    src, tok = quantized_source(tmp_path, "dream")
    path = write_gguf(tmp_path / "m.gguf", src, tokenizer=tok)
    before = path.read_bytes()
    with pytest.raises(QdllmError, match="m.gguf.*already exists"):
        write_gguf(path, src, tokenizer=tok)
    assert path.read_bytes() == before
    write_gguf(path, src, tokenizer=tok, overwrite=True, outtype="f16")
    assert read_gguf(path).tensor_types()["blk.0.attn_q.weight"] == "F16"
    src.tensors["blk.1.ffn_up.weight"] = np.full((512, 256), np.nan, np.float32)
    with pytest.raises(QdllmError, match="blk.1.ffn_up.weight.*NaN"):
        write_gguf(tmp_path / "n.gguf", src, tokenizer=tok)
    del src.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(QdllmError, match="no tensor 'blk.1.ffn_up.weight'"):
        write_gguf(tmp_path / "n.gguf", src, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.gguf"]


def test_group_size_not_multiple_of_128(tmp_path):
    hp = small_hparams("dream")
    rng = np.random.default_rng(0)
    src, tok = quantized_source(tmp_path, "dream")
    src.tensors["blk.0.attn_q.weight"] = random_qtensor(rng, (256, 256), [1, 2], False, g=64)
    with pytest.raises(QdllmError, match="group size 64"):
        write_gguf(tmp_path / "m.gguf", src, tokenizer=tok)
    assert hp.d_model == 256


def test_no_tokenizer(tmp_path):
    src, _ = quantized_source(tmp_path, "llada")
    m = read_gguf(write_gguf(tmp_path / "m.gguf", src, tokenizer=None))
    assert m.tokenizer is None and m.metadata["tokenizer.ggml.model"] == "none"
    assert m.hparams == src.hparams
