"""ggml's lattice types (i-quants) with GPTQ inside the block: one lattice group at a time.

``iq2_xxs``, ``iq2_xs``, ``iq2_s`` and ``iq3_s`` store, per row and 256-column block, an fp16 ``d``, a
4-bit scale ``s_j`` per sub-block and, per group of ``dim`` columns, an index into a fixed codebook
``G [E, dim]`` (E8-lattice points with positive coordinates, gguf-py's ``grid`` tables) plus one sign bit
per column. Element ``i`` of sub-block ``j`` decodes as (float32, ggml's and gguf-py's order)::

    value = (d * mult(s_j)) * G[idx, i] * sign_i      mult(s) = (0.5 + s) * 0.25  (iq2_*)
                                                      mult(s) = 1 + 2 s          (iq3_s)

``iq2_xxs`` / ``iq2_xs`` store 7 sign bits per group of 8; the 8th is their parity (ggml's ``ksigns``
table): every group holds an even number of negatives. ``iq2_s`` / ``iq3_s`` store all 8.

``LatticeGrid`` is a driver grid with ``unit = 8`` (one group of 8 columns; two codebook vectors for
``iq3_s``), so the driver's OBS update moves the block's later columns after every group:

* ``init``: ``d`` and the sub-scales from ggml's own encoding of the block (``libggml.quantize_rows`` with
  the importance as imatrix), then ``init_steps`` rounds of coordinate descent on the block (nearest points
  under the scales, then the least-squares refit below);
* ``round``: per row, the exact nearest codebook point x signs under the importance weights, with the
  scales fixed, respecting the sign parity (the cheapest single flip when the signs of the targets are odd);
* ``refit``: ``d`` per row, then each 4-bit sub-scale (floor and ceil of its least-squares value), by
  weighted least squares with the points fixed; each kept per row / sub-block only where the weighted
  error on the targets drops; nothing is re-rounded;
* ``requant`` (block-output tuning, ``quant.recon``): per group, the nearest of the ``NEIGHBOURS`` codebook points
  nearest its fitted point, scales fixed (the tuned codes move locally);
* ``pack``: the exact ggml bytes (``formats.ggml_tensor.pack_iq*``).

All torch, device-agnostic, vectorised over rows (candidate tensors ``[n, E, dim]`` per group).

Registry (``grids.registry.OUR_LATTICE``): ``grid_for("iq2_xs", n_in)`` is this grid (it lowered llama.cpp's
ΔNLL of ``--outtype iq2_xs`` and ``auto --bpw 2.5`` on both bundled models against ggml's encoder in the
same driver, docs/benchmarks.md); ggml's encoder stays reachable as ``ggml-iq2_xs``. The other lattice
types work here too (tests, ``bench/ggml_grids.py``) but stay on ggml's encoder until measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from formats import ggml_tensor as gt
from formats.ggml_tensor import GGMLTensor
from qdllm_export.grids import libggml

CHUNK = 1 << 24  # elements of one candidate tensor [rows, groups, E, dim] (64 MB of float32)
# codebook points block-output tuning chooses among per vector: the fitted one's nearest (requant). 16 and 32 gave
# the same auto --bpw 2.5 ΔNLL on both bundled families (3 seeds, docs/benchmarks.md "recon"); 16 rounds 1.45x faster
NEIGHBOURS = 16
# elements of requant's candidate tensor [rows, groups, NEIGHBOURS, dim]: cache-sized on the CPU (a 1024 x 256 block
# 0.11 s at 1 << 24, 0.046 s at 1 << 20), a few launches per block on a GPU
LOCAL_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}
PRICED = 16  # candidates per odd-signed vector whose sign flip is priced before falling back to all (_parity_pick)


@dataclass(frozen=True)
class LatticeSpec:
    """One lattice type: ``dim`` columns per codebook vector, ``sub`` columns per 4-bit scale, ``parity``:
    the 8th sign of every group of 8 is implied (even number of negatives); ``half``: mult(s) = (0.5+s)/4
    (else 1 + 2s)."""

    name: str
    ggml_type: str
    dim: int
    sub: int
    parity: bool
    half: bool
    block: int = 256

    @property
    def n_sub(self) -> int:
        return self.block // self.sub


SPECS = {s.name: s for s in (
    LatticeSpec("iq2_xxs", "IQ2_XXS", 8, 32, True, True),
    LatticeSpec("iq2_xs", "IQ2_XS", 8, 16, True, True),
    LatticeSpec("iq2_s", "IQ2_S", 8, 16, False, True),
    LatticeSpec("iq3_s", "IQ3_S", 4, 32, False, False),
)}


def _parity_pick(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, G: torch.Tensor,
                 priced: int = PRICED) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors whose targets have an odd number of negative signs: the point ``argmin_e cost_e + 4 b flip_e``
    (``flip_e = min_i a_i G_ei``: flipping the sign of element i costs ``4 b w_i |x_i| G_ei``) and the element
    flipped, from ``a [k, dim]``, ``b [k, 1]``, ``cost [k, E]``. Only the ``priced`` cheapest candidates by cost
    are priced: flips cost >= 0, so no other candidate can win or tie where the next cheapest cost exceeds the
    best priced total; the vectors where it does not are priced in full. The same point and element (the first
    minimum, as ``argmin`` over every candidate) at a fraction of the ``[k, E, dim]`` products."""
    k, E = cost.shape
    K = min(priced, E)
    c_top, e_top = cost.topk(min(K + 1, E), dim=-1, largest=False, sorted=True)
    flip, which = (a[:, None, :] * G[e_top[:, :K]]).min(-1)  # [k, K]
    total = c_top[:, :K] + 4.0 * b * flip
    best = total.min(-1, keepdim=True).values
    pos = torch.where(total == best, e_top[:, :K], E).argmin(-1)  # the smallest candidate index among the minima
    pick, flipped = e_top.gather(-1, pos[:, None])[:, 0], which.gather(-1, pos[:, None])[:, 0]
    if K < E:
        full = (c_top[:, K] <= best[:, 0]).nonzero(as_tuple=True)[0]  # a candidate beyond the priced ones might win
        if full.numel():
            f, w = (a[full][:, None, :] * G).min(-1)  # [r, E]
            pick[full] = (cost[full] + 4.0 * b[full] * f).argmin(-1)
            flipped[full] = w.gather(-1, pick[full][:, None])[:, 0]
    return pick, flipped


