"""Ablation of the quantizer choices the paper leaves open, on realistic synthetic layers.

``python -m qdllm_export.quant.ablate [--quick]`` prints a markdown table of the relative layer
output error ``tr(D H D^T) / tr(W H W^T)`` (mean over the synthetic layers; lower is better). The
measured table and the defaults chosen from it are in docs/quantizer.md.

Synthetic layers: heavy-tailed weights (Student-t, df 4) with per-row scale spread and a few
outlier input columns (x4); activations with correlated channels (a low-rank mix plus noise),
log-normal channel scales, a non-zero mean, and a few outlier channels (x20) concentrated in two
column blocks, as in LLM activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from .abmp import abmp_assign_pooled
from .api import error_stats, quantize_weight
from .config import QuantConfig
from .daq import block_scores
from .hessian import HessianAccumulator

SHAPES = ((512, 1024), (1024, 512), (768, 1024))


def synthetic_layer(
    n_out: int = 512,
    n_in: int = 1024,
    n_tokens: int = 4096,
    seed: int = 0,
    df: float = 4.0,
    n_outlier_cols: int = 8,
    n_outlier_ch: int = 6,
    act_outlier: float = 20.0,
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [n_out, n_in] float32, H [n_in, n_in] float32)`` with ``H = 2/N X^T X``."""
    rng = np.random.default_rng(seed)
    W = rng.standard_t(df, size=(n_out, n_in)) * 0.02
    W *= np.exp(rng.normal(0, 0.3, size=(n_out, 1)))
    oc = rng.choice(n_in, n_outlier_cols, replace=False)
    W[:, oc] *= 4.0
    r = max(8, n_in // 8)
    lat = rng.normal(size=(n_tokens, r))
    mix = rng.normal(size=(r, n_in)) / np.sqrt(r)
    X = lat @ mix + 0.5 * rng.normal(size=(n_tokens, n_in))
    X *= np.exp(rng.normal(0, 0.5, size=(1, n_in)))
    X += rng.normal(0, 0.3, size=(1, n_in))
    nb = n_in // group_size
    blocks = rng.choice(nb, min(2, nb), replace=False)
    ch = np.concatenate([b * group_size + rng.choice(group_size, n_outlier_ch // len(blocks), replace=False) for b in blocks])
    X[:, ch] *= act_outlier
    acc = HessianAccumulator(n_in, dtype=torch.float64)
    acc.add_batch(torch.from_numpy(X))
    return torch.from_numpy(W.astype(np.float32)), acc.H.to(torch.float32)


def make_layers(quick: bool = False, seed: int = 0, act_outliers=(20.0, 1.0)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer per (shape, activation-outlier factor): strong outlier channels (x20) and none (x1)."""
    shapes = SHAPES[:2] if quick else SHAPES
    return [
        synthetic_layer(n_out, n_in, seed=seed + 10 * a + i, act_outlier=f)
        for a, f in enumerate(act_outliers)
        for i, (n_out, n_in) in enumerate(shapes)
    ]


def evaluate(cfg: QuantConfig, layers, pooled_abmp: bool = False, use_h: bool = True) -> list[dict]:
    """Stats of every layer (``quantize_weight`` stats; the output error always uses H). With
    ``pooled_abmp`` the planes come from ABMP over the blocks of all ``layers`` together (pool only
    layers of one shape); without ``use_h`` the quantizer does not see H."""
    planes = [None] * len(layers)
    if cfg.method == "quant-dllm" and cfg.abmp and pooled_abmp:
        scores = [block_scores(W, H if use_h else None, cfg) for W, H in layers]
        planes = abmp_assign_pooled(scores, cfg.bits, cfg.abmp_ratio)
    out = []
    for (W, H), p in zip(layers, planes):
        if use_h:
            out.append(quantize_weight(W, H, cfg, planes=p).stats)
        else:
            st = quantize_weight(W, None, cfg, planes=p)
            out.append({**st.stats, **error_stats(W, st.w_hat, H)})
    return out


def variants(base: QuantConfig) -> list[tuple[str, QuantConfig, str]]:
    """(label, config, mode) rows of the ablation. mode: "" (main layers), "noH" (the quantizer
    does not see H), "abmp" (the wide ABMP layers, per layer), "abmp-pooled" (pooled over them)."""
    r = dataclasses.replace
    off = r(base, abmp=False)
    nodor = r(off, data_aware=False)
    rows = [
        ("RTN 2-bit", QuantConfig(method="rtn", bits=2), ""),
        ("GPTQ 2-bit", QuantConfig(method="gptq", bits=2), ""),
        ("RTN 3-bit", QuantConfig(method="rtn", bits=3), ""),
        ("GPTQ 3-bit", QuantConfig(method="gptq", bits=3), ""),
        ("DAQ without H (RSR only: no DOR, no compensation)", nodor, "noH"),
        ("DAQ iters=0 (greedy init only), no DOR", r(nodor, iters=0), ""),
        ("DAQ no DOR, compensation=diag (BiLLM)", r(nodor, compensation="diag"), ""),
        ("DAQ no DOR, compensation=exact", nodor, ""),
    ]
    for imp in ("hdiag", "obs", "schur"):
        rows.append((f"DOR d_j base only (c=0), d={imp}", r(off, importance=imp, outlier_weight=0.0), ""))
    for imp in ("hdiag", "obs", "schur"):
        for c in (1.0, 3.0, 10.0, 30.0):
            rows.append((f"DOR outliers only, d={imp}, c={c:g}", r(off, importance=imp, dor_base=False, outlier_weight=c), ""))
    for imp in ("hdiag", "obs", "schur"):
        for c in (0.5, 1.0, 2.0, 3.0, 10.0):
            rows.append((f"DOR base + outliers, d={imp}, c={c:g}", r(off, importance=imp, outlier_weight=c), ""))
    rows.append(("default, outlier scope=block", r(off, outlier_scope="block"), ""))
    rows.append(("default, sigma=2", r(off, outlier_sigma=2.0), ""))
    rows.append(("default, compensation=diag", r(off, compensation="diag"), ""))
    for it in (0, 1, 3, 5, 10, 15, 30):
        rows.append((f"default, iters={it}", r(off, iters=it), ""))
    for imp in ("hdiag", "obs", "schur"):
        b = r(base, importance=imp)
        rows.append((f"ABMP off (wide layers), d={imp}", r(b, abmp=False), "abmp"))
        for ratio in (0.05, 0.1, 0.2):
            rows.append((f"ABMP per layer (16 blocks), d={imp}, ratio {ratio:g}", r(b, abmp_ratio=ratio), "abmp"))
        for ratio in (0.05, 0.1, 0.2):
            rows.append((f"ABMP pooled, 3 layers (48 blocks), d={imp}, ratio {ratio:g}", r(b, abmp_ratio=ratio), "abmp-pooled"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes instead of three")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filter", default="", help="only rows whose label contains this")
    args = ap.parse_args(argv)
    main_layers = {f: make_layers(args.quick, args.seed, (f,)) for f in (20.0, 1.0)}
    wide = {
        f: [synthetic_layer(512, 2048, n_tokens=4096, seed=args.seed + 100 + i, act_outlier=f) for i in range(3)]
        for f in (20.0, 1.0)
    }
    print(f"main layers: {[tuple(W.shape) for W, _ in main_layers[1.0]]}; ABMP layers: 3 x (512, 2048)")
    print("activation outlier channels x20 and x1 (none); errors are means over the layers of a group")
    print()
    print("| variant | out. err (x20) | out. err (x1) | weight err (x1) | bits/weight | s |")
    print("|---|---|---|---|---|---|")
    for label, cfg, mode in variants(QuantConfig()):
        if args.filter and args.filter not in label:
            continue
        t = time.perf_counter()
        groups = wide if mode.startswith("abmp") else main_layers
        a = evaluate(cfg, groups[20.0], mode == "abmp-pooled", use_h=mode != "noH")
        b = evaluate(cfg, groups[1.0], mode == "abmp-pooled", use_h=mode != "noH")
        oa = np.mean([s["rel_output_err"] for s in a])
        ob = np.mean([s["rel_output_err"] for s in b])
        wb = np.mean([s["rel_weight_err"] for s in b])
        bpw = np.mean([s["bits_per_weight"] for s in a + b])
        dt = time.perf_counter() - t
        print(f"| {label} | {oa:.4f} | {ob:.4f} | {wb:.4f} | {bpw:.3f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
