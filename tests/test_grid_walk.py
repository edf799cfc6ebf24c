"""The GPTQ walk of the scalar grids (``grids.base._gptq_walk``: each position's parameters gathered once, the
walk a pure function that ``quant.graphs`` replays as a CUDA graph) gives bit for bit what the column-by-column
``grid.round`` loop gives: the same values, codes, states and bytes, with and without act-order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdllm_export.grids import base
from qdllm_export.quant import graphs
from qdllm_export.grids.base import GridConfig, grid_quantize
from qdllm_export.grids.nbits import NBitsGrid
from qdllm_export.grids.registry import grid_for

GRIDS = ["q2_k", "q3_k", "q6_k", "q4_0", "q5_1", "iq4_nl", "int2", "int4"]


def _grid(name: str, n_in: int):
    return NBitsGrid(int(name[3:]), 128) if name.startswith("int") else grid_for(name, n_in)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 512, generator=g) * 0.02
    X = torch.randn(768, 512, generator=g) * torch.rand(512, generator=g)
    return W, X.T @ X / X.shape[0]


class _Loop:
    """The grid without ``column_params``: the driver falls back to its column-by-column loop."""

    def __init__(self, grid):
        self._g = grid

    def __getattr__(self, k):
        if k in ("column_params", "round_column", "record_codes"):
            raise AttributeError(k)
        return getattr(self._g, k)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("name", GRIDS)
def test_walk_equals_column_loop(name, act_order):
    W, H = _data()
    grid = _grid(name, W.shape[1])
    cfg = GridConfig(act_order=act_order)
    walk = grid_quantize(W, H, grid, cfg, pack=True)
    loop = grid_quantize(W, H, _Loop(grid), cfg, pack=True)
    assert torch.equal(walk.w_hat, loop.w_hat)
    for a, b in zip(walk.stored.arrays().values(), loop.stored.arrays().values()):
        assert np.array_equal(a, b)


def test_graphs_run_eagerly_off_the_gpu():
    x = torch.arange(6.0).view(2, 3)
    (y,) = graphs.run(("t",), lambda a: (a * 2,), [x])
    assert torch.equal(y, x * 2) and not graphs.enabled(x)
    assert base._gptq_walk is not None


def test_q2_k_torch_packing_equals_numpy():
    from formats import ggml_tensor as gt
    from qdllm_export.grids.ggml import _pack_q2_k_torch

    W, H = _data(3)
    grid = grid_for("q2_k", W.shape[1])
    res = grid_quantize(W, H, grid, GridConfig(), pack=False)
    ref = grid.pack(res.states, tuple(W.shape), "w")  # NumPy's packer on the CPU
    blocks = _pack_q2_k_torch(res.states).numpy()
    assert np.array_equal(gt.from_blocks(blocks, "Q2_K").data, ref.data)
