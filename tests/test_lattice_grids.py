"""Lattice grids with GPTQ inside the block (``qdllm_export.grids.lattice``): our bytes decode (gguf-py and
ggml) to exactly the weights the driver chose, the nearest-point search is exact (parity included), the fit
beats ggml's encoder in the same driver, and the registry picks it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats import ggml_tensor as gt
from formats.errors import QdllmError
from qdllm_export.grids import GridConfig, grid_quantize, libggml
from qdllm_export.grids.registry import GGML_GRIDS, fallback_type, grid_for
from qdllm_export.grids.lattice import SPECS, LatticeGrid, codebook
from qdllm_export.grids.libggml import LibGGMLGrid
from tests.grid_fixtures import correlated_hessian, hard_rows

pytestmark = pytest.mark.skipif(not libggml.available(), reason="llama-cpp-python (libggml) is not installed")
TYPES = tuple(SPECS)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _lattice_rows(n_in: int, seed: int = 0) -> torch.Tensor:
    return hard_rows(n_in, seed, rows=10)


def _lattice_hessian(n_in: int, seed: int = 1) -> torch.Tensor:
    return correlated_hessian(n_in, seed, tokens_per_column=2)


@pytest.mark.parametrize("name", TYPES)
def test_bytes_decode_to_the_returned_weights(name):
    """Both widths, every mode, refit on and off: gguf-py and ggml decode our bytes to w_hat bit for bit
    (which also proves the sign parity of iq2_xxs / iq2_xs: a wrong 8th bit would decode another sign)."""
    for n_in, runs in ((256, (("rtn", True), ("importance", True), ("gptq", True), ("gptq", False))),
                       (768, (("gptq", True),))):
        W, H = _lattice_rows(n_in), _lattice_hessian(n_in)
        for mode, refit in runs:
            res = grid_quantize(W, H, LatticeGrid(name), GridConfig(rounding=mode, refit=refit), name=f"blk.0.{name}")
            dq = res.stored.dequantize()
            assert res.stored.ggml_type == SPECS[name].ggml_type and dq.dtype == np.float32
            assert np.array_equal(dq.view(np.uint32), res.w_hat.numpy().view(np.uint32)), (name, n_in, mode, refit)
            assert np.array_equal(libggml.to_float(res.stored.data, res.stored.ggml_type, dq.shape), dq)
            assert res.stored.bits_per_weight() == LatticeGrid(name).bits_per_weight(n_in)
            assert not res.w_hat[1].any() and torch.isfinite(res.w_hat).all()
            if mode != "gptq":  # all-negative / all-positive groups hold an even count of negatives: no flip
                assert (res.w_hat[3] <= 0).all() and (res.w_hat[2] >= 0).all()


@pytest.mark.parametrize("name", TYPES)
def test_nearest_is_the_exact_weighted_nearest_point(name):
    """``nearest`` against brute force over every codebook entry x every allowed sign pattern."""
    grid, sp = LatticeGrid(name), SPECS[name]
    g = torch.Generator().manual_seed(7)
    n, m = 24, 2
    x = torch.randn(n, m, sp.dim, generator=g) * torch.rand(n, 1, 1, generator=g) * 3
    x[0] = 0.0
    x[1] = -x[1].abs()  # all negative: even or odd count by dim
    wt = torch.rand(m, sp.dim, generator=g) ** 2
    wt[0, 1] = 0.0
    db = torch.rand(n, m, generator=g) * 0.2
    idx, neg = grid.nearest(x, wt, db)
    G = torch.from_numpy(codebook(sp.ggml_type))
    bits = (torch.arange(1 << sp.dim)[:, None] >> torch.arange(sp.dim)) & 1  # [P, dim]
    if sp.parity:
        bits = bits[bits.sum(1) % 2 == 0]
    S = 1.0 - 2.0 * bits.float()
    pts = (G[:, None, :] * S[None]).reshape(-1, sp.dim)  # every allowed point
    best = (wt[:, None] * (x[..., None, :] - db[..., None, None] * pts).square()).sum(-1).amin(-1)
    ours = (wt * (x - db[..., None] * G[idx] * (1.0 - 2.0 * neg.float())).square()).sum(-1)
    assert torch.allclose(ours, best, rtol=1e-5, atol=1e-7)
    if sp.parity:
        assert (neg.sum(-1) % 2 == 0).all()


@pytest.mark.parametrize("name", TYPES)
def test_requant_is_the_weighted_nearest_among_the_fitted_points_neighbours(name):
    """Block-output tuning's rounding (``requant``) against brute force over the ``NEIGHBOURS`` nearest codebook
    entries of each vector's fitted point x every allowed sign pattern; at the fit's own targets it keeps the fit."""
    from qdllm_export.grids.lattice import NEIGHBOURS

    grid, sp = LatticeGrid(name), SPECS[name]
    W = _lattice_rows(grid.block)
    n, m = W.shape[0], grid.block // sp.dim
    st = grid.init(W, None)
    fitted = grid.values(st.d, st.sc, st.idx, st.neg)
    torch.testing.assert_close(grid.requant(st, fitted), fitted, rtol=0, atol=0)  # already on the grid: stays
    home = st.idx.clone()
    X = W + 0.3 * W.std() * torch.randn(W.shape, generator=torch.Generator().manual_seed(5))
    Y = grid.requant(st, X).reshape(n, m, sp.dim)
    G = torch.from_numpy(codebook(sp.ggml_type))
    nb = torch.cdist(G.double(), G.double()).topk(NEIGHBOURS, dim=1, largest=False).indices  # [E, K]
    bits = (torch.arange(1 << sp.dim)[:, None] >> torch.arange(sp.dim)) & 1
    if sp.parity:
        bits = bits[bits.sum(1) % 2 == 0]
    S = 1.0 - 2.0 * bits.float()  # [P, dim]
    db = grid.scale(st.d, st.sc).repeat_interleave(sp.sub // sp.dim, dim=1)  # [n, m]
    x = X.reshape(n, m, sp.dim)
    pts = G[nb[home]][:, :, :, None, :] * S  # [n, m, K, P, dim]
    best = (x[:, :, None, None, :] - db[..., None, None, None] * pts).square().sum(-1).flatten(2).amin(-1)
    ours = (x - Y).square().sum(-1)
    assert torch.allclose(ours, best, rtol=1e-5, atol=1e-7)
    grid.requant(st, X, record=True)  # commit: the state's points are what tuning saw
    torch.testing.assert_close(grid.values(st.d, st.sc, st.idx, st.neg).reshape(n, m, sp.dim), Y, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in TYPES if SPECS[n].parity])
def test_parity_pick_prices_few_candidates_and_matches_pricing_all(name):
    """The sign-parity choice prices only the cheapest candidates (falling back to all where one beyond them could
    win): the same points and flipped elements, bit for bit, as pricing every candidate, whatever the cut-off."""
    from qdllm_export.grids.lattice import _parity_pick

    sp = SPECS[name]
    G = torch.from_numpy(codebook(sp.ggml_type))
    g = torch.Generator().manual_seed(3)
    k = 4000
    a = torch.rand(k, sp.dim, generator=g) * torch.rand(k, 1, generator=g)
    b = torch.rand(k, 1, generator=g) * 0.05
    cost = b * (b * G.square().sum(1)) - 2.0 * b * (a @ G.T)
    cost[:50] = cost[:50].round(decimals=2)  # ties between candidates
    full = _parity_pick(a, b, cost, G, priced=G.shape[0])
    flip, which = (a[:, None, :] * G).min(-1)
    brute = (cost + 4.0 * b * flip).argmin(-1)
    assert torch.equal(full[0], brute) and torch.equal(full[1], which.gather(-1, brute[:, None])[:, 0])
    for priced in (1, 4, 16):
        pick, flipped = _parity_pick(a, b, cost, G, priced=priced)
        assert torch.equal(pick, full[0]) and torch.equal(flipped, full[1]), priced


@pytest.mark.parametrize("name", ("iq2_xs", "iq3_s"))
def test_gptq_inside_the_block_beats_ggml_in_the_driver(name):
    """Output error tr(D H D^T) of our fit below ggml's encoder in the same driver (gptq, refit), on a
    layer whose rows are one block: there the ctypes grid compensates nothing."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 256, generator=g) * (0.5 + torch.rand(64, 1, generator=g))
    H = _lattice_hessian(256)

    def err(grid) -> float:
        D = W - grid_quantize(W, H, grid, GridConfig(rounding="gptq")).w_hat
        return float(torch.trace(D @ H @ D.T))

    assert err(LatticeGrid(name)) < 0.95 * err(LibGGMLGrid(name.upper(), f"ggml-{name}"))


def test_refit_only_lowers_the_weighted_error():
    W, H = _lattice_rows(512), _lattice_hessian(512)
    imp = torch.diag(H) / torch.diag(H).mean()
    e = {r: float((imp * (W - grid_quantize(W, H, LatticeGrid("iq2_xs"), GridConfig(rounding="importance", refit=r)).w_hat)
                   ** 2).sum()) for r in (False, True)}
    assert e[True] <= e[False] * (1 + 1e-6)


def test_registry_picks_the_lattice_grid_and_keeps_ggmls():
    assert isinstance(grid_for("iq2_xs", 512), LatticeGrid)
    assert isinstance(grid_for("ggml-iq2_xs", 512), LibGGMLGrid) and grid_for("ggml-iq2_xs", 512).name == "ggml-iq2_xs"
    assert fallback_type("ggml-iq2_xs", 96) == "ggml-iq4_nl"
    assert all(f"ggml-{t}" in GGML_GRIDS for t in TYPES)


def test_packer_refuses_odd_parity():
    neg = np.zeros(256, np.int64)
    neg[3] = 1
    with pytest.raises(QdllmError, match="odd number"):
        gt.pack_iq2_xs(np.zeros(32), neg, np.zeros(16), np.float32(1))
