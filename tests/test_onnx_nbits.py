"""onnxruntime's own grid in ONNX: NBitsTensor linears as one com.microsoft.MatMulNBits node each.

On the bundled models (real weights): every linear on the 2/4/8-bit grid (bits and block sizes mixed
across tensors), compared with the NumPy forward and with PyTorch on the same dequantized weights
(``qdllm_export.verify``): exact at accuracy level 0, within the documented int8 tolerances at level 4.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from formats.errors import FormatError, QdllmError
from formats.nbits import NBitsTensor, quantize_rtn
from formats.onnx import OnnxTensors, read_onnx_info, write_onnx
from formats.tensors import DictTensors, HFTensors, canonical_names, is_linear
from qdllm_export.backends import TorchBackend, resolve
from qdllm_export.verify import INT8_MIN_AGREE, INT8_RTOL, verify_files
from runtime_ref.ort import OrtBackend
from tests.test_onnx_ref import reference_logits, rel_err

MODELS = ("tiny-llada", "tiny-dream")
GRIDS = ((2, 32), (4, 64), (8, 128), (2, 128), (4, 32))  # (bits, block size), cycled over the linears


def nbits_source(model: str) -> DictTensors:
    """The bundled model with every linear RTN-quantized onto MatMulNBits grids (cycling ``GRIDS``; the
    calibrated grid fit is the pipeline's, tested in tests/test_grids*.py)."""
    src = HFTensors(resolve(model))
    hp = src.hparams
    out = {}
    for i, name in enumerate(canonical_names(hp)):
        w = src.get(name)
        if is_linear(hp, name):
            bits, bs = GRIDS[i % len(GRIDS)]
            w = quantize_rtn(w, bits, bs, name=name)
        out[name] = w
    q = DictTensors(hp, out)
    q.config, q.folder = src.config, src.folder
    return q


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{(model, level): path} with f32 embeddings (so the PyTorch reference needs no f16 rounding)."""
    root = tmp_path_factory.mktemp("nbits")
    out = {}
    for model in MODELS:
        src = nbits_source(model)
        out[model] = src
        for level in (0, 4):
            out[(model, level)] = write_onnx(root / f"{model}-{level}.onnx", src, accuracy_level=level, embed_type="f32")
    return out


@pytest.mark.parametrize("model", MODELS)
def test_exact_at_level_0(files, model):
    """One MatMulNBits node per linear; the stock checker passes; logits equal the NumPy forward of the stored
    grid; verify against PyTorch on the same dequantized weights passes with identical greedy tokens."""
    path, src = files[(model, 0)], files[model]
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    n_lin = sum(is_linear(src.hparams, n) for n in canonical_names(src.hparams))
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in m.graph.node) == n_lin
    info = read_onnx_info(path)
    assert (info.format_version, info.kernel, info.accuracy_level) == (2, "none", 0)
    ids = np.random.default_rng(0).integers(0, src.hparams.n_vocab, (2, 13))
    assert rel_err(OrtBackend(path).raw_logits(ids), reference_logits(src, ids)) < 1e-4
    ref = TorchBackend(HFTensors(resolve(model)), resolve(model))
    (rep,) = verify_files(ref, [OrtBackend(path)], ratios=[0.15, 0.9], n_seq=2, seq_len=32, seed=0, gen_length=8,
                          rtol=1e-4, min_agree=0.99)
    assert "tensors as stored in" in rep.reference  # the file's own grid tensors overlaid on the checkpoint
    assert rep.passed and rep.worst_rel <= 1e-4 and rep.tokens_required, rep.failures()
    assert all(g.identical for g in rep.generation)


@pytest.mark.parametrize("model", MODELS)
def test_int8_activations_at_level_4(files, model):
    """Accuracy level 4 (int8 activations): within the documented tolerance, argmax agreement reported."""
    path = files[(model, 4)]
    ref = TorchBackend(HFTensors(resolve(model)), resolve(model))
    (rep,) = verify_files(ref, [OrtBackend(path)], ratios=[0.15, 0.9], n_seq=2, seq_len=32, seed=0, gen_length=8,
                          rtol=1e-4, min_agree=0.99)
    assert not rep.tokens_required and rep.rtol == INT8_RTOL and rep.min_agree_required == INT8_MIN_AGREE
    assert 1e-4 < rep.worst_rel <= INT8_RTOL and rep.min_agree >= INT8_MIN_AGREE and rep.passed, rep.logits


def test_round_trip_bit_exact(files, tmp_path):
    """OnnxTensors reads every NBitsTensor back field for field, with f16 or f32 scales in the file."""
    src = files["tiny-dream"]
    f32 = write_onnx(tmp_path / "f32s.onnx", src, nbits_scales="f32", embed_type="f32", accuracy_level=0)
    for path in (files[("tiny-dream", 0)], f32):
        back = OnnxTensors(path)
        for name in canonical_names(src.hparams):
            a, b = src.get(name), back.get(name)
            if isinstance(a, NBitsTensor):
                assert isinstance(b, NBitsTensor) and (a.shape, a.bits, a.block_size) == (b.shape, b.bits, b.block_size)
                for f in ("codes", "scales", "zero_points"):
                    x, y = getattr(a, f), getattr(b, f)
                    assert x.dtype == y.dtype and np.array_equal(x, y), (name, f)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)
    info, info32 = read_onnx_info(files[("tiny-dream", 0)]), read_onnx_info(f32)
    assert info.bits_per_weight == pytest.approx(info32.bits_per_weight)  # the tensors' own count (fp16 scales)
    assert info.file_bits_per_weight == pytest.approx(info.bits_per_weight)
    assert info32.file_bits_per_weight > info.file_bits_per_weight  # 32-bit scales in the file
    ids = np.random.default_rng(1).integers(0, src.hparams.n_vocab, (1, 9))
    np.testing.assert_array_equal(OrtBackend(f32).raw_logits(ids), OrtBackend(files[("tiny-dream", 0)]).raw_logits(ids))


def test_int8_embeddings_and_head(files, tmp_path):
    """embed_type int8: token_embd one GatherBlockQuantized node, output one MatMulNBits node (8 bits, blocks of
    32); read back as NBitsTensors, overlaid by verify, so level 0 stays exact; not counted as linears."""
    src = files["tiny-dream"]
    path = write_onnx(tmp_path / "e.onnx", src, accuracy_level=0, embed_type="int8")
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    assert [n.op_type for n in m.graph.node if n.domain == "com.microsoft"].count("GatherBlockQuantized") == 1
    info = read_onnx_info(path)
    assert info.embed_type == "int8" and info.bits_per_weight == pytest.approx(read_onnx_info(files[("tiny-dream", 0)]).bits_per_weight)
    back = OnnxTensors(path)
    for name in ("token_embd.weight", "output.weight"):
        t = back.get(name)
        assert isinstance(t, NBitsTensor) and (t.bits, t.block_size) == (8, 32)
        w = src.get(name)
        assert np.abs(t.dequantize() - w).max() <= np.abs(w).max() / 200  # 8-bit RTN of the float table
    be = OrtBackend(path)
    assert set(be.quantized_names()) >= {"token_embd.weight", "output.weight"}
    ref = TorchBackend(HFTensors(resolve("tiny-dream")), resolve("tiny-dream"))
    (rep,) = verify_files(ref, [be], ratios=[0.5], n_seq=2, seq_len=32, seed=0, gen_length=6, rtol=1e-4, min_agree=0.99)
    assert rep.passed and rep.worst_rel <= 1e-4, rep.failures()


def test_stock_session_and_describe(files):
    path = files[("tiny-llada", 4)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # no options, no plugin
    assert sess.run(None, {"input_ids": np.array([[1, 2, 3]])})[0].shape == (1, 3, 2048)
    d = OrtBackend(path).describe()
    assert d["accuracy_level"] == 4 and d["n_quantized_linears"] == 28 and set(d["nbits_linears"]) == {"int2", "int4", "int8"}
    assert any("MatMulNBits int4 (block 64" in t["type"] for t in d["tensors"])


def _edit(path, tmp_path, fn):
    m = onnx.load(str(path))
    fn(m)
    out = tmp_path / "bad.onnx"
    onnx.save(m, str(out))
    return out


def test_corrupt_files_are_refused(files, tmp_path):
    good = files[("tiny-llada", 0)]

    def table(m, edit):
        p = next(p for p in m.metadata_props if p.key == "qdllm.tensors")
        t = json.loads(p.value)
        edit(t["blk.1.attn_k.weight"])
        p.value = json.dumps(t)

    bad = _edit(good, tmp_path, lambda m: table(m, lambda e: e.update(bits=3)))
    with pytest.raises(FormatError, match=r"bad.onnx: tensor blk.1.attn_k.weight has bits 3"):
        read_onnx_info(bad)
    bad = _edit(good, tmp_path, lambda m: table(m, lambda e: e.update(block_size=16)))
    with pytest.raises(FormatError, match="blk.1.attn_k.weight.codes"):
        read_onnx_info(bad)

    def attr(m):
        node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
        next(a for a in node.attribute if a.name == "bits").i = 8
    with pytest.raises(FormatError, match="not read by a MatMulNBits node"):
        read_onnx_info(_edit(good, tmp_path, attr))


def test_unsupported_bits_refused(files, monkeypatch):
    """An onnxruntime that cannot run the file's bits: refused at load, naming the versions that can."""
    import runtime_ref.ort as ro

    monkeypatch.setitem(ro._NBITS_PROBED, 2, ro.nbits_unsupported(2, "1.22.0", "a made-up refusal"))
    with pytest.raises(QdllmError, match=r"onnxruntime 1.22.0 cannot run 2-bit MatMulNBits.*onnxruntime >= 1.23.0 runs it"):
        OrtBackend(files[("tiny-dream", 4)])


def test_probe():
    from runtime_ref.ort import _probe_nbits, nbits_support

    assert nbits_support(2) is None and nbits_support(4) is None and nbits_support(8) is None
    why = _probe_nbits(3)
    assert "Only 2b, 4b and 8b" in why and "no onnxruntime release runs 3-bit MatMulNBits on the CPU (it runs 2, 4, 8)" in why


# ---------------------------------------------------------------------------------------------- the onnx verb


def test_cli_int4_generate_eval_verify(cli, tmp_path):
    """`onnx --outtype int4` (RTN: no calibration, fast) writes MatMulNBits at level 4; generate, eval and
    verify run the file with the onnxruntime backend."""
    out = tmp_path / "m.onnx"
    code, text, err = cli("onnx", "tiny-llada", out, "--outtype", "int4", "--method", "rtn", "--block-size", "64", "--json")
    assert code == 0, err
    d = json.loads(text)
    assert d["nbits_linears"] == {"int4": 28} and d["accuracy_level"] == 4 and d["embed_type"] == "int8"
    assert d["external_data"] == ["m.onnx.data"]  # the int outtypes map their weights from a data file
    assert d["qdllm"]["outtype"] == "int4" and d["qdllm"]["block_size"] == 64
    assert d["bits_per_weight_linear"] == pytest.approx(4 + 16 / 64 + 8 * 2 / 256, rel=0.01)  # 256- and 768-column linears
    code, text, err = cli("generate", out, "--prompt-ids", "5,6,7", "--gen-length", "4", "--json")
    assert code == 0 and len(json.loads(text)["tokens"]) == 4, err
    code, text, err = cli("eval", out, "--max-windows", "2", "--mc", "1", "--json")
    assert code == 0 and np.isfinite(json.loads(text)["nll"]), err
    code, text, err = cli("verify", "tiny-llada", out, "--gen-length", "4", "--n-seq", "1", "--json")
    rep = json.loads(text)["files"][0]
    assert code == 0 and rep["passed"] and rep["rtol"] == INT8_RTOL and not rep["tokens_required"], rep


def test_cli_auto_mix(cli, tmp_path):
    """`--outtype auto --bpw`: a per-tensor mix under the budget, from measured sensitivity (a small model and
    a tiny calibration, for time)."""
    from tests.tiny import make_checkpoint, tiny_hparams

    folder, _, _ = make_checkpoint(tmp_path / "ck", "dream", hp=tiny_hparams("dream", d_model=128, d_ff=256), seed=1)
    out = tmp_path / "a.onnx"
    code, text, err = cli("onnx", folder, out, "--outtype", "auto", "--bpw", "3", "--block-size", "128",
                          "--calib-samples", "4", "--seq-len", "32", "--accuracy-level", "0", "--single-file", "--json")
    assert code == 0, err
    d = json.loads(text)
    assert d["accuracy_level"] == 0 and d["bits_per_weight_linear"] <= 3.0 + 1e-9
    assert {"int2", "int4"} <= set(d["nbits_linears"]) and d["qdllm"]["bpw"] == 3.0
    assert d["external_data"] == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "ck"]


