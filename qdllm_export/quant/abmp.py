"""ABMP: adaptive blockwise mixed precision (number of binary planes per column block).

Rule (Quant-dLLM, extended to fractional budgets; docs/quantizer.md):

1. ``n`` blocks, budget ``b`` planes per block on average. ``b * n`` must be an integer (else the
   mean cannot be exactly ``b``: ``QdllmError``).
2. Base: rank blocks by score (descending, ties by index); the top ``b*n - floor(b)*n`` blocks
   get ``ceil(b)`` planes, the rest ``floor(b)``. For an integer budget every block gets ``b``.
3. Shift: ``k = round(ratio * n)`` (halves up, at most ``n // 2``); the top ``k`` blocks get one plane more, the bottom ``k`` one
   plane less. Skipped (k = 0) when that would leave the range 1..8 (e.g. budget 1 or 1.5).

So budget 2 gives {1,2,3} (the paper's rule), 3 gives {2,3,4}, 1.5 a mix of {1,2}, 2.5 {1,2,3,4}.
The mean is exactly ``b`` in every case.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from formats.errors import QdllmError
from formats.qtensor import MAX_PLANES

MIN_PLANES = 1


def abmp_assign(
    scores: np.ndarray | Sequence[np.ndarray], budget: float, ratio: float = 0.05, what: str = ""
) -> np.ndarray | list[np.ndarray]:
    """Planes ``K_j`` (uint8) per block with mean exactly ``budget``.

    ``scores``: one array ``[n_blocks]``, or a list of per-layer arrays; a list is pooled with
    :func:`abmp_assign_pooled` (per-layer normalised) and a list of arrays comes back.
    """
    if isinstance(scores, (list, tuple)):
        return abmp_assign_pooled(scores, budget, ratio, what=what)
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = s.size
    label = f" ({what})" if what else ""
    if n == 0:
        raise QdllmError(f"ABMP{label}: no blocks to assign")
    if not np.isfinite(s).all():
        raise QdllmError(f"ABMP{label}: block scores hold NaN or inf")
    if not MIN_PLANES <= budget <= MAX_PLANES:
        raise QdllmError(f"ABMP{label}: budget {budget} is outside [{MIN_PLANES}, {MAX_PLANES}]")
    if not 0 <= ratio <= 0.5:
        raise QdllmError(f"ABMP{label}: ratio {ratio} is outside [0, 0.5]")
    total = budget * n
    T = int(round(total))
    if abs(total - T) > 1e-6:
        raise QdllmError(
            f"ABMP{label}: a budget of {budget:g} planes per block over {n} blocks needs {total:g} planes in "
            "all, which is not an integer; choose a budget such that budget * n_blocks is whole, or pool "
            "more blocks together"
        )
    lo = int(math.floor(budget + 1e-9))
    n_hi = T - lo * n
    order = np.argsort(-s, kind="stable")
    K = np.full(n, lo, dtype=np.int64)
    K[order[:n_hi]] += 1
    # Rounded, not floored: a tiny model's pool of 18 blocks at 5% still moves one block each way.
    k = min(int(math.floor(ratio * n + 0.5 + 1e-9)), n // 2)
    if k > 0:
        top, bottom = order[:k], order[n - k :]
        if K[top].max() + 1 <= MAX_PLANES and K[bottom].min() - 1 >= MIN_PLANES:
            K[top] += 1
            K[bottom] -= 1
    assert int(K.sum()) == T
    return K.astype(np.uint8)


def abmp_assign_pooled(
    score_list: Sequence[np.ndarray], budget: float, ratio: float = 0.05, normalize: bool = True, what: str = ""
) -> list[np.ndarray]:
    """ABMP over the concatenated blocks of several linears (e.g. all linears of one transformer block).

    The mean over the POOL is exactly ``budget``; a single linear's mean may differ. With
    ``normalize`` each linear's scores are divided by their mean first, so a linear whose
    activations are simply larger does not take every extra plane: a block is promoted when it is
    important *relative to its own layer*. Pooling and normalisation are design choices (the paper
    ranks the blocks of one layer; tiny models have too few blocks per layer for ``ratio`` to
    select any).
    """
    arrs = [np.asarray(s, dtype=np.float64).ravel() for s in score_list]
    if not arrs:
        raise QdllmError(f"ABMP{' (' + what + ')' if what else ''}: empty pool")
    if normalize:
        arrs = [a / a.mean() if a.size and a.mean() > 0 else a for a in arrs]
    K = abmp_assign(np.concatenate(arrs), budget, ratio, what=what)
    out, start = [], 0
    for a in arrs:
        out.append(K[start : start + a.size].copy())
        start += a.size
    return out


def uniform_planes(n_blocks: int, budget: float, what: str = "") -> np.ndarray:
    """ABMP off: every block gets ``budget`` planes (an integer)."""
    if budget != int(budget):
        raise QdllmError(f"{what or 'quantizer'}: budget {budget:g} is not an integer; a fractional budget needs ABMP")
    return np.full(n_blocks, int(budget), np.uint8)
