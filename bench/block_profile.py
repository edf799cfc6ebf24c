"""Where one block of LLaDA-8B's shapes spends its time, per output type (``qdllm_export.timing`` phases).

    python bench/block_profile.py --workdir /tmp/prof --layers 2 --targets planes q2_k int2 auto --out prof.json

Writes a random bf16 checkpoint of LLaDA-8B's shapes with ``--layers`` blocks (``bench/scale.py``), then
runs the library pipeline of each target in this process with phase timing on (every phase boundary
synchronises the GPU): ``planes`` (``quantize``, Quant-dLLM 2 planes), ``q2_k`` and ``auto`` (``gguf
--outtype q2_k`` / ``auto --bpw 2.5``) and ``int2`` (``onnx --outtype int2``, block 128). Prints, per
target and pass, the seconds of each phase in the last block (the first carries the warm-up), and writes
every block's phases to ``--out``. Phases: ``load`` (read the shard, float32 on the device), ``forward``
(calibration forwards), ``hessian`` (``X^T X`` accumulation), ``plan`` (ABMP), ``fit:<linears>`` with its
inner ``grid:*`` / ``daq:*`` / ``stats`` phases, ``store`` (stored values into the block), ``sens:<type>``
(``auto``'s sensitivity fits), ``recon`` (block-output tuning, ``--tune-iters``); ``other`` is the block's wall time outside every phase (the shard write).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale import SHAPES, write_random_checkpoint  # noqa: E402
from formats.families import HParams  # noqa: E402
from qdllm_export.timing import totals  # noqa: E402


def run_target(name: str, ckpt: Path, out: Path, device: str, samples: int, seq_len: int,
               tune_iters: int | None = None) -> None:
    """One target's pipeline on ``ckpt`` into ``out`` (as the CLI verb runs it, minus the file writer);
    ``tune_iters``: block-output tuning steps (None: the default)."""
    from qdllm_export.calib import CalibConfig
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant import QuantConfig
    from qdllm_export.targets.ggml import StockSpec, quantize_stock
    from qdllm_export.targets.nbits import NBitsSpec, quantize_nbits

    from qdllm_export.cli.quantize import tuning

    ccfg = CalibConfig(n_samples=samples, seq_len=seq_len)
    kw = dict(device=device, force=True, **tuning(tune_iters, False, 0))
    if name == "planes":
        quantize_checkpoint(ckpt, out, QuantConfig(), ccfg, **kw)
    elif name == "int2":
        quantize_nbits(ckpt, out, NBitsSpec("int2", block_size=128), ccfg, **kw)
    elif name == "auto":
        quantize_stock(ckpt, out, StockSpec("auto", 2.5), ccfg, **kw)
    else:
        quantize_stock(ckpt, out, StockSpec(name), ccfg, **kw)


def warm_up(device: str) -> None:
    """Create the CUDA context and the cuBLAS / cuSOLVER handles before anything is timed."""
    import torch

    if device.startswith("cuda"):
        a = torch.randn(256, 256, device=device)
        h = a @ a.T + 256 * torch.eye(256, device=device)
        torch.linalg.solve_triangular(torch.linalg.cholesky(h), a, upper=False)
        torch.linalg.cholesky_ex(h.double())
        torch.cuda.synchronize()


def summary(blocks: list[dict]) -> dict[str, dict[str, float]]:
    """Per pass, the last block's phases (seconds, by leaf name: ``fit:attn_output/grid:loop`` counts as
    ``grid:loop``) with ``other`` = wall minus the phases, ``wall``, and each outer phase as ``=name``."""
    out: dict[str, dict[str, float]] = {}
    for b in blocks:
        ph: dict[str, float] = {}
        for k, v in b["phases"].items():
            ph[k.split("/")[-1]] = ph.get(k.split("/")[-1], 0.0) + v
        ph.update({f"={k}": v for k, v in totals(b["phases"]).items()})
        ph["other"] = b["wall"] - sum(b["phases"].values())
        ph["wall"] = b["wall"]
        out[b["pass"]] = ph
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--targets", nargs="+", default=["planes", "q2_k", "int2", "auto"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--shape", default="llada-8b", choices=sorted(SHAPES))
    ap.add_argument("--tune-iters", type=int, default=None, help="block-output tuning steps (default: the library's)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    from qdllm_export import timing

    shape = dict(SHAPES[a.shape], n_layers=a.layers)
    mask = 126336 if shape["n_vocab"] == 126464 else shape["n_vocab"] - 1
    hp = HParams(family="llada", rope_theta=500000.0, norm_eps=1e-5, mask_token_id=mask, context_length=4096, **shape)
    ckpt = a.workdir / "ckpt"
    if not (ckpt / "config.json").exists():
        write_random_checkpoint(ckpt, hp, "cuda" if a.device.startswith("cuda") else "cpu")
    results = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still writes what was measured
    warm_up(a.device)
    for name in a.targets:
        timing.enable()
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            run_target(name, ckpt, a.workdir / f"q-{name}", a.device, a.samples, a.seq_len, a.tune_iters)
        finally:
            res = timing.result()
            results[name] = res
            a.out.write_text(json.dumps(results, indent=1))
        res.update(seconds=time.time() - t0, peak_gpu_gb=torch.cuda.max_memory_allocated() / 2**30
                   if a.device.startswith("cuda") else None, last=summary(res["blocks"]))
        results[name] = res
        a.out.write_text(json.dumps(results, indent=1))
        for p, ph in res["last"].items():
            top = sorted(((v, k) for k, v in ph.items() if k != "wall" and not k.startswith("=")), reverse=True)
            outer = sorted(((v, k[1:]) for k, v in ph.items() if k.startswith("=")), reverse=True)
            print(f"{name} {p}: wall {ph['wall']:.2f} s | " + ", ".join(f"{k} {v:.2f}" for v, k in top if v >= 0.05)
                  + " || outer: " + ", ".join(f"{k} {v:.2f}" for v, k in outer if v >= 0.05), flush=True)
        print(f"{name}: {res['seconds']:.1f} s for {a.layers} blocks, peak GPU {res['peak_gpu_gb'] or 0:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
