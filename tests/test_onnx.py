"""ONNX export (formats.onnx) and the onnxruntime backend (runtime_ref.ort): parity and features.

The reference is the NumPy forward of ``runtime_ref.forward`` (each quantized weight dequantized by
``QuantizedTensor.dequantize()``), plus the PyTorch model run from the tensors read back from the file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from formats.errors import QdllmError
from formats.onnx import OnnxTensors, read_onnx_info, write_onnx
from formats.qtensor import QuantizedTensor
from formats.tensors import DictTensors, HFTensors, canonical_names, is_linear
from runtime_ref.backend import shift_right
from runtime_ref.ort import OrtBackend
from tests.test_onnx_ref import quantize_source, reference_logits, rel_err
from tests.tiny import make_checkpoint, tiny_hparams

FAMILIES = ("llada", "dream")
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (float source, quantized source)}; d_model 256 so linears have 2-4 column blocks."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for fam in FAMILIES:
        hp = tiny_hparams(fam, d_model=256, d_ff=512, n_heads=4)
        folder, _, _ = make_checkpoint(root / fam, fam, hp=hp, seed=3)
        src = HFTensors(folder)
        out[fam] = (src, quantize_source(src, seed=4))
    return out


def _ids(hp, b=2, t=11, seed=0):
    return np.random.default_rng(seed).integers(0, hp.n_vocab, (b, t))


def _mask(b, t):
    m = np.ones((b, t), np.int64)
    m[1, :4] = 0  # left padding of the second row
    return m


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernel", ["function", "matmulnbits"])
def test_quantized_parity(models, tmp_path, family, kernel):
    _, qsrc = models[family]
    hp = qsrc.hparams
    path = write_onnx(tmp_path / "m.onnx", qsrc, kernel=kernel, accuracy_level=0, embed_type="f32",
                      qdllm_meta={"method": "random", "bits": 2})
    onnx.checker.check_model(str(path), full_check=True)
    be = OrtBackend(path)
    ids, mask = _ids(hp), _mask(2, 11)
    ref = reference_logits(qsrc, ids)
    raw = be.raw_logits(ids)
    assert raw.dtype == np.float32 and raw.shape == (2, 11, hp.n_vocab)
    assert rel_err(raw, ref) < TOL
    assert rel_err(be.raw_logits(ids, mask), reference_logits(qsrc, ids, mask)) < TOL
    aligned = be.logits(ids)
    np.testing.assert_array_equal(aligned, shift_right(raw) if family == "dream" else raw)
    # positions as Dream's generator sets them for a left-padded batch: cumsum(mask) - 1, padding at 1
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    assert rel_err(be.raw_logits(ids, mask, pos), reference_logits(qsrc, ids, mask, pos)) < TOL
    # a different canvas length and batch 1 run on the same session (dynamic shapes)
    ids1 = _ids(hp, 1, 3, seed=5)
    assert rel_err(be.raw_logits(ids1[0]), reference_logits(qsrc, ids1)) < TOL


def test_matmulnbits_int8_activations(models, tmp_path):
    """accuracy_level 4 (opt-in, faster) quantizes activations to int8: close, not exact."""
    _, qsrc = models["llada"]
    path = write_onnx(tmp_path / "m.onnx", qsrc, kernel="matmulnbits", embed_type="f32", accuracy_level=4)
    be = OrtBackend(path)
    assert be.describe()["accuracy_level"] == 4
    ids = _ids(qsrc.hparams)
    assert rel_err(be.raw_logits(ids), reference_logits(qsrc, ids)) < 3e-2


def test_default_f16_embeddings(models, tmp_path):
    """Quantized exports keep token_embd / output in f16 by default: exact against f16-rounded ones."""
    _, qsrc = models["dream"]
    path = write_onnx(tmp_path / "m.onnx", qsrc)
    assert read_onnx_info(path).embed_type == "f16"
    rounded = {n: qsrc.get(n) for n in canonical_names(qsrc.hparams)}
    for n in ("token_embd.weight", "output.weight"):
        rounded[n] = rounded[n].astype(np.float16).astype(np.float32)
    ids = _ids(qsrc.hparams)
    assert rel_err(OrtBackend(path).raw_logits(ids), reference_logits(DictTensors(qsrc.hparams, rounded), ids)) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_float_export(models, tmp_path, family, outtype):
    src, _ = models[family]
    hp = src.hparams
    path = write_onnx(tmp_path / "m.onnx", src, outtype=outtype)
    onnx.checker.check_model(str(path), full_check=True)
    info = read_onnx_info(path)
    assert (info.outtype, info.kernel, info.bits_per_weight) == (outtype, "none", None)
    ids, mask = _ids(hp), _mask(2, 11)
    be = OrtBackend(path)
    assert be.keep_packed is False
    if outtype == "f32":
        assert rel_err(be.raw_logits(ids, mask), reference_logits(src, ids, mask)) < 1e-5
    else:
        rounded = DictTensors(hp, {n: (src.get(n).astype(np.float16).astype(np.float32)
                                       if (is_linear(hp, n) or n in ("token_embd.weight", "output.weight")) else src.get(n))
                                   for n in canonical_names(hp)})
        assert rel_err(be.raw_logits(ids, mask), reference_logits(rounded, ids, mask)) < TOL
        assert rel_err(be.raw_logits(ids), reference_logits(src, ids)) < 1e-2


def test_quantized_source_as_float(models, tmp_path):
    """outtype f32 of a quantized source stores W_hat: same logits as the quantized export."""
    _, qsrc = models["llada"]
    path = write_onnx(tmp_path / "m.onnx", qsrc, outtype="f32")
    ids = _ids(qsrc.hparams)
    assert rel_err(OrtBackend(path).raw_logits(ids), reference_logits(qsrc, ids)) < TOL
    assert isinstance(OnnxTensors(path).get("blk.0.attn_q.weight"), np.ndarray)


@pytest.mark.parametrize("kernel", ["function", "matmulnbits"])
def test_round_trip_tensors(models, tmp_path, kernel):
    """OnnxTensors reads back every stored field bit for bit (the codes of MatMulNBits decode to the signs)."""
    _, qsrc = models["dream"]
    path = write_onnx(tmp_path / "m.onnx", qsrc, kernel=kernel, embed_type="f32")
    back = OnnxTensors(path)
    assert back.hparams == qsrc.hparams
    n_mu = 0
    for name in canonical_names(qsrc.hparams):
        a, b = qsrc.get(name), back.get(name)
        if isinstance(a, QuantizedTensor):
            assert isinstance(b, QuantizedTensor) and a.equal(b), name
            n_mu += a.mu is not None
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert n_mu > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_from_onnx_tensors(models, tmp_path, family):
    """The PyTorch model loaded from the tensors stored in the .onnx gives the same logits as onnxruntime."""
    torch = pytest.importorskip("torch")
    from qdllm_export.models import load_model

    _, qsrc = models[family]
    path = write_onnx(tmp_path / "m.onnx", qsrc, embed_type="f32")
    model = load_model(OnnxTensors(path))
    ids = _ids(qsrc.hparams)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    assert rel_err(OrtBackend(path).raw_logits(ids), ref) < TOL


def test_stock_session(models, tmp_path):
    """A plain onnxruntime session (no options, no plugin) runs the file, mask optional."""
    _, qsrc = models["dream"]
    path = write_onnx(tmp_path / "m.onnx", qsrc, embed_type="f32")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    assert [i.name for i in sess.get_overridable_initializers()] == ["attention_mask", "position_ids"]
    ids, mask = _ids(qsrc.hparams), _mask(2, 11)
    assert rel_err(sess.run(None, {"input_ids": ids})[0], reference_logits(qsrc, ids)) < TOL
    out = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert rel_err(out, reference_logits(qsrc, ids, mask)) < TOL


def test_metadata_describe_tokenizer(models, tmp_path):
    src, qsrc = models["dream"]
    path = write_onnx(tmp_path / "m.onnx", qsrc, qdllm_meta={"method": "random", "bits": 2.0})
    info = read_onnx_info(path)
    hp = qsrc.hparams
    assert info.hparams == hp and info.shift_logits and info.format_version == 1
    assert info.meta == {"method": "random", "bits": 2.0}
    assert info.special_ids["mask"] == hp.mask_token_id and "eos" in info.special_ids
    assert info.config["model_type"] in ("Dream", "dream")
    md = info.metadata
    assert md["qdllm.family"] == "dream" and md["qdllm.shift_logits"] == "true"
    assert md["qdllm.mask_token_id"] == str(hp.mask_token_id)
    qts = [qsrc.get(n) for n in canonical_names(hp) if is_linear(hp, n)]
    bits = sum(q.stored_bits() for q in qts) / sum(q.shape[0] * q.shape[1] for q in qts)
    be = OrtBackend(path)
    d = be.describe()
    assert d["format"] == "onnx" and d["family"] == "dream" and d["kernel"] == "function"
    assert d["bits_per_weight_linear_tensor"] == pytest.approx(bits)
    assert d["bits_per_weight_linear"] == pytest.approx(bits, rel=1e-3)  # 1 bit per sign as stored
    assert d["size_bytes"] == path.stat().st_size and d["n_params"] == src.n_params()
    assert d["n_quantized_linears"] == len(qts) and d["shift_logits"] is True
    # the tokenizer travels in the file: text round-trips without the checkpoint folder
    assert be.tokenizer is not None
    enc = be.tokenizer.encode("Shall I compare thee")
    assert be.tokenizer.decode(enc.ids) == "Shall I compare thee"
    nb = write_onnx(tmp_path / "nb.onnx", qsrc, kernel="matmulnbits")
    dn = OrtBackend(nb).describe()
    assert dn["kernel"] == "matmulnbits" and dn["bits_per_weight_linear_tensor"] == pytest.approx(bits)
    assert dn["bits_per_weight_linear"] > bits + 0.9  # 2-bit codes: one more bit per sign


def test_external_data(models, tmp_path):
    _, qsrc = models["llada"]
    inline = write_onnx(tmp_path / "a.onnx", qsrc, embed_type="f32")
    ext = write_onnx(tmp_path / "b.onnx", qsrc, embed_type="f32", external_data=True)
    assert (tmp_path / "b.onnx.data").is_file() and not (tmp_path / "a.onnx.data").exists()
    onnx.checker.check_model(str(ext), full_check=True)
    info = read_onnx_info(ext)
    assert info.external_files == ["b.onnx.data"]
    assert info.file_size == ext.stat().st_size + (tmp_path / "b.onnx.data").stat().st_size
    ids = _ids(qsrc.hparams)
    np.testing.assert_array_equal(OrtBackend(ext).raw_logits(ids), OrtBackend(inline).raw_logits(ids))
    assert OnnxTensors(ext).get("blk.1.ffn_down.weight").equal(qsrc.get("blk.1.ffn_down.weight"))


def test_overwrite_and_temp_files(models, tmp_path):
    src, _ = models["llada"]
    path = write_onnx(tmp_path / "m.onnx", src, outtype="f16")
    with pytest.raises(QdllmError, match="already exists"):
        write_onnx(path, src, outtype="f16")
    write_onnx(path, src, outtype="f32", overwrite=True)
    assert read_onnx_info(path).outtype == "f32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporaries left behind


def test_writer_refuses(models, tmp_path):
    src, qsrc = models["llada"]
    with pytest.raises(QdllmError, match="no quantized tensor"):
        write_onnx(tmp_path / "a.onnx", src)  # outtype quantized needs a quantized source
    with pytest.raises(QdllmError, match="kernel"):
        write_onnx(tmp_path / "a.onnx", qsrc, kernel="cuda")
    with pytest.raises(QdllmError, match="outtype"):
        write_onnx(tmp_path / "a.onnx", qsrc, outtype="q4")
    with pytest.raises(QdllmError, match="does not exist"):
        write_onnx(tmp_path / "nope" / "a.onnx", qsrc)
    assert list(tmp_path.iterdir()) == []


def test_group_size_48(tmp_path):
    """A group size that is not a power of two: the function kernel handles it, MatMulNBits cannot."""
    from tests.test_onnx_ref import random_quantized_model

    hp = tiny_hparams("dream", d_model=192, d_ff=384, n_heads=4, n_vocab=200)
    src = random_quantized_model(hp, seed=7, mu_every=2, group_size=48)
    path = write_onnx(tmp_path / "m.onnx", src, embed_type="f32")
    assert read_onnx_info(path).group_size == 48
    ids = _ids(hp, 1, 7)
    assert rel_err(OrtBackend(path).raw_logits(ids), reference_logits(src, ids)) < TOL
    with pytest.raises(QdllmError, match="power of two"):
        write_onnx(tmp_path / "nb.onnx", src, kernel="matmulnbits")


def test_external_data_automatic(models, tmp_path, monkeypatch):
    """Past the inline limit (1.8 GB; lowered here) the weights go to NAME.onnx.data by themselves."""
    import formats.onnx as fo

    _, qsrc = models["llada"]
    monkeypatch.setattr(fo, "INLINE_LIMIT", 100_000)
    path = write_onnx(tmp_path / "m.onnx", qsrc)
    assert read_onnx_info(path).external_files == ["m.onnx.data"]
    with pytest.raises(QdllmError, match="external_data=True"):
        write_onnx(tmp_path / "n.onnx", qsrc, external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
