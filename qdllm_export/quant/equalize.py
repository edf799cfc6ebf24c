"""Function-preserving equalization: per-input-channel scales moved from a linear's input into its weight
(AWQ / SmoothQuant style) before any grid is fitted, folded exactly into the tensor before it.

A *site* is a group of linears reading one input and the tensor that makes that input:

===============  ======================  =============================================================
site             linears (columns * s)   folded into (divided by s)
===============  ======================  =============================================================
``attn_norm``    attn_q, attn_k, attn_v  the RMSNorm weight ``attn_norm`` (the input is ``norm(x) * g``)
``ffn_norm``     ffn_gate, ffn_up        the RMSNorm weight ``ffn_norm``
``attn_v``       attn_output             the rows (and bias) of attn_v (attention mixes v linearly)
``ffn_up``       ffn_down                the rows of ffn_up (``silu(gate) * up`` is linear in up)
===============  ======================  =============================================================

In a mixture (``llada-moe``) the ``ffn_norm`` site scales every expert's gate and up, and the router's columns (the
router reads the same input and stays in high precision: scaled, not fitted); each expert's down is a site of its
own (``ffn_up_exps.X``), folded into that expert's up. A site whose linears saw no calibration token keeps s = 1.

For each site, ``s = mean|x|^alpha / mean|W|^(1 - alpha)`` (normalised to geometric mean 1) over a grid of
``alpha``, and ``s = 1`` (no change, listed as alpha 0) beside them, each candidate scored by the output error
``tr(dW H dW^T)`` of the site's linears as the target fits them; the least wins. With grouped-query attention the ``attn_v`` site's scale is
shared by the query heads reading one kv head. The float block's outputs are unchanged up to float32 rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

ALPHAS = (0.0, 0.25, 0.5, 0.75)
SITES = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "ffn_norm": ("ffn_gate", "ffn_up"),
         "attn_v": ("attn_output",), "ffn_up": ("ffn_down",)}


def sites(block: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Site -> the roles of the linears it scales: ``SITES`` for a dense block; a mixture's per the module doc."""
    linears = block.linears()
    if "ffn_gate" in linears:
        return SITES
    experts = [r.split(".")[1] for r in linears if r.startswith("ffn_down_exps.")]
    return {"attn_norm": SITES["attn_norm"], "attn_v": SITES["attn_v"],
            "ffn_norm": tuple(f"ffn_{p}_exps.{x}" for x in experts for p in ("gate", "up")),
            **{f"ffn_up_exps.{x}": (f"ffn_down_exps.{x}",) for x in experts}}


def _router(block: torch.nn.Module) -> torch.nn.Linear | None:
    """A mixture's router (it reads the ``ffn_norm`` site's input); None for a dense block."""
    mlp = getattr(block, "mlp", None)
    return mlp.gate if hasattr(mlp, "experts") else None


@torch.no_grad()
def input_stats(block: torch.nn.Module, run: Callable[[], None]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site: (mean |x_j| ``[n_in]``, ``H [n_in, n_in]``) of its linears' input over one ``run()`` of the block
    (a mixture's ``ffn_norm`` site: the router's input, every token; a site no token reached is left out)."""
    linears = block.linears()
    readers = {site: linears[roles[0]] for site, roles in sites(block).items()}
    if _router(block) is not None:
        readers["ffn_norm"] = _router(block)
    acc: dict[str, list[Any]] = {}

    def hook(site: str, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float32)
        a = acc.setdefault(site, [torch.zeros(x.shape[1], device=x.device, dtype=torch.float64),
                                  torch.zeros(x.shape[1], x.shape[1], device=x.device), 0])
        a[0] += x.abs().sum(0).double()
        a[1] += x.T @ x
        a[2] += x.shape[0]

    hooks = [m.register_forward_hook(lambda m, i, o, s=s: hook(s, i)) for s, m in readers.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {s: ((a[0] / a[2]).float(), a[1] / a[2]) for s, a in acc.items() if a[2] > 0}


def _scales(xmean: torch.Tensor, W: torch.Tensor, alpha: float, group: int | None) -> torch.Tensor:
    """``[n_in]`` scales of one candidate ``alpha`` (0: all ones, the no-change candidate); ``group``: columns that
    must share a scale (GQA heads)."""
    if alpha == 0.0:
        return torch.ones_like(xmean)
    w = (W.abs() / W.abs().amax(1, keepdim=True).clamp_min(1e-12)).mean(0)
    s = xmean.clamp_min(1e-6).pow(alpha) / w.clamp_min(1e-6).pow(1.0 - alpha)
    if group is not None:
        s = group_mean(s, *group)
    return s / s.log().mean().exp()


def group_mean(s: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Mean of ``s`` over the query heads sharing each kv head, spread back to ``[n_heads * head_dim]``."""
    hd = s.numel() // n_heads
    m = s.view(n_kv, n_heads // n_kv, hd).mean(1, keepdim=True)
    return m.expand(n_kv, n_heads // n_kv, hd).reshape(-1)


@torch.no_grad()
def equalize_block(block: torch.nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   fit: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Choose and fold each site's scales into ``block`` in place; returns site -> chosen alpha.

    ``fit(role, W, H) -> W_hat``: the target's fit of one linear (used to score the candidates)."""
    linears, norms = block.linears(), block.norms()
    nh, nkv = block.n_heads, block.n_kv_heads
    chosen = {}
    for site, roles in sites(block).items():
        if site not in stats:
            continue
        xmean, H = stats[site]
        Ws = [linears[r].weight.detach().to(torch.float32) for r in roles]
        group = (nh, nkv) if site == "attn_v" else None
        best, best_s = None, None
        for alpha in ALPHAS:
            s = _scales(xmean, torch.cat(Ws), alpha, group)
            Hs = H / s[:, None] / s[None, :]
            err = 0.0
            for r, W in zip(roles, Ws):
                D = fit(r, W * s, Hs) - W * s
                err += float(torch.einsum("ij,jk,ik->", D, Hs, D))
            if best is None or err < best:
                best, best_s, chosen[site] = err, s, alpha
        if chosen[site] != 0.0:
            fold(block, site, roles, best_s, linears, norms)
    return chosen


def folded_floats(block: torch.nn.Module, alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Short name (``attn_norm``, ``ffn_norm``, ``ffn_gate_inp``: the router) -> weight, of each tensor of ``block``
    kept in float (not a quantized linear) that the folds of ``alphas`` changed."""
    out = {site: block.norms()[site].weight for site in ("attn_norm", "ffn_norm") if alphas.get(site, 0.0) != 0.0}
    if "ffn_norm" in out and _router(block) is not None:
        out["ffn_gate_inp"] = _router(block).weight
    return out


def fold(block: torch.nn.Module, site: str, roles: tuple[str, ...], s: torch.Tensor,
         linears: dict[str, torch.nn.Linear], norms: dict[str, torch.nn.Module]) -> None:
    """``s`` into the columns of the site's linears ``roles`` and out of the tensor before them (the module table)."""
    for r in roles:
        linears[r].weight.mul_(s[None, :])
    if site in norms:
        norms[site].weight.div_(s)
        if site == "ffn_norm" and _router(block) is not None:
            _router(block).weight.mul_(s[None, :])
        return
    src = linears[site]
    rows = s if site.startswith("ffn_up") else s.view(block.n_kv_heads, block.n_heads // block.n_kv_heads, -1)[:, 0].reshape(-1)
    src.weight.div_(rows[:, None])
    if src.bias is not None:
        src.bias.div_(rows)
