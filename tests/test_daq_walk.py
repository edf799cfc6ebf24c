"""DAQ's act-order and pure-function refactors are exact: columns put back in place on the device give the bytes
``permute_block_columns`` gives the whole tensor, and the block's steps as pure functions (``quant.graphs``
replays them on a GPU) give what the step-by-step code gives."""

from __future__ import annotations

import numpy as np
import torch

from qdllm_export.quant import QuantConfig
from qdllm_export.quant import daq


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 384, generator=g) * 0.02
    X = torch.randn(1024, 384, generator=g) * torch.rand(384, generator=g)
    return W, X.T @ X / X.shape[0]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))


def test_act_order_on_device_equals_whole_tensor_permutation():
    W, H = _data()
    cfg = QuantConfig(iters=3)
    qt, w_hat, planes = daq.daq_quantize(W, H, cfg)
    perm = daq.block_order(H, cfg.group_size)
    inv = torch.argsort(perm)
    qt0, w0, _ = daq._daq_quantize(W[:, perm], H[perm][:, perm], cfg, planes)
    assert _same(qt, daq.permute_block_columns(qt0, inv.numpy()))
    assert torch.equal(w_hat, w0[:, inv])
    assert np.array_equal(qt.dequantize(), w_hat.numpy())


def test_block_as_pure_functions_equals_step_by_step():
    W, H = _data(1)
    Wb, Ubb = W[:, :128], torch.linalg.cholesky(torch.linalg.inv(H[:128, :128] + 1e-3 * torch.eye(128)), upper=True)
    A = torch.rand(48, 128, generator=torch.Generator().manual_seed(2)) + 0.5
    for K in (1, 2, 3):
        fast = daq.daq_block(Wb, A, K, iters=4, Ubb=Ubb)
        slow = daq.daq_block(Wb, A, K, iters=4, Ubb=Ubb, track=True)  # track: the step-by-step code
        assert torch.equal(fast.rs, slow.rs) and torch.equal(fast.cs, slow.cs) and torch.equal(fast.S, slow.S)
