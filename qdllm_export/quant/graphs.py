"""Replaying the sequential column loops of the fits as CUDA graphs.

A GPTQ walk over the columns of one block (``grids.base``'s scalar grids, DAQ's sign rounding) is a few
small kernels per column: on a GPU the walk is bound by launching them (about 100 us a column on an H100 for
a 12288-row matrix), not by their arithmetic. Every block of a linear runs the same kernels on tensors of
the same shapes, so the walk is captured once per shape as a CUDA graph and replayed for every block: the
same kernels on the same values, so the results are bit for bit those of the eager loop (only the launches
change). Off the GPU, or with ``QDLLM_CUDA_GRAPHS=0``, the function simply runs.

``run(key, fn, inputs)``: ``fn(*inputs) -> tuple of tensors`` must be a pure function of its tensor inputs
(shapes and dtypes fixed per ``key``, no host synchronisation inside); the outputs returned are fresh copies.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Sequence

import torch

MAX_GRAPHS = 48  # captured graphs kept (each holds its own memory pool: a few copies of one block's tensors)
_graphs: "OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]]" = OrderedDict()


def enabled(x: torch.Tensor) -> bool:
    """Whether loops on ``x``'s device are replayed as graphs (CUDA, unless ``QDLLM_CUDA_GRAPHS=0``)."""
    return x.is_cuda and os.environ.get("QDLLM_CUDA_GRAPHS", "1") != "0"


def run(key: tuple, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``fn(*inputs)``, replayed from a CUDA graph captured on the first call with this ``key`` and these
    input shapes/dtypes (eagerly where graphs are off)."""
    if not inputs or not enabled(inputs[0]):
        return fn(*inputs)
    full = (key, tuple((tuple(x.shape), x.dtype, x.device) for x in inputs))
    entry = _graphs.get(full)
    if entry is None:
        entry = _capture(fn, inputs)
        _graphs[full] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(full)
    graph, static, out = entry
    for s, x in zip(static, inputs):
        s.copy_(x)
    graph.replay()
    return tuple(o.clone() for o in out)


def _capture(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor]):
    """Warm ``fn`` up on a side stream (cuBLAS handles, workspaces), then capture it over static copies."""
    static = [x.detach().clone().contiguous() for x in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*[s.clone() for s in static])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, static, tuple(out)


def clear() -> None:
    """Drop every captured graph (and its memory)."""
    _graphs.clear()
