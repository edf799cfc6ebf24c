"""ggml weight grids: our bytes decode (gguf-py, and ggml itself) to exactly the weights the driver chose,
our k-quant fits beat llama.cpp's own encoder at its own objective, the libggml path round-trips, and
the stored tensor, packers and fallback rule behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats import ggml_tensor as gt
from formats.errors import QdllmError
from formats.ggml_tensor import GGMLTensor
from qdllm_export.grids import GridConfig, grid_quantize
from qdllm_export.grids import libggml
from qdllm_export.grids.ggml import SPECS
from qdllm_export.grids.registry import GGML_GRIDS, fallback_type, grid_for
from tests.grid_fixtures import correlated_hessian, hard_rows

needs_lib = pytest.mark.skipif(not libggml.available(), reason="llama-cpp-python (libggml) is not installed")
SCALAR = tuple(SPECS)
KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: torch's intra-op threads only add synchronisation (10-30x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _exact(res) -> None:
    dq = res.stored.dequantize()
    assert dq.dtype == np.float32 and dq.shape == tuple(res.w_hat.shape)
    assert np.array_equal(dq, res.w_hat.numpy())
    if libggml.available() and res.stored.ggml_type != "F16":
        assert np.array_equal(libggml.to_float(res.stored.data, res.stored.ggml_type, dq.shape), dq)


@pytest.mark.parametrize("name", SCALAR)
def test_scalar_grid_bytes_decode_to_the_chosen_weights(name):
    """Every rounding mode, both widths, the special rows: gguf-py (and ggml) decode our bytes to w_hat bit for bit."""
    for n_in, modes in ((256, ("rtn", "importance", "gptq")), (768, ("gptq",))):
        W, H = hard_rows(n_in), correlated_hessian(n_in)
        for mode in modes:
            res = grid_quantize(W, H, GGML_GRIDS[name](), GridConfig(rounding=mode), name=f"blk.0.{name}")
            _exact(res)
            assert res.stored.ggml_type == SPECS[name].ggml_type
            assert res.stored.bits_per_weight() == GGML_GRIDS[name]().bits_per_weight(n_in)
            assert not res.w_hat[1].any()  # an all-zero row stays zero
            assert torch.isfinite(res.w_hat).all()


@pytest.mark.parametrize("name", SCALAR)
def test_random_importance_and_no_refit_stay_exact(name):
    g = torch.Generator().manual_seed(3)
    W = hard_rows(256, seed=2)
    H = torch.diag(torch.rand(256, generator=g) ** 4 * 10)  # importance over four orders of magnitude
    H[7, 7] = 0.0
    for refit in (True, False):
        _exact(grid_quantize(W, H, GGML_GRIDS[name](), GridConfig(rounding="gptq", refit=refit)))


def _weighted_errors(name: str, imp: np.ndarray | None) -> tuple[float, float]:
    rng = np.random.default_rng(11)
    W = (rng.standard_t(5, (64, 512)) * rng.uniform(0.3, 3.0, (64, 1))).astype(np.float32)
    w = np.ones(512, np.float32) if imp is None else imp
    H = None if imp is None else torch.diag(torch.from_numpy(imp))
    ours = grid_quantize(torch.from_numpy(W), H, GGML_GRIDS[name](), GridConfig(rounding="rtn" if imp is None else "importance"))
    theirs = libggml.to_float(libggml.quantize_rows(W, SPECS[name].ggml_type, imp), SPECS[name].ggml_type, W.shape)
    return float((w * (W - ours.w_hat.numpy()) ** 2).sum()), float((w * (W - theirs) ** 2).sum())


@needs_lib
@pytest.mark.parametrize("name", KQUANTS + ("q8_0", "q4_0", "q5_0", "q5_1", "iq4_nl"))
def test_our_fit_beats_llama_cpp_encoder(name):
    """Weighted error sum_j imp_j (w - w_hat)^2 below llama.cpp's quantizer given the same importance as
    its imatrix (and, without data, the plain squared error below its no-imatrix path)."""
    imp = np.random.default_rng(5).gamma(0.7, 1.0, 512).astype(np.float32)
    imp /= imp.mean()
    for im in (imp, None):
        ours, theirs = _weighted_errors(name, im)
        assert ours <= 0.995 * theirs, (name, im is None, ours / theirs)


@needs_lib
@pytest.mark.parametrize("name", ("ggml-iq2_xxs", "ggml-iq2_xs", "ggml-iq2_s", "ggml-iq3_s", "ggml-q2_k", "ggml-q4_k", "ggml-q8_0"))
def test_libggml_grid_round_trips(name):
    """ggml's encoder as a grid: the bytes decode (gguf-py and ggml) to w_hat; the d refit only lowers the
    weighted error; re-encoding the decoded weights is stable in value for the k-quants."""
    W, H = hard_rows(512), correlated_hessian(512)
    res = {refit: grid_quantize(W, H, GGML_GRIDS[name](), GridConfig(rounding="importance", refit=refit)) for refit in (False, True)}
    for r in res.values():
        _exact(r)
    imp = torch.diag(H) / torch.diag(H).mean()
    err = {k: float((imp * (W - r.w_hat) ** 2).sum()) for k, r in res.items()}
    assert err[True] <= err[False] * (1 + 1e-6)
    _exact(grid_quantize(W, H, GGML_GRIDS[name](), GridConfig(rounding="gptq")))


def test_fallback_follows_llama_quantize():
    assert fallback_type("q2_k", 4096) == "q2_k"
    assert [fallback_type(t, 96) for t in ("q2_k", "q3_k", "iq2_xs", "q4_k", "q5_k", "q6_k", "q8_0")] == \
        ["iq4_nl", "iq4_nl", "iq4_nl", "q5_0", "q5_1", "q8_0", "q8_0"]
    assert fallback_type("ggml-q4_k", 96) == "ggml-q5_0"
    assert fallback_type("q6_k", 100) == "f16"
    with pytest.raises(QdllmError, match="unknown ggml type"):
        fallback_type("q7_k", 256)


def test_f16_fallback_grid_is_exact():
    W = hard_rows(100)
    res = grid_quantize(W, correlated_hessian(100), grid_for("q4_k", 100), GridConfig())
    assert res.stored.ggml_type == "F16" and res.stored.bits_per_weight() == 16.0
    assert np.array_equal(res.stored.dequantize(), res.w_hat.numpy())


def test_ggml_tensor_contract():
    res = grid_quantize(hard_rows(256), None, grid_for("q3_k", 256), GridConfig(rounding="rtn"), name="blk.1.ffn_up.weight")
    t = res.stored
    back = GGMLTensor.from_arrays(t.shape, t.ggml_type, t.arrays(), name=t.name)
    assert np.array_equal(back.dequantize(), t.dequantize()) and back.stored_bits() == t.stored_bits() == 12 * 110 * 8
    perm = np.random.default_rng(0).permutation(12)
    assert np.array_equal(t.permute_rows(perm).dequantize(), t.dequantize()[perm])
    with pytest.raises(QdllmError, match="blk.1.ffn_up.weight"):
        GGMLTensor((12, 256), "Q3_K", t.data[:, :-1], name="blk.1.ffn_up.weight")
    with pytest.raises(QdllmError, match="multiple"):
        GGMLTensor((12, 250), "Q3_K", t.data, name="x")
    with pytest.raises(QdllmError, match="unknown ggml type"):
        GGMLTensor((12, 256), "Q9_K", t.data, name="x")


def test_packers_refuse_bad_fields():
    with pytest.raises(QdllmError, match="Q2_K codes"):
        gt.pack_q2_k(np.full(256, 4), np.zeros(16), np.zeros(16), np.float32(1), np.float32(0))
    with pytest.raises(QdllmError, match="not exact fp16"):
        gt.pack_q8_0(np.zeros(32), np.float32(0.1))
    with pytest.raises(QdllmError, match="Q3_K scales"):
        gt.pack_q3_k(np.zeros(256), np.full(16, 32), np.float32(1))


class _ColumnByColumn:
    """A grid without ``round_plain``: the driver rounds it unit by unit, as it did before that method existed."""

    def __init__(self, grid):
        self.grid, self.name, self.block, self.unit = grid, grid.name, grid.block, grid.unit

    def __getattr__(self, attr):
        if attr == "round_plain":
            raise AttributeError(attr)
        return getattr(self.grid, attr)


@pytest.mark.parametrize("name", ("q2_k", "q3_k", "q4_k", "q6_k", "q8_0", "iq4_nl", "iq2_xs", "int4"))
@pytest.mark.parametrize("rounding", ("rtn", "importance"))
def test_plain_rounding_at_once_equals_column_by_column(name, rounding):
    """Issue 15 (RTN onto stock grids was slow): without compensation the driver rounds every column of a block at
    once (``round_plain``); the stored bytes are exactly those of rounding unit by unit."""
    from qdllm_export.grids.nbits import NBitsGrid

    if name == "iq2_xs" and not libggml.available():
        pytest.skip("llama-cpp-python (libggml) is not installed")
    make = (lambda: NBitsGrid(4, 32)) if name == "int4" else GGML_GRIDS[name]
    W = hard_rows(512, 4, rows=24)
    H = None if rounding == "rtn" else correlated_hessian(512, 5)
    cfg = GridConfig(rounding=rounding)
    fast, slow = grid_quantize(W, H, make(), cfg), grid_quantize(W, H, _ColumnByColumn(make()), cfg)
    assert hasattr(make(), "round_plain")
    a, b = fast.stored.arrays(), slow.stored.arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert torch.equal(fast.w_hat, slow.w_hat)


def test_fit_results_do_not_depend_on_the_thread_count(monkeypatch):
    """The grid fits run on the cores other processes leave free (``grids.threads``): allowed because their bytes
    are the same on 1 and 2 threads, for every rounding."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keeps fit_threads from changing the count under test
    W, H = hard_rows(512, 6, rows=24), correlated_hessian(512, 7)
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        runs.append([grid_quantize(W, None if r == "rtn" else H, grid_for(t, 512), GridConfig(rounding=r)).stored.data
                     for t in ("q2_k", "q4_k", "iq4_nl") for r in ("rtn", "importance", "gptq")])
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_fits_take_the_cores_other_processes_leave(monkeypatch):
    from qdllm_export.grids import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    torch.set_num_threads(4)
    for busy, want in ((12.0, 1), (2.0, 2), (0.0, 4)):
        monkeypatch.setattr(threads, "_busy", {"others": busy})
        monkeypatch.setattr(threads, "_runnable_others", lambda busy=busy: busy)
        assert threads.fit_threads() == want
        seen = []
        threads.on_free_cores(lambda W: seen.append(torch.get_num_threads()))(torch.zeros(1))
        assert seen == [want] and torch.get_num_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice is kept
    assert threads.fit_threads() == 4
