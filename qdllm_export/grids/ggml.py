"""ggml's scalar weight grids (k-quants and the 32-wide legacy types), fitted by the grid driver.

Every type here stores, per row and block, integer codes ``q`` (an index into the type's levels) and a
few scale fields, and decodes element ``i`` of sub-block ``j`` as (see ``formats.ggml_tensor``)::

    value = (d * sc_j) * lev[q_i] - dmin * m_j        float32, in this order (ggml's and gguf-py's)

with ``d``, ``dmin`` fp16 per block and ``sc_j``, ``m_j`` small integers per sub-block. Types without a
sub-scale field have ``sc = 1``; symmetric types ``dmin = m = 0``; the legacy affine types (``d*q + m``)
are ``m_j = -1`` with ``dmin`` holding the fp16 offset (``x - (-y) == x + y`` exactly).

Fit of a block (``init``), all weighted by the column importance (uniform without data):

1. per sub-block, the best continuous scale (and offset) over a search of candidate ranges, each
   re-solved by weighted least squares with its codes fixed (llama.cpp's ``make_qkx3_quants`` /
   ``make_qx_quants``);
2. the block's fp16 ``d`` (then ``dmin``) by a search over candidates, each scored by the weighted error
   of the re-rounded block (llama.cpp scores the sub-scales only);
3. coordinate descent, kept per row (and per sub-block) only where the error drops: the weighted
   least-squares ``d``/``dmin`` with codes and sub-scales fixed, rounded to fp16; then each sub-block's
   integer ``sc_j``/``m_j`` from its least-squares fit (floor/ceil candidates); codes re-rounded to the
   nearest stored value after each step.

``round`` picks the nearest stored value of one column under the block's parameters; ``refit`` runs
step 3 on the rounded targets (the GPTQ-updated columns). All torch, device-agnostic, vectorised over rows.
Which grid a type name gets (these, the lattice grids, ggml's own encoder, fallbacks) is
``grids.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from formats import ggml_tensor as gt
from formats.ggml_tensor import GGMLTensor
from qdllm_export.grids.ggml_search import affine_sub_fit, chunks, pick, sym_sub_fit, wsum

D_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8, 0.75, 1.03, 1.06, 1.1)  # block scale candidates
CD_STEPS = 2  # coordinate-descent rounds in init and refit


@dataclass(frozen=True)
class GGMLSpec:
    """One scalar ggml type. ``sc_range``: the sub-scale field's integer range (None: no field, sc = 1);
    ``m_range``: the sub-min field's range (k-quants), None for a free fp16 offset (legacy affine);
    ``affine``: whether the type has an offset at all."""

    name: str
    ggml_type: str
    block: int
    sub: int
    levels: tuple[int, ...]
    sc_range: tuple[int, int] | None
    m_range: tuple[int, int] | None
    affine: bool
    uniform: bool = True

    @property
    def n_sub(self) -> int:
        return self.block // self.sub


def _ints(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


SPECS: dict[str, GGMLSpec] = {s.name: s for s in (
    GGMLSpec("q8_0", "Q8_0", 32, 32, _ints(-127, 127), None, None, False),  # -128 decodes, but llama.cpp never writes it
    GGMLSpec("q5_0", "Q5_0", 32, 32, _ints(-16, 15), None, None, False),
    GGMLSpec("q4_0", "Q4_0", 32, 32, _ints(-8, 7), None, None, False),
    GGMLSpec("iq4_nl", "IQ4_NL", 32, 32, gt.KVALUES_IQ4NL, None, None, False, uniform=False),
    GGMLSpec("q5_1", "Q5_1", 32, 32, _ints(0, 31), None, None, True),
    GGMLSpec("q4_1", "Q4_1", 32, 32, _ints(0, 15), None, None, True),
    GGMLSpec("q2_k", "Q2_K", 256, 16, _ints(0, 3), (0, 15), (0, 15), True),
    GGMLSpec("q3_k", "Q3_K", 256, 16, _ints(-4, 3), (-32, 31), None, False),
    GGMLSpec("q4_k", "Q4_K", 256, 32, _ints(0, 15), (0, 63), (0, 63), True),
    GGMLSpec("q5_k", "Q5_K", 256, 32, _ints(0, 31), (0, 63), (0, 63), True),
    GGMLSpec("q6_k", "Q6_K", 256, 16, _ints(-32, 31), (-128, 127), None, False),
)}


@dataclass
class GGMLState:
    """One block's parameters for every row: ``d``, ``dmin`` [n] (fp16 values), ``sc``, ``m`` [n, S]
    (integers), codes ``q`` [n, block] uint8 (indices into the levels)."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor
    cols: tuple[torch.Tensor, ...] | None = None  # d*sc, dmin*m, d*sc with ones for zeros: [S, n], for round


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest fp16 value (kept as float32), saturating at +-65504."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


