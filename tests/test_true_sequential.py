"""True-sequential calibration and honest bits: each group's Hessian comes from inputs produced by the
block with the earlier groups already quantized, and uniform baselines report their native packing."""

from __future__ import annotations

import json

import pytest
import torch

from formats.checkpoint import QuantizedCheckpoint
from formats.tensors import HFTensors
from qdllm_export.calib import CalibConfig
from qdllm_export.models import dequantize_torch
from qdllm_export.block_pass import load_block
from qdllm_export.pipeline import _calibration, quantize_checkpoint
from qdllm_export.quant import HessianAccumulator, QuantConfig
from qdllm_export.quant.recon import ReconConfig
from qdllm_export.targets.planes import PlanesTarget
from qdllm_export.targets.tables import table_values
from tests.tiny import TEXT, make_checkpoint

CAL = dict(n_samples=6, seq_len=32)


class Recording(PlanesTarget):
    """A planes target that keeps the H each linear was quantized with (calibrating even for RTN, whose
    weights ignore H, so that block 0's inputs are the same with and without true-sequential)."""

    needs_data = True

    def __init__(self, cfg: QuantConfig):
        super().__init__(cfg)
        self.seen: dict[str, torch.Tensor] = {}

    def quantize(self, name, W, H, plan):
        self.seen[name] = H.clone()
        return super().quantize(name, W, H, plan)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts")
    src, hp, _ = make_checkpoint(root / "src", "llada", seed=4)
    calib = root / "calib.txt"
    calib.write_text(TEXT * 3)
    ccfg = CalibConfig(path=str(calib), **CAL)
    runs = {}
    for ts in (True, False):
        t = Recording(QuantConfig(method="rtn", bits=2))
        # no block-output tuning: it re-rounds the stored codes after the Hessians were taken
        quantize_checkpoint(src, root / f"q{ts}", t, ccfg, true_sequential=ts, recon=ReconConfig(iters=0))
        runs[ts] = (t.seen, root / f"q{ts}")
    return src, ccfg, runs


def _hessian_by_hand(src, ccfg, quantized_roles, ck, role):
    """H of ``role`` in block 0 with ``quantized_roles`` replaced by the stored values of ``ck``."""
    s = HFTensors(src)
    calib = _calibration(s, src, ccfg, "cpu", 4, table_values(ck.get("token_embd.weight")))  # the embedding as shipped
    block = load_block(s, 0, "cpu")
    lin = block.linears()
    for r in quantized_roles:
        with torch.no_grad():
            lin[r].weight.copy_(dequantize_torch(ck.get(f"blk.0.{r}.weight")))
    acc = HessianAccumulator(lin[role].in_features, dtype=torch.float64)
    h = lin[role].register_forward_hook(lambda m, i, o: acc.add_batch(i[0]))
    with torch.no_grad():
        block(calib.x, calib.cos, calib.sin)
    h.remove()
    return acc.H


def test_group_hessian_comes_from_the_quantized_earlier_groups(setup):
    src, ccfg, runs = setup
    seen_ts, q_ts = runs[True]
    seen_flat, _ = runs[False]
    ck = QuantizedCheckpoint(q_ts)
    # the first group sees the float block either way
    for r in ("attn_q", "attn_k", "attn_v"):
        assert torch.allclose(seen_ts[f"blk.0.{r}.weight"], seen_flat[f"blk.0.{r}.weight"], rtol=0, atol=0)
    # attn_output: true-sequential H differs from the float block's, and equals the H computed by hand
    # with q/k/v replaced by their stored values
    h_ts, h_flat = seen_ts["blk.0.attn_output.weight"], seen_flat["blk.0.attn_output.weight"]
    assert (h_ts - h_flat).abs().max() > 1e-3 * h_flat.abs().max()
    by_hand = _hessian_by_hand(src, ccfg, ("attn_q", "attn_k", "attn_v"), ck, "attn_output")
    assert torch.allclose(h_ts.double(), by_hand, rtol=1e-4, atol=1e-6 * float(by_hand.abs().max()))
    by_hand_down = _hessian_by_hand(src, ccfg, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"),
                                    ck, "ffn_down")
    h_down = seen_ts["blk.0.ffn_down.weight"].double()
    assert torch.allclose(h_down, by_hand_down, rtol=1e-4, atol=1e-6 * float(by_hand_down.abs().max()))


@pytest.mark.parametrize("method,bits,native", [("gptq", 2, 2.25), ("rtn", 3, 3.25), ("quant-dllm", 2, None)])
def test_native_bits_accounting(tmp_path, method, bits, native):
    src, hp, _ = make_checkpoint(tmp_path / "src", "dream", seed=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 3)
    _, rec = quantize_checkpoint(src, tmp_path / "q", QuantConfig(method=method, bits=bits),
                                 CalibConfig(path=str(calib), **CAL))
    stored = json.loads((tmp_path / "q" / "qdllm_quant.json").read_text())
    assert stored["bits_per_weight_linear_native"] == native
    for name, t in stored["tensors"].items():
        if name in stored["tables"]:  # the embedding and head: ggml types, no native packing
            continue
        assert t["bits_per_weight_native"] == native
        if native is not None:  # planes spend more than the packing the method ships in
            assert t["bits_per_weight"] > native
