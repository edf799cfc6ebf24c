"""The main job end to end on the bundled models: quantize with every method, write GGUF, and check that
PyTorch (dequantized from the stored fields) and the NumPy runtime on the GGUF agree."""

from __future__ import annotations

import json

import pytest

from formats.gguf import write_gguf
from formats.onnx import write_onnx
from formats.checkpoint import QuantizedCheckpoint
from formats.tokenizer import load_tokenizer
from qdllm_export.backends import open_model, resolve
from qdllm_export.calib import CalibConfig
from qdllm_export.pipeline import quantize_checkpoint
from qdllm_export.quant import QuantConfig
from qdllm_export.verify import verify_files
from runtime_ref.gguf_model import GGUFBackend
from runtime_ref.ort import OrtBackend

CAL = CalibConfig(n_samples=16, seq_len=128)
METHODS = [("quant-dllm", 2.0), ("gptq", 2), ("rtn", 2)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    out = {}
    for model in ("tiny-llada", "tiny-dream"):
        for method, bits in METHODS:
            q = root / f"{model}-{method}"
            _, rec = quantize_checkpoint(resolve(model), q, QuantConfig(method=method, bits=bits), CAL)
            g = write_gguf(root / f"{model}-{method}.gguf", QuantizedCheckpoint(q), tokenizer=load_tokenizer(q),
                           qdllm_meta={"method": method, "bits": float(bits)})
            o = write_onnx(root / f"{model}-{method}.onnx", QuantizedCheckpoint(q), tokenizer=load_tokenizer(q),
                           qdllm_meta={"method": method, "bits": float(bits)})
            out[(model, method)] = (q, g, rec, o)
    return out


@pytest.mark.parametrize("model", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("method", [m for m, _ in METHODS])
def test_gguf_and_onnx_match_pytorch(exported, model, method):
    q, g, rec, o = exported[(model, method)]
    ref = open_model(str(q))
    reps = verify_files(ref, [GGUFBackend(g), OrtBackend(o)], ratios=[0.15, 0.5, 0.9], n_seq=2, seq_len=64, seed=0,
                        gen_length=16, rtol=1e-4, min_agree=0.99)
    for rep in reps:
        assert rep.worst_rel < 1e-4, (rep.path, rep.logits)
        assert rep.min_agree >= 0.99
        assert [c.identical for c in rep.generation] == [True] * len(rep.generation), rep.generation
        assert rep.passed


def test_bits_per_weight(exported):
    """Every stored bit of the quantized linears, as `inspect` reports it, equals the quantizer's count."""
    for (model, method), (q, g, rec, o) in exported.items():
        info = GGUFBackend(g).describe()
        assert info["bits_per_weight_linear"] == pytest.approx(rec["bits_per_weight_linear"], rel=1e-9)
        assert OrtBackend(o).describe()["bits_per_weight_linear"] == pytest.approx(rec["bits_per_weight_linear"], rel=1e-9)
        if method == "quant-dllm":
            # 2 planes + fp16 row scales per 128 columns + fp16 column scales over only 256..768 rows
            assert info["bits_per_weight_linear"] < 2.35


def test_cli_verify_float_reference_and_failure(cli, exported):
    """A float checkpoint as REF runs the file's own planes; a file of another quantization fails (exit 1)."""
    q, g, _, o = exported[("tiny-llada", "quant-dllm")]
    code, out, _ = cli("verify", "tiny-llada", g, o, "--json", "--gen-length", "8")
    rep = json.loads(out)
    assert code == 0 and rep["passed"] and "tensors as stored in" in rep["files"][0]["reference"]
    _, g_rtn, _, _ = exported[("tiny-llada", "rtn")]
    code, out, _ = cli("verify", q, g_rtn, "--json", "--gen-length", "8")
    assert code == 1 and not json.loads(out)["passed"]


def test_cli_gguf_refuses_existing(cli, exported, tmp_path):
    q, _, _, _ = exported[("tiny-dream", "gptq")]
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    code, _, err = cli("gguf", q, out)
    assert code != 0 and "--force" in err and out.read_bytes() == b"keep"
    code, _, err = cli("gguf", q, out, "--force")  # --force replaces only files qdllm-export wrote
    assert code == 2 and "not a file qdllm-export wrote" in err and out.read_bytes() == b"keep"
    out.unlink()
    assert cli("gguf", q, out)[0] == 0
    code, stdout, _ = cli("gguf", q, out, "--force", "--json")
    assert code == 0 and json.loads(stdout)["format"] == "gguf"
    assert not list(tmp_path.glob(".*tmp*"))
