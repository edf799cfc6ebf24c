"""Bad ONNX files: every defect is a ``FormatError`` whose message names the file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from formats.errors import FormatError
from formats.onnx import read_onnx_info, write_onnx
from runtime_ref.ort import OrtBackend
from tests.test_onnx_ref import random_quantized_model
from tests.tiny import tiny_hparams


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid quantized tiny model (function kernel) and the same with external data."""
    root = tmp_path_factory.mktemp("onnx_err")
    src = random_quantized_model(tiny_hparams("llada", d_model=256, d_ff=512), seed=1, mu_every=4)
    return (write_onnx(root / "good.onnx", src), write_onnx(root / "ext.onnx", src, external_data=True),
            write_onnx(root / "nb.onnx", src, kernel="matmulnbits"))


def _edited(good_path, tmp_path, edit, name="bad.onnx"):
    model = onnx.load(str(good_path))
    edit(model)
    out = tmp_path / name
    onnx.save(model, str(out))
    return out


def _props(model) -> dict:
    return {p.key: p for p in model.metadata_props}


def _raises(path, match):
    with pytest.raises(FormatError, match=match) as e:
        read_onnx_info(path)
    assert str(path) in str(e.value)
    return e


def test_not_ours(tmp_path):
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    p = tmp_path / "other.onnx"
    onnx.save(helper.make_model(g), str(p))
    _raises(p, "not a qdllm-export ONNX model")
    with pytest.raises(FormatError, match="not a qdllm-export"):
        OrtBackend(p)


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"GGUF\x03\x00\x00\x00" * 4])
def test_garbage(tmp_path, content):
    p = tmp_path / "junk.onnx"
    p.write_bytes(content)
    _raises(p, "ONNX")


def test_truncated(good, tmp_path):
    data = good[0].read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    _raises(p, "not a readable ONNX model")


def test_missing_file(tmp_path):
    _raises(tmp_path / "absent.onnx", "cannot open")


@pytest.mark.parametrize("which", [0, 2])
def test_missing_function(good, tmp_path, which):
    p = _edited(good[which], tmp_path, lambda m: m.functions.pop(0))
    e = _raises(p, "does not define that function")
    assert "qdllm.PlaneMatMul" in str(e.value)


def test_wrong_initializer_shape(good, tmp_path):
    def edit(m):
        for i, t in enumerate(m.graph.initializer):
            if t.name == "blk.1.ffn_up.weight.signs":
                arr = onnx.numpy_helper.to_array(t)
                m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(arr[:, :-1].copy(), t.name))
    e = _raises(_edited(good[0], tmp_path, edit), "blk.1.ffn_up.weight.signs")
    assert "expected uint8" in str(e.value)


def test_wrong_dtype_nbits(good, tmp_path):
    def edit(m):
        for i, t in enumerate(m.graph.initializer):
            if t.name == "blk.0.attn_q.weight.scales":
                arr = onnx.numpy_helper.to_array(t).astype(np.float32)
                m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    _raises(_edited(good[2], tmp_path, edit), "blk.0.attn_q.weight.scales")


def test_missing_initializer(good, tmp_path):
    def edit(m):
        keep = [t for t in m.graph.initializer if t.name != "blk.0.ffn_down.weight.col_scale"]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
    _raises(_edited(good[0], tmp_path, edit), "'blk.0.ffn_down.weight.col_scale' is missing")


def test_hparams_disagree_with_tensors(good, tmp_path):
    def edit(m):
        p = _props(m)["qdllm.hparams"]
        hp = json.loads(p.value)
        hp["d_ff"] = 768
        p.value = json.dumps(hp)
    _raises(_edited(good[0], tmp_path, edit), "ffn_gate.weight")


def test_unknown_version(good, tmp_path):
    def edit(m):
        _props(m)["qdllm.format_version"].value = "99"
    _raises(_edited(good[0], tmp_path, edit), "format version 99")


def test_malformed_metadata(good, tmp_path):
    def edit(m):
        _props(m)["qdllm.tensors"].value = "{not json"
    _raises(_edited(good[0], tmp_path, edit), "metadata is incomplete or malformed")


def test_missing_external_data(good, tmp_path):
    p = tmp_path / "ext.onnx"
    p.write_bytes(good[1].read_bytes())  # the .onnx without its .data
    _raises(p, "external data file .* is missing")
    (tmp_path / "ext.onnx.data").write_bytes(b"\0" * 100)  # present but truncated
    _raises(p, "past the end")
