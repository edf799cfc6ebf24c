"""Monte-Carlo masked-diffusion NLL bound (nats per token) on token windows, in NumPy.

The estimator is LLaDA's low-variance ``get_log_likelihood`` form, applied to whole windows: for a
window of ``L`` scorable tokens, each Monte-Carlo sample masks exactly ``k`` positions (``k``
stratified over the samples of a window, as LLaDA spreads it over a batch), and contributes

    sum_{masked i} CE(logits_i, token_i) / p_mask / L,      p_mask = k / L,

which is the per-token negative ELBO (an upper bound on the NLL). ``nll`` is the mean over windows
and samples.

The masks depend only on ``(seed, window index, seq_len, n_mc, protect_first)``, never on the model,
so two backends or two quantizations of a model are scored on IDENTICAL masked inputs and their
difference is a paired comparison.

For Dream (``protect_first=True``) position 0 is never masked or scored: its aligned logits row is a
dummy copy (Dream's shift), exactly as Dream's own evaluation never masks the first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from formats.errors import QdllmError
from runtime_ref.sampling import _check_int

LogitsFn = Callable[[np.ndarray], np.ndarray]

__all__ = ["NLLResult", "make_masks", "window_masks", "masked_nll", "text_windows"]


@dataclass(frozen=True)
class NLLResult:
    """Result of :func:`masked_nll`.

    Attributes:
        nll: mean negative ELBO per scored token, in nats (an upper bound on the NLL).
        stderr: standard error of ``nll``: over per-window means when there are >= 2 windows, else
            over the Monte-Carlo samples of the one window (NaN with a single sample).
        n_windows: number of windows scored.
        n_tokens: scored tokens, ``n_windows * L_eff`` (``L_eff = seq_len - 1`` with
            ``protect_first``).
        n_mc: Monte-Carlo samples per window.
        per_window: float64 ``[n_windows]``, each window's mean over its samples (for paired
            comparisons of two models).
    """

    nll: float
    stderr: float
    n_windows: int
    n_tokens: int
    n_mc: int
    per_window: np.ndarray = field(repr=False)

    @property
    def ppl(self) -> float:
        """``exp(nll)``: the corresponding perplexity bound."""
        return float(math.exp(self.nll))


def window_masks(window: int, seq_len: int, n_mc: int, seed: int, protect_first: bool = False) -> np.ndarray:
    """The ``n_mc`` masks of window number ``window``: bool ``[n_mc, seq_len]``.

    A generator seeded with ``(seed, window)`` draws a random offset ``k0`` in ``1..L`` (``L`` =
    scorable positions), the mask counts ``k_m = ((round(linspace(k0, k0 + (n_mc-1) L/n_mc,
    n_mc)) - 1) mod L) + 1`` (LLaDA's stratification: evenly spread over ``1..L``), then for each
    sample exactly ``k_m`` positions from a random permutation. With ``protect_first`` the
    positions are drawn from ``1..seq_len-1``.
    """
    off = 1 if protect_first else 0
    L = seq_len - off
    if L < 1:
        raise QdllmError(f"seq_len {seq_len} leaves no position to mask")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(window)]))
    k0 = int(rng.integers(1, L + 1))
    ks = np.round(np.linspace(k0, k0 + (n_mc - 1) * (L / n_mc), n_mc)).astype(np.int64)
    ks = ((ks - 1) % L) + 1
    masks = np.zeros((n_mc, seq_len), dtype=bool)
    for m, k in enumerate(ks):
        masks[m, rng.permutation(L)[:k] + off] = True
    return masks


def make_masks(n_windows: int, seq_len: int, n_mc: int, seed: int, protect_first: bool = False) -> np.ndarray:
    """Masks for ``n_windows`` windows: bool ``[n_windows, n_mc, seq_len]``.

    Window ``w`` gets :func:`window_masks` ``(w, ...)``, so a window's masks do not depend on how many
    windows are scored, nor on any model.
    """
    n_windows = _check_int("n_windows", n_windows, 0)
    seq_len = _check_int("seq_len", seq_len, 1)
    n_mc = _check_int("n_mc", n_mc, 1)
    _check_int("seed", seed, 0)
    out = np.zeros((n_windows, n_mc, seq_len), dtype=bool)
    for w in range(n_windows):
        out[w] = window_masks(w, seq_len, n_mc, seed, protect_first)
    return out


def masked_nll(
    logits_fn: LogitsFn,
    windows: np.ndarray,
    *,
    mask_id: int,
    n_mc: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    protect_first: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> NLLResult:
    """Monte-Carlo masked-diffusion NLL bound per token (nats) of ``windows``.

    Args:
        logits_fn: ``ids int64 [b, L] -> float32 [b, L, V]``, aligned (row ``i`` scores token ``i``).
        windows: int64 ``[N, L]`` token windows (e.g. from :func:`text_windows`); they must not
            contain ``mask_id``.
        mask_id: the mask token id.
        n_mc: Monte-Carlo samples per window (mask counts stratified over them).
        seed: mask seed; the masks depend only on it, the window index and the shapes.
        batch_size: rows per ``logits_fn`` call (masked copies, possibly of several windows).
        protect_first: never mask position 0 (Dream, whose aligned row 0 is a dummy).
        progress: optional ``progress(samples_done, total_samples)``, ``total = N * n_mc``.

    Cross-entropies are computed in float64 from the float32 logits with a stable log-softmax.
    """
    w_arr = _as_windows(windows)
    n_mc = _check_int("n_mc", n_mc, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_tokens(w_arr, mask_id, protect_first)
    N, L = w_arr.shape
    L_eff = L - 1 if protect_first else L

    total = N * n_mc
    est = np.zeros(total, dtype=np.float64)
    masks_of = _WindowMasks(L, n_mc, seed, protect_first)
    for start in range(0, total, batch_size):
        flat = np.arange(start, min(start + batch_size, total))
        masks = np.stack([masks_of.sample(int(f)) for f in flat])  # [b, L]: sample f = window f // n_mc
        targets = w_arr[flat // n_mc]  # [b, L]
        ce_sum = _masked_ce_sums(logits_fn, masks, targets, mask_id)
        est[flat] = ce_sum / (masks.sum(axis=1) / L_eff) / L_eff  # sum CE / p_mask / L
        if progress is not None:
            progress(int(flat[-1]) + 1, total)
    return _result(est.reshape(N, n_mc), L_eff)


def _as_windows(windows: np.ndarray) -> np.ndarray:
    """``windows`` as int64 ``[N, L]``, refused when empty or not integers."""
    w_arr = np.asarray(windows)
    if w_arr.ndim != 2 or w_arr.shape[0] < 1 or w_arr.shape[1] < 1:
        raise QdllmError(f"windows must be a non-empty 2-D int array [n_windows, seq_len], got shape {w_arr.shape}")
    if not np.issubdtype(w_arr.dtype, np.integer):
        raise QdllmError(f"windows must hold integer token ids, got dtype {w_arr.dtype}")
    return w_arr.astype(np.int64, copy=False)


def _check_tokens(w_arr: np.ndarray, mask_id: int, protect_first: bool) -> None:
    """Refuse a bad ``mask_id``, windows too short to score, negative ids, and text holding the mask id."""
    if isinstance(mask_id, bool) or not isinstance(mask_id, (int, np.integer)) or mask_id < 0:
        raise QdllmError(f"mask_id must be a non-negative int, got {mask_id!r}")
    if protect_first and w_arr.shape[1] < 2:
        raise QdllmError(f"seq_len {w_arr.shape[1]} is too short: with protect_first at least 2 tokens are needed")
    if w_arr.min() < 0:
        raise QdllmError(f"windows hold a negative token id ({int(w_arr.min())})")
    if (w_arr == mask_id).any():
        raise QdllmError(
            f"the text contains the mask token id {mask_id}; a masked-diffusion model cannot score it "
            "(remove it from the text or check the tokenizer)"
        )


class _WindowMasks:
    """Sample ``f``'s mask (window ``f // n_mc``, sample ``f % n_mc``), one window's masks drawn at a time."""

    def __init__(self, seq_len: int, n_mc: int, seed: int, protect_first: bool):
        self.args = (seq_len, n_mc, seed, protect_first)
        self.window, self.masks = -1, np.zeros((0, seq_len), dtype=bool)

    def sample(self, f: int) -> np.ndarray:
        w, m = divmod(f, self.args[1])
        if w != self.window:
            self.window, self.masks = w, window_masks(w, *self.args)
        return self.masks[m]


def _masked_ce_sums(logits_fn: LogitsFn, masks: np.ndarray, targets: np.ndarray, mask_id: int) -> np.ndarray:
    """float64 ``[b]``: per row, the summed cross-entropy (float64, stable log-softmax) of the masked tokens."""
    ids = np.where(masks, np.int64(mask_id), targets)
    logits = np.asarray(logits_fn(ids))
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise QdllmError(
            f"logits_fn returned shape {logits.shape} for ids of shape {ids.shape}; "
            f"expected ({ids.shape[0]}, {ids.shape[1]}, vocab)"
        )
    V = logits.shape[2]
    if int(targets.max()) >= V:
        raise QdllmError(f"the text has token id {int(targets.max())} but the model's vocabulary has {V} entries")
    rr, cc = np.nonzero(masks)
    sel = logits[rr, cc].astype(np.float64)  # [n_masked, V]
    mx = sel.max(axis=1, keepdims=True)
    if not np.isfinite(mx).all():
        raise QdllmError("logits_fn returned non-finite logits at a masked position")
    lse = mx[:, 0] + np.log(np.exp(sel - mx).sum(axis=1))
    ce = lse - sel[np.arange(sel.shape[0]), targets[rr, cc]]
    if not np.isfinite(ce).all():
        raise QdllmError("non-finite cross-entropy: the model gives probability 0 to a text token")
    return np.bincount(rr, weights=ce, minlength=masks.shape[0])


def _result(per_sample: np.ndarray, L_eff: int) -> NLLResult:
    """The mean and its standard error from float64 ``[N, n_mc]`` per-sample estimates."""
    N, n_mc = per_sample.shape
    per_window = per_sample.mean(axis=1)
    if N >= 2:
        stderr = float(per_window.std(ddof=1) / math.sqrt(N))
    elif n_mc >= 2:
        stderr = float(per_sample[0].std(ddof=1) / math.sqrt(n_mc))
    else:
        stderr = float("nan")
    return NLLResult(nll=float(per_window.mean()), stderr=stderr, n_windows=N, n_tokens=N * L_eff, n_mc=n_mc,
                     per_window=per_window)


def text_windows(ids: np.ndarray, seq_len: int, max_windows: Optional[int] = None) -> np.ndarray:
    """Cut a 1-D token stream into non-overlapping windows: int64 ``[N, seq_len]``.

    ``N = len(ids) // seq_len`` (the tail shorter than a window is dropped), at most ``max_windows``.
    Raises :class:`QdllmError` when the stream is shorter than one window.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise QdllmError(f"token ids must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise QdllmError(f"token ids must be integers, got dtype {arr.dtype}")
    seq_len = _check_int("seq_len", seq_len, 1)
    if max_windows is not None:
        max_windows = _check_int("max_windows", max_windows, 1)
    n = arr.size // seq_len
    if n == 0:
        raise QdllmError(
            f"text is too short: {arr.size} tokens, but one window needs seq_len = {seq_len} tokens "
            f"(use more text or a smaller --seq-len)"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return arr[: n * seq_len].astype(np.int64).reshape(n, seq_len)
