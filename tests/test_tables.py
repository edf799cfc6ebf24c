"""The embedding and the head are chosen where the model is made, and every file written from the checkpoint
holds the same numbers (DESIGN section 10): GGUF byte for byte, ONNX as declared f16 copies; verify says when
a file holds other table types than REF."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from formats.checkpoint import QuantizedCheckpoint
from formats.onnx import read_onnx_info
from formats.stored import is_stored

TABLES = ("token_embd.weight", "output.weight")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """RTN checkpoints of tiny-llada (deterministic, no calibration): default tables, and f32 tables."""
    from qdllm_export.calib import CalibConfig
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.backends import resolve
    from qdllm_export.quant import QuantConfig
    from qdllm_export.targets.tables import TablesSpec

    root = tmp_path_factory.mktemp("tables")
    out = {}
    for key, spec in (("default", TablesSpec()), ("f32", TablesSpec("f32", "f32"))):
        quantize_checkpoint(resolve("tiny-llada"), root / key, QuantConfig(method="rtn"), CalibConfig(), tables=spec)
        out[key] = root / key
    return out


def test_checkpoint_holds_the_tables_and_gguf_copies_their_bytes(checkpoints, cli, tmp_path):
    q = QuantizedCheckpoint(checkpoints["default"])
    assert [q.stored_type(n) for n in TABLES] == ["Q4_K", "Q6_K"]
    rec = json.loads((checkpoints["default"] / "qdllm_quant.json").read_text())
    assert rec["tables"]["token_embd.weight"]["bits_per_weight"] == 4.5
    assert 0 < rec["tables"]["output.weight"]["rel_weight_error"] < rec["tables"]["token_embd.weight"]["rel_weight_error"] < 0.2
    assert 3.0 < rec["bits_per_weight_model"] < 4.0  # linears ~2.5, tables 4.5 / 6.6, norms bf16
    code, _, err = cli("gguf", checkpoints["default"], tmp_path / "q.gguf")
    assert code == 0, err
    g = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    for n in TABLES:
        stored = q.get(n)
        assert is_stored(stored) and g[n.removesuffix(".weight") + ".weight"].tensor_type.name == stored.ggml_type
        assert np.array_equal(np.asarray(g[n].data).reshape(-1), stored.data.reshape(-1))  # byte for byte


def test_gguf_refuses_another_table_type_than_the_checkpoint_holds(checkpoints, cli, tmp_path):
    code, _, err = cli("gguf", checkpoints["default"], tmp_path / "x.gguf", "--embed-type", "q8_0")
    assert code == 2 and "holds token_embd as Q4_K" in err and "--embed-type q8_0" in err
    assert not (tmp_path / "x.gguf").exists()
    code, _, err = cli("gguf", checkpoints["default"], tmp_path / "y.gguf", "--head-type", "q6_k")  # what it holds
    assert code == 0, err


def test_onnx_declares_its_f16_copies_and_verify_passes(checkpoints, cli, tmp_path):
    code, _, err = cli("onnx", checkpoints["default"], tmp_path / "q.onnx")
    assert code == 0, err
    info = read_onnx_info(tmp_path / "q.onnx")
    assert [info.tensors[n].get("source_type") for n in TABLES] == ["Q4_K", "Q6_K"]
    assert [info.tensors[n]["dtype"] for n in TABLES] == ["f16", "f16"]
    code, out, err = cli("verify", checkpoints["default"], tmp_path / "q.onnx", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["passed"], err
    assert "output.weight, token_embd.weight as stored in" in rep["files"][0]["reference"]
    code, _, err = cli("onnx", checkpoints["f32"], tmp_path / "f.onnx")  # f32 tables stay f32: exact, nothing declared
    info = read_onnx_info(tmp_path / "f.onnx")
    assert code == 0 and [info.tensors[n]["dtype"] for n in TABLES] == ["f32", "f32"]
    assert not any("source_type" in info.tensors[n] for n in TABLES)


def test_verify_names_table_types_that_differ_from_ref(checkpoints, cli, tmp_path):
    """The same RTN linears, tables Q4_K / Q6_K in the file and f32 in REF: another model, and verify says why."""
    code, _, err = cli("gguf", checkpoints["default"], tmp_path / "q.gguf")
    assert code == 0, err
    code, out, err = cli("verify", checkpoints["f32"], tmp_path / "q.gguf")
    assert code == 1
    assert "holds token_embd as Q4_K where REF holds F32" in out and "output as Q6_K where REF holds F32" in out
    code, out, _ = cli("verify", checkpoints["f32"], tmp_path / "q.gguf", "--json")
    assert "token_embd as Q4_K" in json.loads(out)["files"][0]["mismatch"]
