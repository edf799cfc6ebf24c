"""The streaming pipeline and quantized checkpoints: determinism, bit-exact round trip, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from formats.checkpoint import QuantizedCheckpoint, QuantizedCheckpointWriter
from formats.qtensor import QuantizedTensor
from formats.stored import is_stored
from formats.safetensors_io import Checkpoint, write_checkpoint
from qdllm_export.calib import CalibConfig, apply_mcs
from qdllm_export.models import dequantize_torch
from qdllm_export.pipeline import quantize_checkpoint
from qdllm_export.quant import QuantConfig
from tests.tiny import TEXT, make_checkpoint

CAL = dict(n_samples=8, seq_len=32)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TEXT * 3)
    return p


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("q")
    src, hp, _ = make_checkpoint(root / "src", "dream", dtype="bfloat16", seed=3,
                                 hp=None)
    out = {}
    for method, bits in (("quant-dllm", 2.0), ("gptq", 2), ("rtn", 3)):
        dst = root / f"{method}-{bits}"
        res, rec = quantize_checkpoint(src, dst, QuantConfig(method=method, bits=bits),
                                       CalibConfig(path=str(calib_file), **CAL))
        out[method] = (dst, res, rec)
    return src, out


def test_record_and_budget(quantized):
    _, out = quantized
    dst, res, rec = out["quant-dllm"]
    ck = QuantizedCheckpoint(dst)
    stored = json.loads((dst / "qdllm_quant.json").read_text())
    assert stored["method"] == "quant-dllm" and stored["calibration"]["mcs"] is True
    planes_total, blocks_total = 0, 0
    bits, n = 0, 0
    for name in ck.names():
        t = ck.get(name)
        if isinstance(t, QuantizedTensor):
            planes_total += int(t.planes.sum())
            blocks_total += t.n_blocks
            bits += t.stored_bits()
            n += t.shape[0] * t.shape[1]
    assert planes_total == 2 * blocks_total  # ABMP pools average exactly to the budget
    assert stored["bits_per_weight_linear"] == pytest.approx(bits / n, rel=1e-12)
    assert len(stored["tensors"]) == 7 * ck.hparams.n_layers + 2  # the linears and the two tables
    assert {n: stored["tensors"][n]["ggml_type"] for n in ("token_embd.weight", "output.weight")} == \
        {"token_embd.weight": "Q5_0", "output.weight": "Q8_0"}  # Q4_K / Q6_K's fallbacks at d_model 128
    assert {n: stored["tables"][n]["type"] for n in stored["tables"]} == {"token_embd.weight": "Q5_0", "output.weight": "Q8_0"}


def test_uniform_methods_are_planes(quantized):
    _, out = quantized
    ck = QuantizedCheckpoint(out["rtn"][0])
    t = ck.get("blk.0.ffn_up.weight")
    assert t.mu is not None and set(np.unique(t.planes)) == {3}
    w = t.dequantize()
    # an asymmetric 3-bit code: at most 8 distinct values per row per group
    g = w[:, : t.group_size]
    assert max(len(np.unique(r)) for r in g) <= 8


def test_deterministic_and_round_trip(quantized, tmp_path, calib_file):
    src, out = quantized
    dst, _, _ = out["quant-dllm"]
    again = tmp_path / "again"
    quantize_checkpoint(src, again, QuantConfig(), CalibConfig(path=str(calib_file), **CAL))
    a, b = QuantizedCheckpoint(dst), QuantizedCheckpoint(again)
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if isinstance(x, QuantizedTensor):
            assert x.equal(y), name
        elif is_stored(x):  # the tables' ggml bytes
            assert x.ggml_type == y.ggml_type and np.array_equal(x.data, y.data), name
        else:
            assert np.array_equal(x, y), name
    # write the tensors back through the writer: bit-identical files' tensors
    copy = tmp_path / "copy"
    w = QuantizedCheckpointWriter(copy, dst, n_shards=1)
    hf = a.family.hf_names(a.hparams)
    floats = {hf[n]: a.get(n) for n in a.names() if not is_stored(a.get(n))}
    qts = {hf[n]: a.get(n) for n in a.names() if is_stored(a.get(n))}
    w.add_shard(floats, qts, bf16=True)
    w.finish(dict(a.record))
    c = QuantizedCheckpoint(copy)
    ra, rc = Checkpoint(dst), Checkpoint(copy)
    for k in ra.keys():
        assert np.array_equal(ra.raw(k), rc.raw(k)), k
    assert all(c.get(n).equal(a.get(n)) for n in a.names() if isinstance(a.get(n), QuantizedTensor))


def test_torch_dequant_matches_numpy(quantized):
    _, out = quantized
    for dst, _, _ in out.values():
        ck = QuantizedCheckpoint(dst)
        for name in ck.names():
            t = ck.get(name)
            if isinstance(t, QuantizedTensor):
                np.testing.assert_allclose(dequantize_torch(t).numpy(), t.dequantize(), rtol=0, atol=1e-6)


def test_mcs_scheme():
    win = np.arange(4 * 40).reshape(4, 40)
    masked, m = apply_mcs(win, mask_id=-1, prefix_ratio=0.25, seed=5)
    assert not m[:, :10].any()  # visible prefix
    assert np.array_equal(masked[m], np.full(m.sum(), -1)) and np.array_equal(masked[~m], win[~m])
    assert m[-1, 10:].all()  # t = 1 masks every suffix token
    for i in range(4):  # seed + i, u < t, exactly as the released scheme
        u = np.random.default_rng(5 + i).random(40)
        assert np.array_equal(m[i, 10:], u[10:] < (i + 1) / 4)


def _no_output(path):
    assert not path.exists() and not list(path.parent.glob(f".{path.name}.*.partial"))


def test_bad_group_size(cli, tmp_path, calib_file):
    src, _, _ = make_checkpoint(tmp_path / "src", "llada")
    code, _, err = cli("quantize", src, tmp_path / "out", "--group-size", "96", "--calib", calib_file, "--calib-samples", "4", "--seq-len", "32")
    assert code != 0 and "not divisible by the group size 96" in err and "Traceback" not in err
    _no_output(tmp_path / "out")


def test_nan_weights(cli, tmp_path, calib_file):
    src, hp, w = make_checkpoint(tmp_path / "src", "llada")
    w["model.transformer.blocks.1.up_proj.weight"][3, 5] = np.nan
    write_checkpoint(src, w)
    code, _, err = cli("quantize", src, tmp_path / "out", "--calib", calib_file, "--calib-samples", "4", "--seq-len", "32")
    assert code != 0 and "model.transformer.blocks.1.up_proj.weight" in err and "NaN" in err
    _no_output(tmp_path / "out")


def test_short_calibration(cli, tmp_path):
    src, _, _ = make_checkpoint(tmp_path / "src", "dream")
    short = tmp_path / "short.txt"
    short.write_text("To be")
    code, _, err = cli("quantize", src, tmp_path / "out", "--calib", short, "--seq-len", "64")
    assert code != 0 and str(short) in err and "shorter than one window" in err
    _no_output(tmp_path / "out")


def test_existing_output(cli, tmp_path, calib_file):
    src, _, _ = make_checkpoint(tmp_path / "src", "dream")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("quantize", src, out, "--calib", calib_file, "--calib-samples", "4", "--seq-len", "32")
    assert code != 0 and "--force" in err and (out / "keep.txt").read_text() == "mine"
    code, _, err = cli("quantize", src, out, "--calib", calib_file, "--calib-samples", "4", "--seq-len", "32", "--force")
    assert code != 0 and "did not write" in err and (out / "keep.txt").read_text() == "mine"  # not ours: kept
    (out / "keep.txt").unlink()
    args = ("quantize", src, out, "--calib", calib_file, "--calib-samples", "4", "--seq-len", "32", "--method", "rtn")
    assert cli(*args)[0] == 0  # an empty folder may be used
    code, outp, _ = cli(*args, "--force", "--json")  # our own checkpoint: replaced
    assert code == 0 and json.loads(outp)["bits_per_weight_linear"] > 2