def test_cli_refusals_leave_nothing(cli, tmp_path, monkeypatch):
    """Bad input is refused before any work, one line naming the tensor / flag and the fix; nothing is written."""
    from tests.tiny import make_checkpoint, tiny_hparams

    folder, _, _ = make_checkpoint(tmp_path / "ck", "llada", hp=tiny_hparams("llada", d_model=128, d_ff=352), seed=1)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli("onnx", folder, out / "m.onnx", "--outtype", "int4", "--block-size", "64")
    assert code == 2 and "tensor blk.0.ffn_down.weight has n_in=352, not a multiple of --block-size 64" in err
    assert "block sizes that fit every linear: 32" in err
    code, _, err = cli("onnx", "tiny-llada", out / "m.onnx", "--outtype", "auto", "--bpw", "2.1")
    assert code == 2 and "--bpw 2.1 cannot be met at --block-size 128" in err and "nearest reachable budget is --bpw 2.154" in err
    assert "larger --block-size" not in err  # 128 is the largest offered (issue 15)
    import runtime_ref.ort as ro

    monkeypatch.setitem(ro._NBITS_PROBED, 2, ro.nbits_unsupported(2, "1.22.0", "a made-up refusal"))
    code, _, err = cli("onnx", "tiny-llada", out / "m.onnx", "--outtype", "int2")
    assert code == 2 and "cannot run 2-bit MatMulNBits" in err and "onnxruntime >= 1.23.0" in err
    assert list(out.iterdir()) == []
