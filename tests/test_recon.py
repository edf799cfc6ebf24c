"""Block-output tuning (``quant.recon``) and equalization (``quant.equalize``).

The tuned codes must stay exactly what the grids' encoders store: a committed tensor decodes (gguf-py for the
ggml types, the MatMulNBits formula, the planes' own fields) bit for bit to the values the tuning optimised.
The tuning must lower a block's output error, and equalization must leave the float block's function alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdllm_export.grids.base import GridConfig, grid_quantize
from qdllm_export.grids.nbits import NBitsGrid
from qdllm_export.grids.registry import grid_for
from qdllm_export.quant import QuantConfig, quantize_weight
from qdllm_export.quant.recon import CHECK_WINDOWS, GridTunable, PlanesTunable, ReconConfig, reconstruct, tunable_grid

GRIDS = ["q2_k", "q3_k", "q4_k", "q6_k", "q4_0", "iq4_nl", "iq2_xs", "int2", "int4"]


def _grid(name: str, n_in: int):
    return NBitsGrid(int(name[3:]), 128) if name.startswith("int") else grid_for(name, n_in)


def _data(n_out: int = 16, n_in: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g) * 0.02
    X = torch.randn(4 * n_in, n_in, generator=g) * torch.rand(n_in, generator=g)
    return W, X.T @ X / X.shape[0]


def _moved(t, seed: int = 1) -> torch.Tensor:
    """A point away from the fit: every code may move by up to one step either way."""
    g = torch.Generator().manual_seed(seed)
    return t.start + (torch.rand(t.start.shape, generator=g) * 2 - 1) * t.bound * t.step


@pytest.mark.parametrize("name", GRIDS)
def test_committed_grid_codes_decode_to_the_tuned_values(name):
    W, H = _data()
    grid = _grid(name, W.shape[1])
    assert tunable_grid(grid)
    res = grid_quantize(W, H, grid, GridConfig(), name=name, pack=False, keep_targets=True)
    t = GridTunable(grid, res.states, res.targets, name)
    X = _moved(t)
    want = t.nearest(X).numpy()
    stored = t.commit(X)
    got = stored.dequantize()
    np.testing.assert_array_equal(got, want)
    assert (got != res.w_hat.numpy()).mean() > 0.05  # codes moved
    np.testing.assert_array_equal(t.nearest(torch.from_numpy(got)).numpy(), got)  # a stored value is its own nearest


@pytest.mark.parametrize("name", GRIDS)
def test_grid_tunable_starts_at_the_fit(name):
    """``V = 0`` reproduces the per-layer fit (its codes are the nearest to the GPTQ targets). The lattice types
    refit their scales after the walk, which moves ~1% of the nearest points."""
    W, H = _data(seed=2)
    grid = _grid(name, W.shape[1])
    res = grid_quantize(W, H, grid, GridConfig(), name=name, pack=False, keep_targets=True)
    t = GridTunable(grid, res.states, res.targets, name)
    same = (t.nearest(t.start) == res.w_hat).float().mean()
    assert same > (0.98 if name.startswith("iq2") else 0.999), f"{name}: {1 - same:.2%} of the codes differ from the fit at V = 0"


def test_committed_planes_decode_to_the_tuned_values():
    W, H = _data(n_in=256)
    res = quantize_weight(W, H, QuantConfig(bits=2.0), name="w")
    t = PlanesTunable(res.qt, res.w_hat, "w")
    np.testing.assert_allclose(t.nearest(t.start).numpy(), res.w_hat.numpy(), rtol=0, atol=1e-6)
    X = _moved(t)
    want = t.nearest(X).numpy()
    got = t.commit(X).dequantize()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (np.abs(got - res.w_hat.numpy()) > 1e-6).mean() > 0.05  # signs did flip
    for f in ("row_scale", "col_scale", "planes"):  # only the signs move
        np.testing.assert_array_equal(getattr(t.commit(X), f), getattr(res.qt, f))


@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q6_k", "int2", "int4", "iq2_xs"])
def test_stacked_rounding_is_each_members_own(name):
    """Tuning rounds the linears of one grid and width (a mixture's experts, a block's q/k/v/o) as one matrix;
    the values are each member's own ``nearest``, bit for bit (the lattice types stay a stack of one)."""
    from qdllm_export.quant.recon import _stacks

    tun = {}
    for k, n_out in enumerate((16, 8, 24)):
        W, H = _data(n_out=n_out, seed=10 + k)
        grid = _grid(name, W.shape[1])
        res = grid_quantize(W, H, grid, GridConfig(), name=name, pack=False, keep_targets=True)
        tun[f"r{k}"] = GridTunable(grid, res.states, res.targets, f"r{k}")
    moved = {r: _moved(t, seed=5) for r, t in tun.items()}
    want = {r: t.nearest(moved[r]) for r, t in tun.items()}
    stacks = _stacks(tun)
    assert len(stacks) == (3 if name.startswith("iq") else 1)
    for st in stacks:
        got = st.split(st.nearest(torch.cat([moved[r] for r in st.roles])))
        for r, v in got.items():
            np.testing.assert_array_equal(v.numpy(), want[r].numpy())