@lru_cache(maxsize=None)
def codebook(ggml_type: str) -> np.ndarray:
    """gguf-py's codebook of a lattice type: float32 ``[E, dim]`` (the values its decoder multiplies)."""
    import gguf.quants as q

    cls = getattr(q, ggml_type)
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


@dataclass
class LatticeState:
    """One block of every row: ``d [n]`` (fp16 values, >= 0), ``sc [n, S]`` (integers 0..15, float32),
    ``idx [n, block / dim]`` long codebook indices, ``neg [n, block]`` bool sign bits (True = negative),
    ``wt [block]`` float32 column weights."""

    d: torch.Tensor
    sc: torch.Tensor
    idx: torch.Tensor
    neg: torch.Tensor
    wt: torch.Tensor
    db: torch.Tensor | None = None  # [n, S] d * mult(sc), for round
    home: torch.Tensor | None = None  # [n, block / dim] the fitted points, whose neighbours requant chooses among


class LatticeGrid:
    """A lattice type (``SPECS``) as a driver grid, ``unit = 8``; see the module doc."""

    unit = 8

    def __init__(self, name: str, init_steps: int = 2, refit_rounds: int = 2):
        self.spec = SPECS[name]
        self.name, self.ggml_type, self.block = name, self.spec.ggml_type, self.spec.block
        self.type_size = gt.type_info(self.ggml_type)[1]
        self.init_steps, self.refit_rounds = init_steps, refit_rounds
        self._cb: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._nb: dict[torch.device, torch.Tensor] = {}
        libggml.type_id(self.ggml_type)  # init needs ggml's encoder: fails early without llama-cpp-python

    def bits_per_weight(self, n_in: int) -> float:
        return 8.0 * self.type_size / self.block

    def table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The codebook ``G [E, dim]`` and ``G^2`` on ``device``."""
        if device not in self._cb:
            G = torch.from_numpy(codebook(self.ggml_type)).to(device)
            self._cb[device] = (G, G * G)
        return self._cb[device]

    def neighbours(self, device: torch.device) -> torch.Tensor:
        """``[E, NEIGHBOURS]`` long: each codebook point's nearest points (Euclidean, itself first)."""
        if device not in self._nb:
            G = torch.from_numpy(codebook(self.ggml_type)).to(torch.float64)
            dist = torch.cdist(G, G) + torch.diag(torch.full((G.shape[0],), -1.0, dtype=torch.float64))
            self._nb[device] = dist.topk(min(NEIGHBOURS, G.shape[0]), dim=1, largest=False, sorted=True).indices.to(device)
        return self._nb[device]

    # ------------------------------------------------------------------ stored values
    def scale(self, d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        """``d [n] * mult(sc [n, S])`` -> ``[n, S]`` float32, rounded as ggml rounds it."""
        if self.spec.half:
            return d[:, None] * (0.5 + sc) * 0.25
        return d[:, None] * (1.0 + 2.0 * sc)

    def points(self, idx: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Codebook points with signs ``[n, C]`` from ``idx [n, C / dim]`` and ``neg [n, C]``."""
        G = self.table(idx.device)[0]
        g = G[idx].reshape(neg.shape)
        return torch.where(neg, -g, g)

    def values(self, d: torch.Tensor, sc: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Stored values ``[n, block]`` float32, ``(d * mult(s)) * G * sign`` in ggml's order."""
        db = self.scale(d, sc).repeat_interleave(self.spec.sub, dim=1)
        G = self.table(idx.device)[0]
        v = db * G[idx].reshape(neg.shape)
        return torch.where(neg, -v, v)

    # ------------------------------------------------------------------ nearest point
    def nearest(self, x: torch.Tensor, wt: torch.Tensor, db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted-nearest stored point to each vector of ``x [n, m, dim]`` under per-vector scales
        ``db [n, m]`` (>= 0) and column weights ``wt [m, dim]``; returns ``idx [n, m]`` long and sign bits
        ``neg [n, m, dim]`` bool, the parity rule applied per vector (``dim`` = 8 for those types)."""
        n, m, dim = x.shape
        E = self.table(x.device)[0].shape[0]
        step = max(1, CHUNK // max(1, m * E * dim))
        parts = [self._nearest(x[r : r + step], wt, db[r : r + step]) for r in range(0, n, step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _nearest(self, x: torch.Tensor, wt: torch.Tensor, db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, G2 = self.table(x.device)
        a = wt * x.abs()  # [n, m, dim]
        b = db[..., None]  # [n, m, 1]
        # sum_i w_i (|x_i| - b G_ei)^2 without the constant: b^2 sum_i w_i G_ei^2 - 2 b sum_i w_i |x_i| G_ei,
        # as b * (b * (wt G2^T) - 2 (a G^T)) in place (2 (a G^T) is exact, so the fused add rounds as the subtraction)
        cost = b * (wt @ G2.T)  # [n, m, E]
        cost.add_(a @ G.T, alpha=-2.0).mul_(b)
        neg = x < 0
        idx = cost.argmin(-1)
        if not self.spec.parity:
            return idx, neg
        odd = (neg.sum(-1) % 2 == 1).nonzero(as_tuple=True)  # vectors whose signs break the parity
        if odd[0].numel():  # the even ones keep their nearest point and signs
            pick, flipped = _parity_pick(a[odd], b[odd], cost[odd], G)
            idx[odd] = pick
            neg[odd] ^= torch.arange(x.shape[-1], device=x.device) == flipped[:, None]
        return idx, neg

    # ------------------------------------------------------------------ driver protocol
    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> LatticeState:
        """ggml's ``d`` and sub-scales for ``Wb [n, block]`` float32 (importance ``imp [block]`` as its
        imatrix), then ``init_steps`` rounds of re-rounding and least-squares refit on the block."""
        X = Wb.detach().to(torch.float32)
        wt = torch.ones(self.block, device=X.device) if imp is None else imp.detach().to(X.device, torch.float32)
        data = libggml.quantize_rows(X.cpu().numpy(), self.ggml_type, None if imp is None else wt.cpu().numpy())
        d, sc = self.decode_scales(data)
        st = LatticeState(d.to(X.device), sc.to(X.device), *self._round_all(X, wt, d.to(X.device), sc.to(X.device)), wt)
        for _ in range(self.init_steps):
            self._refit(st, X)
            st.idx, st.neg = self._round_all(X, wt, st.d, st.sc)
        return st

    def round(self, st: LatticeState, c: int, w: torch.Tensor) -> torch.Tensor:
        """Stored values ``[n, 8]`` nearest to columns ``c .. c+7`` ``w [n, 8]``; records their codes."""
        if st.db is None:
            st.db = self.scale(st.d, st.sc)
        sp, n = self.spec, w.shape[0]
        m = self.unit // sp.dim
        x = w.to(torch.float32).reshape(n, m, sp.dim)
        db = st.db[:, c // sp.sub, None].expand(n, m)
        idx, neg = self.nearest(x, st.wt[c : c + self.unit].view(m, sp.dim), db)
        st.idx[:, c // sp.dim : c // sp.dim + m] = idx
        st.neg[:, c : c + self.unit] = neg.reshape(n, -1)
        v = st.db[:, c // sp.sub, None] * self.table(w.device)[0][idx].reshape(n, -1)
        return torch.where(neg.reshape(n, -1), -v, v)

    def requant(self, st: LatticeState, Wb: torch.Tensor, record: bool = False) -> torch.Tensor:
        """Stored values ``[n, block]`` nearest to ``Wb`` under the block's scales as they are, each vector's
        point chosen among the ``NEIGHBOURS`` nearest to its fitted point (block-output tuning, ``quant.recon``:
        the codes move locally; a search of the whole codebook every step cost minutes a block at 8B's
        shapes); ``record``: the points become the state's."""
        if st.home is None:
            st.home = st.idx.clone()
        sp, n = self.spec, Wb.shape[0]
        m = self.block // sp.dim
        X = Wb.detach().to(torch.float32).reshape(n, m, sp.dim)
        db = self.scale(st.d, st.sc).repeat_interleave(sp.sub // sp.dim, dim=1)
        step = max(1, LOCAL_CHUNK.get(Wb.device.type, 1 << 20) // (m * NEIGHBOURS * sp.dim))
        parts = [self._near_local(X[r : r + step], st.wt.view(m, sp.dim), db[r : r + step], st.home[r : r + step])
                 for r in range(0, n, step)]
        idx, neg = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).reshape(n, -1)
        if record:
            st.idx, st.neg, st.db = idx, neg, None
        return self.values(st.d, st.sc, idx, neg)

    def _near_local(self, x: torch.Tensor, wt: torch.Tensor, db: torch.Tensor, home: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``nearest`` of ``x [n, m, dim]`` among the neighbours of ``home [n, m]``: ``idx [n, m]``, ``neg [n, m, dim]``."""
        cand = self.neighbours(x.device)[home]  # [n, m, K]
        Gc = self.table(x.device)[0][cand]  # [n, m, K, dim]
        b, aG = db[..., None], (wt * x.abs())[:, :, None, :] * Gc  # [n, m, K, dim]
        cost = b * (b * (Gc * Gc * wt[:, None, :]).sum(-1) - 2.0 * aG.sum(-1))  # [n, m, K]
        neg = x < 0
        if self.spec.parity:  # an odd number of negatives: also pay the cheapest single flip of each candidate
            flip, which = aG.min(-1)
            odd = (neg.sum(-1) % 2 == 1)[..., None]
            cost = torch.where(odd, cost + 4.0 * b * flip, cost)
        pick = cost.argmin(-1, keepdim=True)
        if self.spec.parity:
            flipped = which.gather(-1, pick)[..., 0]
            neg = neg ^ (odd & (torch.arange(x.shape[-1], device=x.device) == flipped[..., None]))
        return cand.gather(-1, pick)[..., 0], neg

    def steps(self, st: LatticeState) -> torch.Tensor:
        """The mean spacing of the codebook's magnitudes times each sub-block's scale, ``[n, block]``."""
        mags = torch.unique(self.table(st.d.device)[0].abs())
        gap = float((mags[-1] - mags[0]) / max(mags.numel() - 1, 1))
        return (self.scale(st.d, st.sc) * gap).repeat_interleave(self.spec.sub, dim=1)

    def round_plain(self, st: LatticeState, Wb: torch.Tensor) -> None:
        """Nothing to do: ``init`` ends with ``_round_all`` of ``Wb`` under the final scales, the points ``round``
        would pick group by group."""

    def refit(self, st: LatticeState, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        st.db = None
        if refit:
            self._refit(st, T.detach().to(torch.float32))
        return self.values(st.d, st.sc, st.idx, st.neg)

    def pack(self, states: list[LatticeState], shape: tuple[int, int], name: str) -> GGMLTensor:
        def cat(f: str) -> np.ndarray:
            return torch.stack([getattr(st, f) for st in states], dim=1).cpu().numpy()

        blocks = getattr(gt, f"pack_{self.name}")(cat("idx"), cat("neg").astype(np.int64),
                                                  cat("sc").astype(np.int64), cat("d"))
        return gt.from_blocks(blocks, self.ggml_type, name=name)

    # ------------------------------------------------------------------ fitting
    def decode_scales(self, data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``d [n]`` and sub-scales ``sc [n, S]`` float32 of one block of ggml bytes ``data [n, type_size]``."""
        sub = libggml.SUBSCALES[self.ggml_type]
        d = np.ascontiguousarray(data[:, :2]).view(np.float16)[:, 0].astype(np.float32)
        sc = np.stack([(data[:, o] >> s) & 15 for o, s in zip(sub.offset, sub.shift)], 1).astype(np.float32)
        return torch.from_numpy(d), torch.from_numpy(sc)

    def _round_all(self, X: torch.Tensor, wt: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest points of a whole block ``X [n, block]`` under fixed scales -> ``idx``, ``neg [n, block]``."""
        sp, n = self.spec, X.shape[0]
        m = self.block // sp.dim
        db = self.scale(d, sc).repeat_interleave(sp.sub // sp.dim, dim=1)  # [n, m]
        idx, neg = self.nearest(X.reshape(n, m, sp.dim), wt.view(m, sp.dim), db)
        return idx, neg.reshape(n, -1)

    def _sub_errors(self, st: LatticeState, d: torch.Tensor, sc: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """Weighted error ``[n, S]`` per sub-block of the stored values under ``d``, ``sc`` against ``T``."""
        e = st.wt * (self.values(d, sc, st.idx, st.neg) - T).square()
        return e.view(e.shape[0], self.spec.n_sub, self.spec.sub).sum(-1)

    def _refit(self, st: LatticeState, T: torch.Tensor) -> None:
        """``refit_rounds`` of: least-squares ``d`` per row, then each sub-scale, points fixed; in place,
        each kept only where the weighted error on ``T [n, block]`` drops."""
        sp, n = self.spec, T.shape[0]
        P = self.points(st.idx, st.neg).view(n, sp.n_sub, sp.sub)
        Tb, w = T.view(n, sp.n_sub, sp.sub), st.wt.view(1, sp.n_sub, sp.sub)
        spp, spt = (w * P * P).sum(-1), (w * P * Tb).sum(-1)  # [n, S]
        cur = self._sub_errors(st, st.d, st.sc, T)
        for _ in range(self.refit_rounds):
            mult = self.scale(torch.ones_like(st.d), st.sc)
            saa, sat = (mult * mult * spp).sum(1), (mult * spt).sum(1)
            d = (sat / saa.clamp_min(1e-30)).clamp(0.0, 65504.0).to(torch.float16).to(torch.float32)
            err = self._sub_errors(st, d, st.sc, T)
            better = (err.sum(1) < cur.sum(1)) & (saa > 0) & (d > 0)
            st.d, cur = torch.where(better, d, st.d), torch.where(better[:, None], err, cur)
            ok = (spp > 0) & (st.d[:, None] > 0)
            m = spt / (spp * st.d[:, None]).clamp_min(1e-30)  # least-squares mult(s) per sub-block
            target = m * 4.0 - 0.5 if sp.half else (m - 1.0) / 2.0
            for f in (torch.floor, torch.ceil):
                sc = f(target).clamp(0, 15)
                err = self._sub_errors(st, st.d, sc, T)
                keep = (err < cur) & ok
                st.sc, cur = torch.where(keep, sc, st.sc), torch.where(keep, err, cur)
