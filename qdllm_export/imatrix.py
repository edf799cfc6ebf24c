"""An importance matrix for ``llama-quantize --imatrix``, from MCS-masked activations of the float model.

llama.cpp's ``llama-imatrix`` runs plain text through the model, so a diffusion model's weights are
weighted by activations it never sees while denoising (no mask tokens). Here the calibration windows are
masked as the model sees them (MCS, ``qdllm_export.calib``) and streamed block by block like the
quantization pipeline (one float block resident): for every block linear and the LM head,
``in_sum2[j] = sum over tokens of x_j^2`` (its input column ``j``) and ``counts = tokens``. The file
format is ``formats.imatrix``. A mixture's experts are counted as llama-imatrix counts them: only the tokens routed
to each (no calibration fill), one entry per layer's stacked tensor (``blk.N.ffn_gate_exps.weight``) with a row
of ``in_sum2`` and a count per expert (0 for an expert no token reached: llama-quantize then weighs it evenly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from formats.imatrix import Imatrix, model_fingerprint
from formats.tensors import HFTensors
from qdllm_export.calib import DEFAULT_CALIB, CalibConfig

OnLayer = Callable[[int, int, str], None]


class _SquareSums:
    """Forward hooks accumulating ``sum x^2`` per input column (float64) and the row count of each linear."""

    def __init__(self, modules: dict[str, torch.nn.Linear], device: torch.device):
        self.sums = {r: torch.zeros(m.in_features, dtype=torch.float64, device=device) for r, m in modules.items()}
        self.rows = {r: 0 for r in modules}
        self.hooks = [m.register_forward_hook(self._hook(r)) for r, m in modules.items()]

    def _hook(self, role: str):
        def add(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1])
            self.sums[role] += x.double().square().sum(0)
            self.rows[role] += x.shape[0]
        return add

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def collect_imatrix(model_dir: str | Path, ccfg: CalibConfig, *, device: str = "cpu", batch: int = 8,
                    on_layer: OnLayer | None = None) -> Imatrix:
    """The imatrix of the float checkpoint at ``model_dir`` on the calibration windows of ``ccfg``
    (``ccfg.mcs``: MCS-masked, else plain text as llama-imatrix sees it)."""
    from qdllm_export.block_pass import load_block, run_block
    from qdllm_export.pipeline import _calibration

    model_dir = Path(model_dir)
    src = HFTensors(model_dir)
    hp = src.hparams
    calib = _calibration(src, model_dir, ccfg, device, batch)
    im = Imatrix(datasets=[str(ccfg.path or DEFAULT_CALIB)], chunk_count=ccfg.n_samples, chunk_size=ccfg.seq_len,
                 model=str(model_dir), fingerprint=model_fingerprint(src))
    for i in range(hp.n_layers):
        if on_layer:
            on_layer(i, hp.n_layers + 1, f"block {i}")
        block = load_block(src, i, device)
        acc = _SquareSums(block.linears(), calib.x.device)
        try:
            run_block(block, calib.x, calib.cos, calib.sin, batch)  # x becomes the next block's input
        finally:
            acc.remove()
        _put_block(im, hp, i, acc)
        del block
    if on_layer:
        on_layer(hp.n_layers, hp.n_layers + 1, "output")
    w = torch.from_numpy(src.get("output_norm.weight")).to(calib.x.device)
    sums = torch.zeros(hp.d_model, dtype=torch.float64, device=calib.x.device)
    for s in range(0, calib.x.shape[0], batch):
        h = calib.x[s : s + batch]
        h = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + hp.norm_eps))  # the head's input (RMSNorm)
        sums += h.reshape(-1, hp.d_model).double().square().sum(0)
    _put(im, "output.weight", sums, calib.x.shape[0] * calib.x.shape[1])
    return im


def _put(im: Imatrix, name: str, sums: torch.Tensor, rows: int) -> None:
    im.in_sum2[name] = sums.cpu().numpy().astype(np.float32)[None]
    im.counts[name] = np.array([rows], dtype=np.float32)


def _put_block(im: Imatrix, hp, i: int, acc: _SquareSums) -> None:
    """Block ``i``'s entries: one per dense linear; one per stacked expert tensor, experts in order."""
    from formats.tensors import expert_of

    stacked: dict[str, list[tuple[int, str]]] = {}
    for r in acc.sums:
        name = f"blk.{i}.{r}.weight"
        ex = expert_of(hp, name)
        if ex is None:
            _put(im, name, acc.sums[r], acc.rows[r])
        else:
            stacked.setdefault(ex[0], []).append((ex[1], r))
    for name, experts in stacked.items():
        roles = [r for _, r in sorted(experts)]
        im.in_sum2[name] = torch.stack([acc.sums[r] for r in roles]).cpu().numpy().astype(np.float32)
        im.counts[name] = np.array([acc.rows[r] for r in roles], dtype=np.float32)


def canonical_importance(im: Imatrix, model_dir: str | Path) -> dict[str, np.ndarray]:
    """Canonical linear name (an expert's own, ``blk.N.ffn_gate_exps.X.weight``) -> float32 ``[n_in]`` importance
    of ``im`` (llama.cpp names: an expert is a row of its layer's stacked entry), for the names ``im`` holds."""
    from formats.families import read_config
    from formats.tensors import canonical_names, expert_of, is_linear

    _, hp, _ = read_config(Path(model_dir))
    rows = {name: im.importances(name) for name in im.in_sum2}  # each entry once, not once per expert
    out = {}
    for n in [n for n in canonical_names(hp) if is_linear(hp, n)] + ["output.weight"]:
        name, mat = expert_of(hp, n) or (n, 0)
        if name in rows:
            out[n] = rows[name][mat]
    return out


def model_widths(model_dir: str | Path) -> dict[str, int]:
    """llama.cpp name -> n_in of every weight an imatrix of this model holds (block linears, a mixture's experts as
    their layer's stacked tensor, ``output.weight``)."""
    from formats.families import read_config
    from formats.tensors import canonical_names, canonical_shape, expert_of, is_linear

    _, hp, _ = read_config(Path(model_dir))
    out = {(expert_of(hp, n) or (n,))[0]: canonical_shape(hp, n)[1] for n in canonical_names(hp) if is_linear(hp, n)}
    out["output.weight"] = hp.d_model
    return out
