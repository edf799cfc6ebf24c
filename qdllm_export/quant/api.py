"""``quantize_weight``: one entry point for every method, with input checks and error statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from formats.errors import QdllmError
from formats.qtensor import QuantizedTensor

from .common import check_hessian, check_planes, check_weight, output_error, tensor_label
from .config import QuantConfig
from .daq import daq_quantize
from .uniform import gptq_quantize, rtn_quantize


@dataclass
class QuantResult:
    """``qt``: the stored tensor; ``w_hat``: its dequantized value as float32 on W's device (equal to
    ``qt.dequantize()`` to fp32 rounding); ``stats``: see :func:`quantize_weight`."""

    qt: QuantizedTensor
    w_hat: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor | None,
    cfg: QuantConfig,
    planes: np.ndarray | None = None,
    name: str = "",
) -> QuantResult:
    """Quantize one linear weight ``W [n_out, n_in]`` with ``cfg.method``.

    ``H [n_in, n_in]``: layer-input second moment (``HessianAccumulator``); required by gptq,
    optional for quant-dllm (without it: no data-aware weighting, no compensation) and unused by
    rtn except for the statistics. ``planes``: planes per block for quant-dllm (e.g. from pooled
    ABMP); default: ABMP over this weight's blocks (or ``bits`` everywhere with abmp off).

    ``stats``: ``rel_weight_err = ||W - W_hat||_F^2 / ||W||_F^2``, ``rel_output_err =
    tr(D H D^T) / tr(W H W^T)`` (None without H), ``bits_per_weight`` (every stored bit),
    ``mean_planes``, ``method``, ``seconds``. Both errors are squared ratios from the STORED tensor.
    """
    if not isinstance(cfg, QuantConfig):
        raise QdllmError(f"{tensor_label(name)}: cfg must be a QuantConfig")
    check_weight(W, cfg.group_size, name)
    n_out, n_in = W.shape
    check_hessian(H, n_in, name)
    nb = n_in // cfg.group_size
    t0 = time.perf_counter()
    with torch.no_grad():
        if cfg.method == "quant-dllm":
            if planes is not None:
                planes = check_planes(planes, nb, name)
            qt, w_hat, _ = daq_quantize(W, H, cfg, planes=planes, name=name)
        else:
            if planes is not None and not np.all(np.asarray(planes) == cfg.int_bits):
                raise QdllmError(f"{tensor_label(name)}: method {cfg.method} uses {cfg.int_bits} planes in every block")
            if cfg.method == "rtn":
                qt, w_hat = rtn_quantize(W, cfg.int_bits, cfg.group_size, name=name)
            else:
                if H is None:
                    raise QdllmError(f"{tensor_label(name)}: method gptq needs the layer-input Hessian H")
                qt, w_hat = gptq_quantize(W, H.to(W.device), cfg.int_bits, cfg.group_size, cfg.percdamp, name=name,
                                          act_order=cfg.act_order, static_groups=cfg.static_groups)
        stats = error_stats(W, w_hat, H)
    stats.update(
        method=cfg.method,
        bits_per_weight=qt.bits_per_weight(),
        mean_planes=qt.mean_planes(),
        seconds=time.perf_counter() - t0,
    )
    qt.meta.update(cfg=cfg.to_dict())
    return QuantResult(qt=qt, w_hat=w_hat, stats=stats)


def error_stats(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None, chunk: int = 1024) -> dict[str, Any]:
    """Relative (squared) weight error and, with ``H``, relative layer-output error (float64, row-chunked)."""
    num = den = 0.0
    for r in range(0, W.shape[0], chunk):
        w = W[r : r + chunk].detach().to(torch.float64)
        num += float((w - W_hat[r : r + chunk].to(torch.float64)).pow(2).sum())
        den += float(w.pow(2).sum())
    out: dict[str, Any] = {"rel_weight_err": num / den if den > 0 else 0.0, "rel_output_err": None}
    if H is not None:
        num, den = output_error(W.detach(), W_hat, H.to(W.device), chunk)
        out["rel_output_err"] = num / den if den > 0 else 0.0
    return out
