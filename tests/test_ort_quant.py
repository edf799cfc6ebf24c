"""The comparison harness against onnxruntime's own quantizer (bench/ort_quant.py) on a tiny random model:
every configuration runs end to end and the bits per weight are what each file stores."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("onnx_ir")  # onnxruntime's MatMulNBitsQuantizer needs it

from bench.ort_quant import ALGOS, EvalConfig, compare, markdown  # noqa: E402
from qdllm_export.calib import CalibConfig  # noqa: E402
from tests.tiny import make_checkpoint, tiny_hparams  # noqa: E402


def test_compare_with_onnxruntime_quantizer(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path / "ck", "llada", hp=tiny_hparams("llada", d_model=128, d_ff=256), seed=2)
    rows = compare(folder, tmp_path / "work", model="tiny", bits=(2,), block_sizes=(32,),
                   ccfg=CalibConfig(n_samples=8, seq_len=64), ev=EvalConfig(seq_len=32, windows=3, mc=2))
    by = {r.label: r for r in rows}
    assert by["FP (fp32 linears)"].delta == 0.0
    ours = by["ours int2"]
    # 2-bit codes + an fp16 scale per 32 columns + 2-bit zero points packed along blocks (4 blocks of 128 columns -> 1 byte)
    assert ours.bits_per_weight == pytest.approx(2 + 16 / 32 + 8 / 128)
    assert ours.delta_acc4 is not None and math.isfinite(ours.delta_acc4)
    rtn = by["onnxruntime rtn int2"]
    assert rtn.bits_per_weight == pytest.approx(2 + 32 / 32 + 8 / 128) and not rtn.note  # fp32 scales, MatMulNBits
    assert by["onnxruntime gptq int2"].note  # stored as floats below 4 bits
    assert {r.variant for r in rows} >= {"FP", "ours", *(f"onnxruntime {a}" for a in ALGOS if a != "kquant")}
    assert all(math.isfinite(r.nll) and math.isfinite(r.delta) for r in rows)
    assert "onnxruntime hqq int2" in markdown(rows, {"calib_samples": 8, "calib_seq_len": 64, "eval_windows": 3,
                                                     "eval_seq_len": 32, "mc": 2})
