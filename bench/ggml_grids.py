"""ggml grids on a synthetic layer: relative output error of our encoders against llama.cpp's own.

``python bench/ggml_grids.py [--rows 512 --cols 1024] [--types q2_k,iq2_xs] [--device cuda] [--speed 4096]``

The layer: heavy-tailed weights with per-row scales; activations correlated across channels, with a few
outlier input channels (as LLM activations have), ``H = X^T X / N``. Error: ``tr(D H D^T) / tr(W H W^T)``,
``D = W - W_hat``. Columns: our encoder (scalar types; lattice types: ``grids.lattice``,
GPTQ one group of 8 columns at a time) in the three rounding modes; llama.cpp's encoder (libggml) without
imatrix, with the importance ``diag(H)`` as imatrix, and inside our GPTQ driver (block compensation, plus
the closed-form ``d`` and sub-scale refit for the lattice types). ``--speed N``: seconds of
``grid_quantize`` (gptq) on an N x N layer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qdllm_export.grids import GridConfig, grid_quantize
from qdllm_export.grids.libggml import LATTICE
from qdllm_export.grids.registry import GGML_GRIDS
from qdllm_export.grids.lattice import LatticeGrid

TYPES = ("q2_k", "iq2_xxs", "iq2_xs", "iq2_s", "q3_k", "iq3_s", "q4_k", "q5_k", "q6_k", "q8_0")


def layer(rows: int, cols: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``W [rows, cols]`` and ``H [cols, cols]`` float32 (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(5, rows, cols, generator=g).square().mean(0)
    W = torch.randn(rows, cols, generator=g) / chi2.sqrt() * (0.5 + torch.rand(rows, 1, generator=g)) * 0.02  # Student t, 5 dof
    mix = (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5).to(device)
    X = torch.randn(8 * cols, cols, generator=g).to(device) @ mix
    X *= (0.5 + torch.rand(cols, generator=g)).to(device)
    X[:, torch.randperm(cols, generator=g)[: max(1, cols // 64)]] *= 20.0
    return W.to(device), X.T @ X / X.shape[0]


def rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    Hd, Wd = H.double(), W.double()
    return float(torch.trace(D @ Hd @ D.T) / torch.trace(Wd @ Hd @ Wd.T))


def fit(W: torch.Tensor, H: torch.Tensor | None, name: str, rounding: str, refit: bool = True) -> tuple[float, torch.Tensor]:
    """Bits per weight and ``W_hat``; checks that the stored bytes decode (gguf-py) to ``W_hat`` exactly."""
    grid = LatticeGrid(name.removeprefix("ours-")) if name.startswith("ours-") else GGML_GRIDS[name]()
    res = grid_quantize(W, H, grid, GridConfig(rounding=rounding, refit=refit))
    if not np.array_equal(res.stored.dequantize(), res.w_hat.cpu().numpy()):
        raise AssertionError(f"{name} {rounding}: the stored bytes do not decode to w_hat")
    return res.stored.bits_per_weight(), res.w_hat


def table(W: torch.Tensor, H: torch.Tensor, types: list[str]) -> list[str]:
    cols = ["type", "bpw", "ours rtn", "ours imp", "ours gptq", "ggml rtn", "ggml imatrix", "ggml imatrix+refit", "ggml gptq"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in types:
        row: list[str] = [t]
        ref, ours = f"ggml-{t}", f"ours-{t}" if t in LATTICE else t
        bpw = GGML_GRIDS[ref]().bits_per_weight(W.shape[1])
        row.append(f"{bpw:.4g}")
        for mode in ("rtn", "importance", "gptq"):
            row.append(f"{rel_error(W, fit(W, H, ours, mode)[1], H):.5f}")
        for mode, refit in (("rtn", False), ("importance", False), ("importance", True), ("gptq", True)):
            row.append(f"{rel_error(W, fit(W, H, ref, mode, refit)[1], H):.5f}")
        out.append("| " + " | ".join(row) + " |")
        print(out[-1], flush=True)
    return out


def speed(n: int, types: list[str], device: str) -> None:
    W, H = layer(n, n, device=device)
    for t in types:
        for mode in ("importance", "gptq"):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            grid_quantize(W, H, GGML_GRIDS[t](), GridConfig(rounding=mode))
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{t} {mode}: {time.perf_counter() - t0:.2f} s for {n}x{n} on {device}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speed", type=int, default=0, help="also time gptq on an N x N layer")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = args.types.split(",")
    if args.rows:
        W, H = layer(args.rows, args.cols, device=args.device)
        table(W, H, types)
    if args.speed:
        speed(args.speed, types, args.device)


if __name__ == "__main__":
    main()