def _toy_block(seed: int = 0):
    """y = x + W2 silu(W1 x): two linears whose errors meet at the output; inputs [N, L, d]."""
    g = torch.Generator().manual_seed(seed)
    d, f = 256, 512
    W1, W2 = torch.randn(f, d, generator=g) / d**0.5, torch.randn(d, f, generator=g) / f**0.5
    x = torch.randn(32, 8, d, generator=g) * (0.5 + torch.rand(d, generator=g))

    def run(xb: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return xb + torch.nn.functional.silu(xb @ w["up"].T) @ w["down"].T

    return run, {"up": W1, "down": W2}, x


def _fits(name: str, Ws: dict[str, torch.Tensor], run, x: torch.Tensor):
    """Each linear's GPTQ fit on its own input statistics, as the pipeline makes them."""
    tun, fitted = {}, {}
    xs = {"up": x.reshape(-1, x.shape[-1]),
          "down": torch.nn.functional.silu(x @ Ws["up"].T).reshape(-1, Ws["up"].shape[0])}
    for r, W in Ws.items():
        H = xs[r].T @ xs[r] / xs[r].shape[0]
        grid = _grid(name, W.shape[1])
        res = grid_quantize(W, H, grid, GridConfig(), name=r, pack=False, keep_targets=True)
        tun[r], fitted[r] = GridTunable(grid, res.states, res.targets, r), res.w_hat
    return tun, fitted


@pytest.mark.parametrize("name", ["q2_k", "int2"])
def test_reconstruction_lowers_the_block_output_error(name):
    run, Ws, x = _toy_block()
    y = run(x, Ws)
    tun, fitted = _fits(name, Ws, run, x)
    points, rep = reconstruct(run, tun, fitted, x, y, ReconConfig(iters=60, batch=8))
    assert rep.kept and points is not None
    assert rep.loss_after < 0.9 * rep.loss_before, (rep.loss_before, rep.loss_after)
    committed = {r: torch.from_numpy(tun[r].commit(points[r]).dequantize()) for r in tun}
    n = CHECK_WINDOWS  # the windows the keep-or-drop check scores
    loss = float((run(x[:n], committed) - y[:n]).square().mean())
    assert loss == pytest.approx(rep.loss_after, rel=1e-4)  # the bytes hold exactly what was tuned


def test_reconstruction_keeps_the_fit_when_tuning_does_not_help():
    run, Ws, x = _toy_block(seed=3)
    y = run(x, Ws)
    tun, fitted = _fits("q6_k", Ws, run, x)
    points, rep = reconstruct(run, tun, fitted, x, y, ReconConfig(iters=0))
    assert points is None and not rep.kept and rep.loss_after == rep.loss_before


def test_recon_config_checks():
    from formats.errors import QdllmError

    with pytest.raises(QdllmError, match="--tune-iters"):
        ReconConfig(iters=-1)
    with pytest.raises(QdllmError, match="target"):
        ReconConfig(target="nope")
    assert ReconConfig(iters=50).step_size(50) == pytest.approx(1 / 50)
    assert not ReconConfig(iters=0).on and ReconConfig().on
    with pytest.raises(QdllmError, match="at least 1 window"):
        ReconConfig(batch=0)


# ------------------------------------------------------------------------------------------ equalization
@pytest.mark.parametrize("family", ["llada", "dream", "llada-moe"])
def test_equalization_preserves_the_float_block(family):
    """Every site's scales folded (a mixture: every expert's gate / up with the router, each expert's down into its
    up): the float block's outputs, and a mixture's routing, unchanged."""
    from qdllm_export.models import family_module
    from qdllm_export.models.layers import rope_tables
    from qdllm_export.quant.equalize import ALPHAS, equalize_block, folded_floats, input_stats, sites
    from tests.tiny import moe_hparams, tiny_hparams

    hp = moe_hparams() if family == "llada-moe" else tiny_hparams(family)
    torch.manual_seed(0)
    block = family_module(hp).Block(hp).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.06 * torch.randn_like(p))
    x = torch.randn(4, 16, hp.d_model) * (0.2 + 3 * torch.rand(hp.d_model))
    cos, sin = rope_tables(16, hp.head_dim, hp.rope_theta, torch.device("cpu"))
    with torch.no_grad():
        before = block(x, cos, sin)
    counts = getattr(getattr(block, "mlp", None), "last_counts", None)
    stats = input_stats(block, lambda: block(x, cos, sin))
    calls: dict[str, int] = {}

    def fit(role: str, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """Error ``(n - k) * 1%`` of W on the k-th candidate: every site strictly prefers its last alpha."""
        k = calls[role] = calls.get(role, -1) + 1
        return W * (1.0 + 0.01 * (len(ALPHAS) - k))

    chosen = equalize_block(block, stats, fit)
    want = {"attn_norm", "ffn_norm", "attn_v"} | ({f"ffn_up_exps.{x}" for x in range(hp.n_expert)} if counts is not None
                                                  else {"ffn_up"})
    assert set(chosen) == want == set(sites(block))
    assert set(chosen.values()) == {ALPHAS[-1]}
    assert set(folded_floats(block, chosen)) == {"attn_norm", "ffn_norm"} | ({"ffn_gate_inp"} if counts is not None else set())
    with torch.no_grad():
        after = block(x, cos, sin)
    rel = float((after - before).norm() / before.norm())
    assert rel < 1e-5, rel
    if counts is not None:
        assert torch.equal(block.mlp.last_counts, counts)
