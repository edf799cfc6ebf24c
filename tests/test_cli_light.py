"""Issue 8, item 6: verbs on a .gguf / .onnx file never import torch, and the NumPy runtime decodes each
weight once per process instead of once per forward (same logits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from formats.gguf import write_gguf
from formats.onnx import write_onnx
from formats.qtensor import QuantizedTensor
from formats.tensors import HFTensors
from formats.tokenizer import load_tokenizer
from runtime_ref.gguf_model import DecodedWeights, GGUFBackend
from tests.test_gguf import quantized_source

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "qdllm_export" / "data" / "tiny-llada"

DRIVER = r"""
import contextlib, io, json, sys
sys.modules["torch"] = None  # any 'import torch' raises ImportError
from qdllm_export.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(args)
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue()])
print(json.dumps({"results": results, "torch": sys.modules.get("torch") is not None}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("light")
    src = HFTensors(TINY)
    tok = load_tokenizer(TINY)
    return write_gguf(d / "m.gguf", src, tokenizer=tok, outtype="f16"), write_onnx(d / "m.onnx", src, outtype="f16", tokenizer=tok)


def test_file_verbs_run_without_torch(files):
    gguf, onnx = map(str, files)
    argv = [["--help"], ["inspect", gguf, "--json"], ["inspect", onnx, "--json"],
            ["generate", gguf, "--prompt", "ROMEO:", "--gen-length", "8", "--json"],
            ["generate", onnx, "--prompt-ids", "2046,5,9", "--gen-length", "8", "--json"],
            ["eval", gguf, "--max-windows", "1", "--mc", "1", "--json"],
            ["verify", gguf, onnx, "--gen-length", "4", "--n-seq", "1", "--seq-len", "16", "--json"]]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert not rep["torch"]
    codes = [c for c, _ in rep["results"]]
    assert codes == [0] * len(argv), rep
    gen = json.loads(rep["results"][3][1])
    assert len(gen["tokens"]) == 8 and gen["family"] == "llada"
    assert json.loads(rep["results"][6][1])["passed"]  # f16 GGUF in NumPy == f16 ONNX in onnxruntime


def test_decoded_weights_give_the_same_logits_and_decode_once(tmp_path, monkeypatch):
    src, tok = quantized_source(tmp_path, "dream")
    path = write_gguf(tmp_path / "q.gguf", src, tokenizer=tok)
    ids = np.random.default_rng(0).integers(0, 200, (2, 12))
    streamed = GGUFBackend(path, decoded=False).logits(ids)
    calls = []
    orig = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize", lambda self: calls.append(1) or orig(self))
    be = GGUFBackend(path, decoded=True)
    for _ in range(3):
        np.testing.assert_array_equal(be.logits(ids), streamed)
    n_linear = 7 * be.hparams.n_layers
    assert len(calls) == n_linear  # once per quantized linear, not once per forward


def test_decoded_weights_only_when_they_fit():
    """tiny-llada's weights but the embedding: 3,934,464 floats, 15,737,856 bytes decoded."""
    from formats.families import read_config

    _, hp, _ = read_config(TINY)
    assert DecodedWeights.fits(hp, budget=15_737_856) and not DecodedWeights.fits(hp, budget=15_737_855)
