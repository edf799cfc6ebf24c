"""The packed weights stay packed inside onnxruntime: optimized graph and resident memory.

``PlaneMatMul`` dequantizes inside the graph; if onnxruntime constant-folded that it would hold every
weight in float32. The function's dequantization has a data dependency on its input, so it is never
constant, and ``runtime_ref.ort`` also disables ConstantFolding (or caps it): all three are checked.
Resident memory is measured in a fresh subprocess per model (psutil RSS, /proc VmHWM for the peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from formats.onnx import write_onnx
from runtime_ref.ort import session_options
from tests.test_onnx_ref import random_quantized_model
from tests.tiny import tiny_hparams

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

PROBE = r"""
import json, sys
import numpy as np, psutil
from runtime_ref.ort import OrtBackend

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0

proc = psutil.Process()
path, fold = sys.argv[1], sys.argv[2]
rss0 = proc.memory_info().rss
be = OrtBackend(path, threads=2, fold=fold) if fold != "plain" else OrtBackend(path, threads=2, keep_packed=False)
rss1 = proc.memory_info().rss
be.raw_logits(np.arange(16)[None] % be.hparams.n_vocab)
print(json.dumps({"rss0": rss0, "session": rss1 - rss0, "peak_run": hwm() - rss0}))
"""


def _probe(path: Path, fold: str = "disable") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), fold], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@pytest.mark.parametrize("mode", ["disable", "cap", "plain"])
@pytest.mark.parametrize("kernel", ["function", "matmulnbits"])
def test_optimized_graph_keeps_planes(tmp_path, mode, kernel):
    """The graph onnxruntime actually runs holds the packed uint8 planes and no float weight."""
    hp = tiny_hparams("llada", d_model=256, d_ff=512, n_vocab=100)
    path = write_onnx(tmp_path / "m.onnx", random_quantized_model(hp, seed=2, mu_every=3), kernel=kernel, embed_type="f32")
    if mode == "plain":
        so, disabled = ort.SessionOptions(), []
    else:
        so, disabled = session_options(keep_packed=True, fold=mode)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    small = 256 * 256 // 8  # the smallest weight holds 65536 weights; float copies would be >= that
    floats = {t.name: int(np.prod(t.dims)) for t in opt.graph.initializer if t.data_type in (1, 10, 11)}
    big = {n: s for n, s in floats.items() if s >= small and n not in ("token_embd.weight", "output.weight")}
    assert not big, f"float weights folded into the session: {sorted(big)[:5]}"
    packed = "codes" if kernel == "matmulnbits" else "signs"
    if kernel == "function":  # MatMulNBits' codes are prepacked by the kernel and may leave the graph
        names = {t.name for t in opt.graph.initializer}
        assert sum(n.endswith("." + packed) for n in names) == 14


def test_resident_memory(tmp_path):
    """RSS after loading stays near the file size and far below the float32 size of the weights."""
    hp = tiny_hparams("llada", d_model=1024, n_layers=4, n_heads=8, d_ff=4096, n_vocab=512)
    src = random_quantized_model(hp, seed=0)
    n_lin = 4 * (4 * 1024 * 1024 + 3 * 1024 * 4096)
    float_bytes = 4 * n_lin  # 268 MB of float32 linear weights
    files = {
        "function": write_onnx(tmp_path / "f.onnx", src),
        "function-ext": write_onnx(tmp_path / "fe.onnx", src, external_data=True),
        "matmulnbits": write_onnx(tmp_path / "n.onnx", src, kernel="matmulnbits"),
        "f32": write_onnx(tmp_path / "w.onnx", src, outtype="f32"),
    }
    res = {k: _probe(p) for k, p in files.items()}
    res["function-cap"] = _probe(files["function"], "cap")
    res["function-plain"] = _probe(files["function"], "plain")  # folding on: still packed (data dependency)
    size = {k: _size(files[k.split("-")[0] if k.startswith("function-") and k != "function-ext" else k]) for k in res}
    table = "\n".join(f"{k:15s} file {size[k] / MB:7.1f} MB  session +{r['session'] / MB:7.1f} MB  "
                      f"peak in a 16-token forward +{r['peak_run'] / MB:7.1f} MB" for k, r in res.items())
    print(f"\nfloat32 linear weights {float_bytes / MB:.0f} MB\n{table}")
    fixed = 40 * MB  # onnxruntime's own session overhead (~13 MB measured) plus slack
    for k in ("function", "function-cap", "function-plain"):
        assert res[k]["session"] < 3 * size[k] + fixed, table  # initializers + the parsed protobuf
        assert res[k]["session"] < float_bytes / 3, table
        assert res[k]["peak_run"] < float_bytes * 0.8, table  # one linear dequantized at a time
    assert res["function-ext"]["session"] < 1.5 * size["function-ext"] + fixed, table  # memory-mapped data
    assert res["matmulnbits"]["session"] < 4 * size["matmulnbits"] + fixed and res["matmulnbits"]["session"] < float_bytes / 2, table
    assert res["f32"]["session"] > 0.8 * float_bytes, table  # control: the probe does see float weights
