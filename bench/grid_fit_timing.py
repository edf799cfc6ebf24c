"""Where a stock-type fit spends its time: one ``grid_quantize`` of LLaDA-8B-shaped linears, split into the
block-parameter search (``grid.init``), the GPTQ column loop inside the blocks and the closed-form refit.

    python bench/grid_fit_timing.py [--type q2_k] [--device cuda]

Random weights (N(0, 0.02)) and a Hessian from 8192 random tokens with uneven channel scales; prints one line
per shape (seconds). Backs the "where the time goes" note of the scale-gguf section in docs/benchmarks.md;
on a CPU it uses small shapes (the 8B shapes take minutes there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qdllm_export.grids.base as base  # noqa: E402
from qdllm_export.grids.base import GridConfig, grid_quantize  # noqa: E402
from qdllm_export.grids.registry import grid_for  # noqa: E402

SHAPES_8B = [(12288, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]  # q/k/v stacked, o, gate/up stacked, down
SHAPES_CPU = [(512, 512), (256, 1024)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable, acc: list[float], device: str) -> Callable:
    def wrapper(*a: Any, **k: Any) -> Any:
        _sync(device)
        t = time.time()
        r = fn(*a, **k)
        _sync(device)
        acc[0] += time.time() - t
        return r
    return wrapper


def time_fit(shape: tuple[int, int], gtype: str, device: str) -> dict[str, float]:
    """Seconds of one fit of a ``shape`` linear: total, init, column loop, refit."""
    n_out, n_in = shape
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(n_out, n_in, generator=g, device=device) * 0.02
    X = torch.randn(8192, n_in, generator=g, device=device) * torch.rand(n_in, generator=g, device=device)
    H = X.T @ X / X.shape[0]
    grid = grid_for(gtype, n_in)
    grid_quantize(W[:256].clone(), H, grid, GridConfig())  # warm-up (kernels, caches)
    acc = {k: [0.0] for k in ("init", "loop", "refit")}
    cls, orig_round = type(grid), base._round_block
    orig_init, orig_refit = cls.init, cls.refit
    cls.init, cls.refit = _timed(orig_init, acc["init"], device), _timed(orig_refit, acc["refit"], device)
    base._round_block = _timed(orig_round, acc["loop"], device)
    try:
        _sync(device)
        t = time.time()
        grid_quantize(W.clone(), H, grid, GridConfig())
        _sync(device)
        total = time.time() - t
    finally:
        cls.init, cls.refit, base._round_block = orig_init, orig_refit, orig_round
    return {"total": total, **{k: v[0] for k, v in acc.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="q2_k", help="A scalar ggml grid (q2_k ... q6_k, q8_0).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    for shape in SHAPES_8B if a.device.startswith("cuda") else SHAPES_CPU:
        t = time_fit(shape, a.type, a.device)
        print(f"{a.type} {shape[0]}x{shape[1]} on {a.device}: total {t['total']:.2f} s, init {t['init']:.2f}, "
              f"column loop {t['loop']:.2f}, refit {t['refit']:.2f}", flush=True)


if __name__ == "__main__":
    main()
