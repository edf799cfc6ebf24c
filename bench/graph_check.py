"""CUDA graphs of the column walks (``quant.graphs``) against the eager walks, at LLaDA-8B's shapes, on one GPU.

    python bench/graph_check.py --out graphs.json

For the linears of one block (``q2_k``: q/k/v stacked twice as ``gguf`` fits them, gate/up, down; ``int2`` block 128:
down; planes: one 4096 x 4096 and one 12288 x 4096 linear, Quant-dLLM defaults) with a Hessian of random tokens:
the fit with ``QDLLM_CUDA_GRAPHS=0`` and with graphs, the stored bytes compared (they must be identical: the same
kernels replayed) and the seconds of each, the second run of each timed (the first captures / warms up).
``q2_k`` also compares the bytes packed on the GPU with the NumPy packer's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn, graphs: bool):
    import torch

    os.environ["QDLLM_CUDA_GRAPHS"] = "1" if graphs else "0"
    fn()  # warm-up / capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    a = ap.parse_args()
    import torch

    from qdllm_export.grids.base import GridConfig, grid_quantize
    from qdllm_export.grids.ggml import GGMLGrid, SPECS
    from qdllm_export.grids.nbits import NBitsGrid
    from qdllm_export.quant import QuantConfig
    from qdllm_export.quant.daq import daq_quantize

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def hess(n_in: int) -> torch.Tensor:
        X = torch.randn(a.tokens, n_in, generator=g, device=dev) * torch.rand(n_in, generator=g, device=dev)
        return X.T @ X / a.tokens

    H4, H12 = hess(4096), hess(12288)
    rows = []
    cases = [("q2_k q/k/v x2", 2 * 12288, H4, "q2_k"), ("q2_k gate/up x2", 2 * 24576, H4, "q2_k"),
             ("q2_k down x2", 2 * 4096, H12, "q2_k"), ("int2 down", 4096, H12, "int2")]
    for label, n, H, kind in cases:
        W = torch.randn(n, H.shape[0], generator=g, device=dev) * 0.02
        grid = GGMLGrid(SPECS["q2_k"]) if kind == "q2_k" else NBitsGrid(2, 128)
        fit = lambda: grid_quantize(W, H, grid, GridConfig(), pack=False)  # noqa: E731
        (eager, te), (graph, tg) = _timed(fit, False), _timed(fit, True)
        same = torch.equal(eager.w_hat, graph.w_hat) and _same(grid.pack(eager.states, tuple(W.shape), "w"),
                                                              grid.pack(graph.states, tuple(W.shape), "w"))
        row = {"case": label, "eager_s": te, "graphs_s": tg, "identical": same}
        if kind == "q2_k":
            t0 = time.perf_counter()
            gpu = grid.pack(graph.states, tuple(W.shape), "w")
            t_gpu = time.perf_counter() - t0
            states_cpu = [type(s)(*(x.cpu() if isinstance(x, torch.Tensor) else x for x in
                                    (s.d, s.dmin, s.sc, s.m, s.q, None))) for s in graph.states]
            t0 = time.perf_counter()
            cpu = grid.pack(states_cpu, tuple(W.shape), "w")
            row.update(pack_gpu_s=t_gpu, pack_numpy_s=time.perf_counter() - t0, pack_identical=bool(np.array_equal(gpu.data, cpu.data)))
        rows.append(row)
        print(row, flush=True)
        del eager, graph
    for label, n, H in (("planes 4096 x 4096", 4096, H4), ("planes 12288 x 4096", 12288, H4)):
        W = torch.randn(n, 4096, generator=g, device=dev) * 0.02
        fit = lambda: daq_quantize(W, H, QuantConfig(), planes=np.full(32, 2, np.uint8), name="w")  # noqa: E731
        (eager, te), (graph, tg) = _timed(fit, False), _timed(fit, True)
        same = _same(eager[0], graph[0]) and torch.equal(eager[1], graph[1])
        rows.append({"case": label, "eager_s": te, "graphs_s": tg, "identical": same})
        print(rows[-1], flush=True)
    rows.append({"device": torch.cuda.get_device_name(), "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30})
    a.out.write_text(json.dumps(rows, indent=1))
    print(rows[-1])


if __name__ == "__main__":
    main()
