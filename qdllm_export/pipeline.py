"""The streaming quantization pipeline: one transformer block resident at a time.

For block ``i``: load its weights from the checkpoint, run the calibration activations through it
with hooks that accumulate each linear's input statistics ``H``, quantize its linears (ABMP pooled
over the block's linears for Quant-dLLM), run the *quantized* block to produce the next block's
inputs, write the block's shard, free it. Embeddings and head are copied unquantized.
Peak memory: one block's weights, its ``H`` matrices and the calibration activations
``[n_samples, seq_len, d_model]`` (float32, on ``device``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from formats.checkpoint import QuantizedCheckpointWriter
from formats.errors import QdllmError
from formats.qtensor import QuantizedTensor
from formats.tensors import HFTensors, is_linear
from formats.tokenizer import load_tokenizer
from qdllm_export.calib import CalibConfig, apply_mcs, calibration_windows
from qdllm_export.models import dequantize_torch, family_module
from qdllm_export.models.layers import rope_tables
from qdllm_export.quant import HessianAccumulator, QuantConfig, abmp_assign_pooled, block_scores, quantize_weight

@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    mean_planes: float
    bits_per_weight: float
    rel_weight_error: float
    rel_output_error: float | None


@dataclass
class PipelineResult:
    layers: list[LayerReport] = field(default_factory=list)
    block_errors: list[float] = field(default_factory=list)  # relative output error of each quantized block
    seconds: float = 0.0

    def linear_bits_per_weight(self) -> float:
        n = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in self.layers) / n


def _load_block(src: HFTensors, i: int, device: str) -> torch.nn.Module:
    hp = src.hparams
    block = family_module(hp).Block(hp).to(device=device, dtype=torch.float32)
    prefix = hp.spec.layer_prefix.format(i=i)
    hf = hp.spec.hf_names(hp)
    params = dict(block.named_parameters())
    for name in src.layer_names(i):
        with torch.no_grad():
            params[hf[name][len(prefix):]].copy_(torch.from_numpy(src.get(name)))
    return block.eval()


def _err_text(r: LayerReport) -> str:
    out = "-" if r.rel_output_error is None else f"{r.rel_output_error:.4f}"
    return f"{r.name.split('.', 2)[2]} output err {out}, {r.bits_per_weight:.2f} bits/w"


def _stored(src: HFTensors, name: str, bf16: bool) -> np.ndarray:
    """A float tensor to copy unchanged: bf16 bits as stored (memory-mapped, no float copy), else float32."""
    return src.ckpt.raw(src.hf_name(name)) if bf16 and src.ckpt.dtype(src.hf_name(name)) == "BF16" else src.get(name)


@torch.no_grad()
def _run_block(block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int,
               keep: bool = True) -> torch.Tensor | None:
    """``block`` over ``x [N, L, d]`` in batches; writes the outputs into ``x`` in place unless ``keep`` is False."""
    for s in range(0, x.shape[0], batch):
        y = block(x[s : s + batch], cos, sin)
        if keep:
            x[s : s + batch] = y
    return x if keep else None


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    qcfg: QuantConfig,
    ccfg: CalibConfig,
    *,
    device: str = "cpu",
    force: bool = False,
    batch: int = 8,
    on_layer: Callable[[int, int, str], None] | None = None,
) -> tuple[PipelineResult, dict[str, Any]]:
    """Quantize the linears of an HF checkpoint folder into a quantized checkpoint at ``out_dir``.

    ``on_layer(block_index, n_blocks, what)`` reports progress. Returns the per-layer report and the
    record written to ``qdllm_quant.json``. Nothing is left at ``out_dir`` on failure.
    """
    t0 = time.time()
    torch.manual_seed(qcfg.seed)
    src = HFTensors(model_dir)
    hp = src.hparams
    tokenizer = load_tokenizer(model_dir)
    windows = calibration_windows(tokenizer, hp, ccfg)
    if ccfg.mcs:
        windows, _ = apply_mcs(windows, hp.mask_token_id, ccfg.prefix_ratio, ccfg.seed, protect_first=hp.spec.shift_logits)
    bf16 = src.dtype() == "BF16"
    writer = QuantizedCheckpointWriter(out_dir, model_dir, n_shards=hp.n_layers + 1, force=force)
    result = PipelineResult()
    try:
        emb = torch.from_numpy(src.get("token_embd.weight")).to(device)
        x = emb[torch.from_numpy(windows).to(device)]  # [N, L, d] float32
        del emb
        cos, sin = rope_tables(windows.shape[1], hp.head_dim, hp.rope_theta, torch.device(device))
        hf = hp.spec.hf_names(hp)
        for i in range(hp.n_layers):
            block = _load_block(src, i, device)
            linears = block.linears()
            acc = {r: HessianAccumulator(m.in_features, device=device) for r, m in linears.items()}
            hooks = [m.register_forward_hook(lambda mod, inp, out, r=r: acc[r].add_batch(inp[0]))
                     for r, m in linears.items()]
            _run_block(block, x, cos, sin, batch, keep=False)
            for h in hooks:
                h.remove()
            n_ref = min(batch, x.shape[0])  # block output error measured on the first windows
            y_ref = _run_block(block, x[:n_ref].clone(), cos, sin, batch)
            Hs = {r: a.H for r, a in acc.items()}
            acc.clear()
            planes: dict[str, np.ndarray | None] = {r: None for r in linears}
            if qcfg.method == "quant-dllm" and qcfg.abmp:
                scores = [block_scores(linears[r].weight, Hs[r], qcfg, name=f"blk.{i}.{r}.weight") for r in linears]
                planes = dict(zip(linears, abmp_assign_pooled(scores, qcfg.bits, qcfg.abmp_ratio, what=f"block {i}")))
            quantized: dict[str, QuantizedTensor] = {}
            for r, m in linears.items():
                name = f"blk.{i}.{r}.weight"
                if on_layer:
                    on_layer(i, hp.n_layers, name + (f" (previous: {_err_text(result.layers[-1])})" if result.layers else ""))
                res = quantize_weight(m.weight.data, Hs[r], qcfg, planes=planes[r], name=name)
                qt, stats = res.qt, res.stats
                quantized[hf[name]] = qt
                with torch.no_grad():
                    m.weight.copy_(dequantize_torch(qt, device))  # the stored values are the truth
                result.layers.append(LayerReport(name, qt.shape, qt.mean_planes(), qt.bits_per_weight(),
                                                 float(stats["rel_weight_err"]), stats.get("rel_output_err")))
            del Hs
            _run_block(block, x, cos, sin, batch)  # the quantized block feeds the next one
            result.block_errors.append(float((x[:n_ref] - y_ref).norm() / y_ref.norm()))
            if on_layer:
                on_layer(i + 1, hp.n_layers, f"block {i} done, block output error {result.block_errors[-1]:.4f}")
            del y_ref
            floats = {hf[n]: _stored(src, n, bf16) for n in src.layer_names(i) if hf[n] not in quantized}
            writer.add_shard(floats, quantized, bf16)
            del block, linears, quantized
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if on_layer:
            on_layer(hp.n_layers, hp.n_layers, "embeddings and head")
        writer.add_shard({hf[n]: _stored(src, n, bf16) for n in ("token_embd.weight", "output_norm.weight", "output.weight")}, {}, bf16)
        result.seconds = time.time() - t0
        record = {
            "method": qcfg.method,
            "bits": qcfg.bits,
            "group_size": qcfg.group_size,
            "options": qcfg.to_dict(),
            "calibration": ccfg.to_dict(),
            "source": str(model_dir),
            "source_dtype": src.dtype(),
            "family": hp.family,
            "bits_per_weight_linear": result.linear_bits_per_weight(),
            "block_output_errors": result.block_errors,
            "seconds": result.seconds,
            "tensors": {
                r.name: {"shape": list(r.shape), "group_size": qcfg.group_size, "mean_planes": r.mean_planes,
                         "bits_per_weight": r.bits_per_weight, "rel_weight_error": r.rel_weight_error,
                         "rel_output_error": r.rel_output_error}
                for r in result.layers
            },
        }
        writer.finish(record)
        return result, record
    except BaseException:
        writer.abort()
        raise


def check_quantizable(model_dir: str | Path, group_size: int) -> None:
    """Fail before any work when a linear's input width does not divide the group size."""
    src = HFTensors(model_dir)
    hp = src.hparams
    for name in src.names():
        if name.startswith("blk.0.") and is_linear(hp, name):
            n_in = src.ckpt.shape(src.hf_name(name))[1]
            if n_in % group_size:
                raise QdllmError(f"{model_dir}: {src.hf_name(name)} has n_in={n_in}, not divisible by the group size "
                                 f"{group_size}; pass --group-size with a divisor of {n_in}")
