"""formats/ and runtime_ref/ import and run with torch unavailable (phone- and CI-side installs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import numpy as np
import formats.checkpoint, formats.gguf, formats.gguf_read, formats.onnx, formats.qtensor, formats.tensors
import runtime_ref.forward, runtime_ref.gguf_model, runtime_ref.likelihood, runtime_ref.ort, runtime_ref.sampler
from formats.gguf import write_gguf
from formats.tensors import HFTensors
from runtime_ref.gguf_model import GGUFBackend
from runtime_ref.sampler import llada_generate
src = HFTensors(sys.argv[1])
write_gguf(sys.argv[2], src, outtype="f16")
be = GGUFBackend(sys.argv[2])
out = llada_generate(be.logits, np.array([[src.hparams.bos_token_id, 5, 9]]), mask_id=src.hparams.mask_token_id,
                     steps=4, gen_length=4, block_length=4)
print("ok", out.shape, "torch" in sys.modules and sys.modules["torch"] is not None)
"""


def test_formats_and_runtime_run_without_torch(tmp_path):
    folder = ROOT / "qdllm_export" / "data" / "tiny-llada"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tmp_path / "m.gguf")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok (1, 7) False"