class GGMLGrid:
    """A scalar ggml type (``SPECS``) as a driver grid: ``block`` = the ggml block, ``unit`` = 1."""

    def __init__(self, spec: GGMLSpec, cd_steps: int = CD_STEPS):
        self.spec, self.name, self.block, self.unit = spec, spec.name, spec.block, 1
        self.ggml_type, self.cd_steps = spec.ggml_type, cd_steps
        self._lev: dict[torch.device, torch.Tensor] = {}

    def levels(self, device: torch.device) -> torch.Tensor:
        if device not in self._lev:
            self._lev[device] = torch.tensor(self.spec.levels, dtype=torch.float32, device=device)
        return self._lev[device]

    def bits_per_weight(self, n_in: int) -> float:
        block, size = gt.type_info(self.ggml_type)
        return 8.0 * size / block

    # ------------------------------------------------------------------ stored values
    def nearest(self, x: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor, safe: torch.Tensor | None = None) -> torch.Tensor:
        """Index (long, shape of ``x``) of the stored value ``dl*lev - ml`` nearest to ``x``; ``dl``, ``ml``
        broadcast against ``x``; ``safe``: ``dl`` with its zeros replaced by ones, if at hand. Uniform
        levels round ``(x + ml) / dl`` (a float32 tie may go either way); others compare the two
        bracketing levels."""
        lev = self.levels(x.device)
        n = lev.numel()
        if safe is None:
            safe = torch.where(dl == 0, 1.0, dl)
        t = (x + ml) / safe
        if self.spec.uniform:
            return torch.round(t).sub_(self.spec.levels[0]).clamp_(0, n - 1).long()
        i0 = (torch.searchsorted(lev, t.contiguous()) - 1).clamp_(0, n - 2)
        v0 = dl * lev[i0] - ml
        v1 = dl * lev[i0 + 1] - ml
        return i0 + ((v1 - x).abs() < (v0 - x).abs()).long()

    def value(self, idx: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor) -> torch.Tensor:
        return dl * self.levels(idx.device)[idx] - ml

    def _dl_ml(self, st: GGMLState) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sub-block ``d*sc`` and ``dmin*m`` [n, S] (float32 products, as ggml forms them)."""
        return st.d[:, None] * st.sc, st.dmin[:, None] * st.m

    def values(self, st: GGMLState) -> torch.Tensor:
        """Stored values ``[n, block]`` float32 of a block."""
        dl, ml = self._dl_ml(st)
        n, S = st.sc.shape
        q = st.q.long().view(n, S, -1)
        return self.value(q, dl[..., None], ml[..., None]).view(n, -1)

    # ------------------------------------------------------------------ driver protocol
    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> GGMLState:
        """Parameters of one block ``Wb [n, block]`` float32 under column importance ``imp [block]``."""
        X, wt = self._split(Wb, imp)
        s, o = self._sub_fit(X, wt)
        st = self._block_params(X, wt, s, o)
        for _ in range(self.cd_steps):
            self._descend(st, X, wt)
        return st

    def round(self, st: GGMLState, c: int, w: torch.Tensor) -> torch.Tensor:
        if st.cols is None:
            dl, ml = self._dl_ml(st)
            st.cols = (dl.T.contiguous(), ml.T.contiguous(), torch.where(dl == 0, 1.0, dl).T.contiguous())
        dl, ml, safe = (a[c // self.spec.sub] for a in st.cols)
        lev = self.spec.levels
        if self.spec.uniform:  # the level itself, as nearest() rounds it: fewer kernels per column
            v = torch.round((w[:, 0] + ml) / safe).clamp_(lev[0], lev[-1])
            st.q[:, c] = v - lev[0] if lev[0] else v
            return (dl * v - ml)[:, None]
        idx = self.nearest(w[:, 0], dl, ml, safe)
        st.q[:, c] = idx
        return self.value(idx, dl, ml)[:, None]

    def column_params(self, st: GGMLState, cols: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """``d*sc``, ``dmin*m`` and ``d*sc`` with ones for zeros ``[block, n]`` of each position of the GPTQ walk
        (``cols`` long ``[block]``: the block's column at each position, None: positions are columns): what
        ``round`` reads for that column (``grids.base._gptq_walk``)."""
        dl, ml = self._dl_ml(st)
        pos = torch.arange(self.block, device=dl.device) if cols is None else cols.to(dl.device)
        sub = pos // self.spec.sub
        return tuple(a.T[sub].contiguous() for a in (dl, ml, torch.where(dl == 0, 1.0, dl)))

    def round_column(self, p: tuple[torch.Tensor, ...], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``round``'s arithmetic on one column ``w [n, 1]`` under its parameters ``p`` (``column_params``'s rows):
        the code ``[n]`` (float levels less the first for uniform types, long indices otherwise) and the value."""
        dl, ml, safe = p
        lev = self.spec.levels
        if self.spec.uniform:
            v = torch.round((w[:, 0] + ml) / safe).clamp_(lev[0], lev[-1])
            return (v - lev[0] if lev[0] else v), (dl * v - ml)[:, None]
        idx = self.nearest(w[:, 0], dl, ml, safe)
        return idx, self.value(idx, dl, ml)[:, None]

    def record_codes(self, st: GGMLState, cols: torch.Tensor | None, codes: torch.Tensor) -> None:
        """The codes ``[block, n]`` of the GPTQ walk (position order) become the state's (``round`` records)."""
        if cols is None:
            st.q = codes.T.to(torch.uint8).contiguous()
        else:
            st.q[:, cols.to(st.q.device)] = codes.T.to(torch.uint8)
        st.cols = None

    def requant(self, st: GGMLState, Wb: torch.Tensor, record: bool = False) -> torch.Tensor:
        """Stored values ``[n, block]`` nearest to ``Wb`` under the block's parameters as they are (block-output
        tuning, ``quant.recon``); ``record``: the codes become the state's."""
        dl, ml = self._dl_ml(st)
        n, S = st.sc.shape
        idx = self.nearest(Wb.reshape(n, S, -1), dl[..., None], ml[..., None])
        if record:
            st.q, st.cols = idx.view(n, -1).to(torch.uint8), None
        return self.value(idx, dl[..., None], ml[..., None]).view(n, -1)

    def stack_states(self, states: list[GGMLState]) -> GGMLState:
        """One state whose rows are those of ``states`` in order (``requant`` is row-wise; block-output tuning
        rounds many blocks and experts in one call)."""
        return GGMLState(*(torch.cat([getattr(st, f) for st in states]) for f in ("d", "dmin", "sc", "m", "q")))

    def steps(self, st: GGMLState) -> torch.Tensor:
        """The spacing of neighbouring stored values ``[n, block]`` (mean spacing for non-uniform levels)."""
        lev = self.spec.levels
        dl = (st.d[:, None] * st.sc).abs() * ((lev[-1] - lev[0]) / (len(lev) - 1))
        return dl.repeat_interleave(self.spec.sub, dim=1)

    def round_plain(self, st: GGMLState, Wb: torch.Tensor) -> None:
        """Nothing to do: ``init`` ends with every code nearest to ``Wb`` under the final parameters (each
        parameter change in ``_descend`` comes with its re-rounded codes), which is what ``round`` would record."""

    def refit(self, st: GGMLState, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        st.cols = None
        if refit:
            X, wt = self._split(T, imp)
            for _ in range(self.cd_steps):
                self._descend(st, X, wt)
        return self.values(st)

    def pack(self, states: list[GGMLState], shape: tuple[int, int], name: str) -> GGMLTensor:
        sp = self.spec
        if sp.ggml_type == "Q2_K" and states and states[0].q.is_cuda:
            return gt.from_blocks(_pack_q2_k_torch(states).cpu().numpy(), "Q2_K", name=name)
        lev = np.asarray(sp.levels, dtype=np.int64)

        def cat(f: str) -> np.ndarray:
            return torch.stack([getattr(st, f) for st in states], dim=1).cpu().numpy()

        codes = cat("q")  # [n, nb, block] uint8 indices into the levels
        q = codes.astype(np.int16) + lev[0] if sp.uniform else lev[codes.astype(np.int64)]  # the levels themselves
        d, dmin = cat("d"), cat("dmin")
        sc, m = cat("sc").astype(np.int64), cat("m").astype(np.int64)
        t = sp.ggml_type
        if t in ("Q2_K", "Q4_K", "Q5_K"):
            blocks = getattr(gt, f"pack_{sp.name}")(q, sc, m, d, dmin)
        elif t in ("Q3_K", "Q6_K"):
            blocks = getattr(gt, f"pack_{sp.name}")(q, sc, d)
        elif t in ("Q4_1", "Q5_1"):
            blocks = getattr(gt, f"pack_{sp.name}")(q, d, dmin)
        elif t == "IQ4_NL":
            blocks = gt.pack_iq4_nl(cat("q").astype(np.int64), d)
        else:
            blocks = getattr(gt, f"pack_{sp.name}")(q, d)
        return gt.from_blocks(blocks, t, name=name)

    # ------------------------------------------------------------------ fitting
    def _split(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = Wb.shape[0]
        S, L = self.spec.n_sub, self.spec.sub
        wt = torch.ones(S, L, device=Wb.device) if imp is None else imp.to(torch.float32).view(S, L)
        return Wb.to(torch.float32).reshape(n, S, L), wt[None]

    def _sub_fit(self, X: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best continuous scale ``s`` and offset ``o`` [n, S] per sub-block (value = s*lev - o)."""
        if self.spec.affine:
            return affine_sub_fit(X, wt, len(self.spec.levels) - 1, clamp_min=self.spec.m_range is not None)
        return sym_sub_fit(self.levels(X.device), self.nearest, X, wt), torch.zeros(X.shape[:2], device=X.device)

    def _errors(self, X: torch.Tensor, wt: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes under per-sub-block ``dl``, ``ml`` [..., n, S] (leading candidate dims allowed) and
        their weighted error [..., n, S]; ``X`` [n, S, L]. Codes are float (whole numbers) for uniform levels."""
        dl, ml = dl[..., None], ml[..., None]
        if self.spec.uniform:  # the level itself, as nearest() rounds it, and idx = level - levels[0]: no gathers
            lev = self.spec.levels
            v = torch.round((X + ml) / torch.where(dl == 0, 1.0, dl)).clamp_(lev[0], lev[-1])
            err = (wt * (dl * v - ml - X).square()).sum(-1)
            return v.sub_(lev[0]) if lev[0] else v, err
        idx = self.nearest(X, dl, ml)
        err = (wt * (self.value(idx, dl, ml) - X).square()).sum(-1)
        return idx, err

    def _fields(self, d: torch.Tensor, dmin: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer sub-fields ``sc``, ``m`` [..., n, S] nearest to ``s / d`` and ``o / dmin`` (``d``, ``dmin`` [..., n])."""
        sp = self.spec
        sc = torch.where(d[..., None] != 0, torch.round(s / torch.where(d == 0, 1.0, d)[..., None]), 0.0).clamp_(*sp.sc_range)
        if not sp.affine:
            return sc, torch.zeros_like(sc)
        m = torch.where(dmin[..., None] != 0, torch.round(o / torch.where(dmin == 0, 1.0, dmin)[..., None]), 0.0)
        return sc, m.clamp_(*sp.m_range)

    def _score(self, X: torch.Tensor, wt: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, s: torch.Tensor,
               o: torch.Tensor) -> torch.Tensor:
        """Weighted error [K, n] of the re-rounded block under each candidate ``d``, ``dmin`` [K, n]."""
        out = []
        for k0, k1 in chunks(d.shape[0], X.numel(), X.device):
            sc, m = self._fields(d[k0:k1], dmin[k0:k1], s, o)
            out.append(self._errors(X, wt, d[k0:k1, :, None] * sc, dmin[k0:k1, :, None] * m)[1].sum(-1))
        return torch.cat(out)

    def _block_params(self, X: torch.Tensor, wt: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> GGMLState:
        """Step 2: fp16 ``d`` / ``dmin`` and integer sub-fields from the continuous fit (module doc)."""
        sp = self.spec
        n, S, _ = X.shape
        ones = torch.ones(n, S, device=X.device)
        if sp.sc_range is None:  # legacy: one sub-block, the fields are the fp16 values themselves
            d = fp16(s[:, 0])
            dmin = fp16(-o[:, 0]) if sp.affine else torch.zeros_like(d)
            sc, m = ones, (-ones if sp.affine else 0 * ones)
        else:
            lo, hi = sp.sc_range
            r = torch.tensor(D_RATIOS, device=X.device)[:, None]
            if sp.affine:
                D = fp16(s.amax(1) / (hi * r))
            else:
                xs = s.gather(1, s.abs().argmax(1, keepdim=True))[:, 0]  # signed largest sub-scale
                D = fp16(torch.cat([xs / (lo * r), xs / (hi * r)]))
            dmin = fp16(o.amax(1) / sp.m_range[1]) if sp.affine else torch.zeros(n, device=X.device)
            d = pick(D, self._score(X, wt, D, dmin.expand_as(D), s, o))
            if sp.affine:
                M = fp16(o.amax(1) / (sp.m_range[1] * r))
                dmin = pick(M, self._score(X, wt, d.expand_as(M), M, s, o))
            sc, m = self._fields(d, dmin, s, o)
        idx = self._errors(X, wt, d[:, None] * sc, dmin[:, None] * m)[0]
        return GGMLState(d, dmin, sc, m, idx.view(n, -1).to(torch.uint8))

    def _descend(self, st: GGMLState, X: torch.Tensor, wt: torch.Tensor) -> None:
        """Step 3 (module doc), in place: one round of block-scale then sub-field refits, each kept where
        the weighted error on ``X`` drops."""
        st.cols = None
        n = X.shape[0]
        dl, ml = self._dl_ml(st)
        q = st.q.long().view(X.shape)
        cur = (wt * (self.value(q, dl[..., None], ml[..., None]) - X).square()).sum(-1)  # [n, S]
        # (b) block scales, codes and sub-fields fixed
        d, dmin = self._ls_block(st, X, wt, q)
        idx, err = self._errors(X, wt, d[:, None] * st.sc, dmin[:, None] * st.m)
        better = err.sum(1) < cur.sum(1)
        st.d, st.dmin = torch.where(better, d, st.d), torch.where(better, dmin, st.dmin)
        st.q = torch.where(better[:, None], idx.view(n, -1).to(torch.uint8), st.q)
        cur = torch.where(better[:, None], err, cur)
        if self.spec.sc_range is None:
            return
        # (c) each sub-block's integer fields, block scales fixed
        q = st.q.long().view(X.shape)
        for sc, m in self._sub_candidates(st, X, wt, q):
            idx, err = self._errors(X, wt, st.d[:, None] * sc, st.dmin[:, None] * m)
            b = err < cur
            st.sc, st.m = torch.where(b, sc, st.sc), torch.where(b, m, st.m)
            st.q = torch.where(b[..., None], idx, st.q.long().view(X.shape)).view(n, -1).to(torch.uint8)
            cur = torch.where(b, err, cur)

    def _ls_block(self, st: GGMLState, X: torch.Tensor, wt: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted least-squares ``d`` (and ``dmin``) [n] for fixed codes and sub-fields, rounded to fp16."""
        lev = self.levels(X.device)
        a = st.sc[..., None] * lev[q]  # value = d * a + dmin * b
        b = (-st.m[..., None]).expand_as(a)
        saa, sax = wsum(a * a, wt), wsum(a * X, wt)
        if not self.spec.affine:
            return fp16(torch.where(saa > 0, sax / saa.clamp_min(1e-30), st.d)), st.dmin
        sab, sbb, sbx = wsum(a * b, wt), wsum(b * b, wt), wsum(b * X, wt)
        det = saa * sbb - sab * sab
        ok = det > 1e-12 * (saa * sbb).clamp_min(1e-30)
        det = torch.where(ok, det, torch.ones_like(det))
        d = torch.where(ok, (sax * sbb - sbx * sab) / det, st.d)
        dmin = torch.where(ok, (saa * sbx - sab * sax) / det, st.dmin)
        return fp16(d), fp16(dmin)

    def _sub_candidates(self, st: GGMLState, X: torch.Tensor, wt: torch.Tensor, q: torch.Tensor):
        """Integer (sc, m) [n, S] candidates around each sub-block's least-squares fit for fixed codes."""
        sp = self.spec
        lo, hi = sp.sc_range
        v = self.levels(X.device)[q]
        sw, sv, svv = wt.sum(-1).expand(X.shape[:2]), (wt * v).sum(-1), (wt * v * v).sum(-1)
        sx, svx = (wt * X).sum(-1), (wt * v * X).sum(-1)
        dsafe = torch.where(st.d == 0, 1.0, st.d)[:, None]
        if sp.affine:  # x = alpha * v - beta
            det = sw * svv - sv * sv
            ok = det > 0
            det = torch.where(ok, det, torch.ones_like(det))
            alpha = torch.where(ok, (sw * svx - sv * sx) / det, st.d[:, None] * st.sc)
            beta = torch.where(ok, (sv * svx - svv * sx) / det, st.dmin[:, None] * st.m)
            msafe = torch.where(st.dmin == 0, 1.0, st.dmin)[:, None]
            sc_r, m_r = alpha / dsafe, beta / msafe
            mlo, mhi = sp.m_range
            for fs in (torch.floor, torch.ceil):
                for fm in (torch.floor, torch.ceil):
                    yield fs(sc_r).clamp(lo, hi), fm(m_r).clamp(mlo, mhi)
        else:
            alpha = torch.where(svv > 0, svx / svv.clamp_min(1e-30), st.d[:, None] * st.sc)
            sc_r = alpha / dsafe
            for fs in (torch.floor, torch.ceil):
                yield fs(sc_r).clamp(lo, hi), st.m


def _pack_q2_k_torch(states: list[GGMLState]) -> torch.Tensor:
    """``Q2_K`` blocks ``[n, nb, 84]`` uint8 of the blocks' states, on their device: the bytes
    ``formats.ggml_tensor.pack_q2_k`` makes (16 scale bytes ``sc | m << 4``, 64 bytes of 2-bit codes with element
    ``128h + 32s + l`` at bits ``2s`` of byte ``32h + l``, then ``d`` and ``dmin`` as little-endian fp16), with its
    checks (codes in 0..3, fields in 0..15, ``d``/``dmin`` exact fp16)."""
    q = torch.stack([st.q for st in states], dim=1)  # [n, nb, 256] uint8
    sc, m = (torch.stack([getattr(st, f) for st in states], dim=1) for f in ("sc", "m"))  # [n, nb, 16] float
    d, dmin = (torch.stack([getattr(st, f) for st in states], dim=1) for f in ("d", "dmin"))  # [n, nb] float32
    bad = (q > 3).any() | (sc < 0).any() | (sc > 15).any() | (m < 0).any() | (m > 15).any() | (sc != sc.round()).any() \
        | (m != m.round()).any()
    halves = [x.to(torch.float16) for x in (d, dmin)]
    if bool(bad) or not all(torch.equal(h.float(), x) for h, x in zip(halves, (d, dmin))):
        from formats.errors import QdllmError

        raise QdllmError("ggml packing: Q2_K codes, scales or mins out of range, or d/dmin not exact fp16")
    scales = sc.to(torch.uint8) | (m.to(torch.uint8) << 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device)[:, None]
    crumbs = (q.view(*q.shape[:-1], 2, 4, 32) << shifts).sum(-2, dtype=torch.uint8).view(*q.shape[:-1], 64)
    fp = [h.contiguous().view(torch.uint8).view(*d.shape, 2) for h in halves]  # little-endian on every CUDA host
    return torch.cat([scales, crumbs, *fp], dim=-1)
