"""The MatMulNBits grid: asymmetric ``bits``-bit codes, an fp16 scale and an integer zero point per row
and ``block_size`` columns (``W_hat = (q - z) * s``), fitted by the grid driver (``grids.base``).

Fit of a block (``init``): for every row, a search over clipping ranges ``[a*xmin, b*xmax]`` (the
range always holds 0, so the zero point is an integer in ``[0, 2^bits)``) minimising the
importance-weighted error ``sum_j imp_j (w_j - (q_j - z) s)^2`` (uniform weights without data).
``refit``: with the codes and zero fixed, the weighted least-squares scale, rounded to fp16, then the
codes re-rounded; kept per row only where the weighted error on the targets drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from formats.nbits import BLOCK_SIZES, NBITS, NBitsTensor, pack_low_first, stored_bits_per_weight

SHRINK = torch.linspace(1.0, 0.35, 14).tolist()  # candidate clipping factors of each side of the range
CANDIDATE_ELEMS = 1 << 20  # init evaluates candidates in chunks of about this many code elements (4 MiB)
CANDIDATE_ELEMS_CUDA = 1 << 26  # on a GPU (256 MiB): several candidates a launch for 8B's shapes (same choice)


@dataclass
class NBitsState:
    s: torch.Tensor  # [n] float32 holding fp16 values
    z: torch.Tensor  # [n] float32 holding integers
    q: torch.Tensor  # [n, block] float32 holding integer codes


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=2.0**-24, max=65504.0).to(torch.float16).to(torch.float32)


class NBitsGrid:
    """``bits`` in (2, 4, 8), ``block_size`` a power of two in 16..256."""

    def __init__(self, bits: int, block_size: int = 32):
        if bits not in NBITS or block_size not in BLOCK_SIZES:
            raise ValueError(f"bits {bits} / block_size {block_size}")
        self.bits, self.block, self.unit = bits, block_size, 1
        self.maxq = float(2**bits - 1)
        self.name = f"int{bits}"

    # ---------------------------------------------------------------- fit
    def _codes(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / s[..., None] + z[..., None]), 0.0, self.maxq)

    def _sz(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = _fp16((hi - lo) / self.maxq)
        z = torch.clamp(torch.round(-lo / s), 0.0, self.maxq)
        return s, z

    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> NBitsState:
        """Scale and zero point per row: the clipping pair ``(a, b)`` of ``SHRINK`` x ``SHRINK`` with the least
        weighted error (the first such pair on ties), all candidates of a chunk evaluated in one pass."""
        wts = torch.ones(Wb.shape[1], device=Wb.device) if imp is None else imp
        xmin = Wb.min(dim=1).values.clamp(max=0.0)
        xmax = Wb.max(dim=1).values.clamp(min=0.0)
        flat = (xmax - xmin) == 0
        xmax = torch.where(flat, torch.ones_like(xmax), xmax)
        shrink = torch.tensor(SHRINK, dtype=Wb.dtype, device=Wb.device)
        a = shrink.repeat_interleave(len(SHRINK))  # candidate c = (a_i, b_j), i major, as nested loops would visit
        b = shrink.repeat(len(SHRINK))
        chunk = max(1, (CANDIDATE_ELEMS_CUDA if Wb.is_cuda else CANDIDATE_ELEMS) // Wb.numel())
        best_err = torch.full_like(xmin, float("inf"))
        best_s, best_z = torch.ones_like(xmin), torch.zeros_like(xmin)
        for c0 in range(0, a.numel(), chunk):
            s, z = self._sz(a[c0:c0 + chunk, None] * xmin, b[c0:c0 + chunk, None] * xmax)  # [C, n]
            q = self._codes(Wb, s, z)  # [C, n, block]
            err = (((q - z[..., None]) * s[..., None] - Wb).square() * wts).sum(-1)  # [C, n]
            err, k = err.min(dim=0)  # first minimum, as the strict "<" of a sequential search
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s.gather(0, k[None])[0], best_s)
            best_z = torch.where(better, z.gather(0, k[None])[0], best_z)
        return NBitsState(s=best_s, z=best_z, q=torch.zeros_like(Wb))

    def round(self, state: NBitsState, c: int, w: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / state.s[:, None] + state.z[:, None]), 0.0, self.maxq)
        state.q[:, c : c + w.shape[1]] = q
        return (q - state.z[:, None]) * state.s[:, None]

    def column_params(self, state: NBitsState, cols: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Scale and zero point ``[block, n]`` of each position of the GPTQ walk (the same for every column)."""
        return tuple(a[None, :].expand(self.block, -1).contiguous() for a in (state.s, state.z))

    def round_column(self, p: tuple[torch.Tensor, ...], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``round``'s arithmetic on one column ``w [n, 1]``: the code ``[n]`` and the value ``[n, 1]``."""
        s, z = p
        q = torch.clamp(torch.round(w / s[:, None] + z[:, None]), 0.0, self.maxq)
        return q[:, 0], (q - z[:, None]) * s[:, None]

    def record_codes(self, state: NBitsState, cols: torch.Tensor | None, codes: torch.Tensor) -> None:
        """The codes ``[block, n]`` of the GPTQ walk (position order) become the state's."""
        if cols is None:
            state.q = codes.T.contiguous()
        else:
            state.q[:, cols.to(state.q.device)] = codes.T

    def round_plain(self, state: NBitsState, Wb: torch.Tensor) -> None:
        """The codes of every column at once (``round``'s arithmetic on the whole block)."""
        state.q = torch.clamp(torch.round(Wb / state.s[:, None] + state.z[:, None]), 0.0, self.maxq)

    def requant(self, state: NBitsState, Wb: torch.Tensor, record: bool = False) -> torch.Tensor:
        """Stored values ``[n, block]`` nearest to ``Wb`` with scale and zero point as they are (``quant.recon``);
        ``record``: the codes become the state's."""
        q = self._codes(Wb, state.s, state.z)
        if record:
            state.q = q
        return (q - state.z[:, None]) * state.s[:, None]

    def stack_states(self, states: list[NBitsState]) -> NBitsState:
        """One state whose rows are those of ``states`` in order (``requant`` is row-wise)."""
        return NBitsState(*(torch.cat([getattr(st, f) for st in states]) for f in ("s", "z", "q")))

    def steps(self, state: NBitsState) -> torch.Tensor:
        """The spacing of neighbouring stored values ``[n, block]``: the scale."""
        return state.s[:, None].expand(-1, self.block)

    def values(self, state: NBitsState) -> torch.Tensor:
        return (state.q - state.z[:, None]) * state.s[:, None]

    def refit(self, state: NBitsState, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        if not refit:
            return self.values(state)
        wts = torch.ones(T.shape[1], device=T.device) if imp is None else imp
        d = state.q - state.z[:, None]
        den = (wts * d * d).sum(1)
        s_new = _fp16(torch.where(den > 0, (wts * d * T).sum(1) / den.clamp_min(1e-30), state.s).abs())
        q_new = torch.clamp(torch.round(T / s_new[:, None] + state.z[:, None]), 0.0, self.maxq)
        err_old = (wts * (self.values(state) - T).square()).sum(1)
        err_new = (wts * ((q_new - state.z[:, None]) * s_new[:, None] - T).square()).sum(1)
        better = err_new < err_old
        state.s = torch.where(better, s_new, state.s)
        state.q = torch.where(better[:, None], q_new, state.q)
        return self.values(state)

    # ---------------------------------------------------------------- storage
    def pack(self, states: list[NBitsState], shape: tuple[int, int], name: str) -> NBitsTensor:
        n_out, n_in = shape
        q = torch.stack([st.q for st in states], dim=1).to(torch.uint8).cpu().numpy()  # [n, nb, B]
        z = torch.stack([st.z for st in states], dim=1).to(torch.uint8).cpu().numpy()  # [n, nb]
        s = torch.stack([st.s for st in states], dim=1).to(torch.float16).cpu().numpy()
        return NBitsTensor(shape, self.bits, self.block, pack_low_first(q, self.bits), np.ascontiguousarray(s),
                           pack_low_first(z, self.bits), name=name)

    def bits_per_weight(self, n_in: int) -> float:
        return stored_bits_per_weight(n_in, self.bits, self.block)
