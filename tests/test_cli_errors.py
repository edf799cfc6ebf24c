"""Bad input: one clear message naming the file, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest



def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _assert_clean_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_missing_path(cli):
    code, _, err = cli("inspect", "/nonexistent/model")
    _assert_clean_error(code, err, "/nonexistent/model")


def test_missing_shard(cli, tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts[("llada", "bfloat16", 3)], tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    code, _, err = cli("inspect", d)
    _assert_clean_error(code, err, "model-00002-of-00003.safetensors", "missing")


def test_index_names_missing_tensor(cli, tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts[("dream", "float16", 2)], tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    code, _, err = cli("inspect", d)
    _assert_clean_error(code, err, "model.layers.0.mlp.extra.weight", "model-00001-of-00002.safetensors")


def test_tensor_missing_from_checkpoint(cli, tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts[("llada", "bfloat16", 3)], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("inspect", d)
    _assert_clean_error(code, err, "model.transformer.blocks.2", "missing")


@pytest.mark.parametrize("key", ["d_model", "n_heads", "mask_token_id"])
def test_config_missing_key(cli, tiny_ckpts, tmp_path, key):
    d = _copy(tiny_ckpts[("llada", "float32", 1)], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("inspect", d)
    _assert_clean_error(code, err, "config.json", key)


def test_unknown_model_type(cli, tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts[("dream", "float32", 1)], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mamba", ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("generate", d, "--prompt-ids", "1,2")
    _assert_clean_error(code, err, "config.json", "unknown model_type 'mamba'")


def test_shape_disagrees_with_config(cli, tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts[("dream", "float32", 1)], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("inspect", d)
    _assert_clean_error(code, err, "model.safetensors", "gate_proj", "(512, 128)")


def test_truncated_safetensors(cli, tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts[("llada", "float32", 1)], tmp_path / "m")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    code, _, err = cli("inspect", d)
    _assert_clean_error(code, err, "model.safetensors", "truncated")


def test_empty_data_file(cli, tiny_ckpts, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = cli("eval", tiny_ckpts[("llada", "float32", 1)], "--data", empty)
    _assert_clean_error(code, err, str(empty), "empty")


def test_bad_prompt_ids(cli, tiny_ckpts):
    code, _, err = cli("generate", tiny_ckpts[("llada", "float32", 1)], "--prompt-ids", "1,x")
    _assert_clean_error(code, err, "--prompt-ids")
