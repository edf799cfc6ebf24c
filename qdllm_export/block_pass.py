"""One transformer block resident: loading it from the checkpoint (the next block read ahead in a thread), running
the calibration activations through it, and collecting its linears' input statistics ``H``. Shared by the
quantization pipeline, ``auto``'s sensitivity pass and ``imatrix``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np
import torch

from formats.errors import QdllmError
from formats.tensors import HFTensors
from qdllm_export.models import SEQUENTIAL_GROUPS, family_module
from qdllm_export.quant import HessianAccumulator
from qdllm_export.timing import phase, start_block

_prefetch: dict[str, Any] = {}  # the next block's tensors being read: {"src", "i", "future"}
_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdllm-prefetch")


def load_block(src: HFTensors, i: int, device: str, pass_name: str = "quantize") -> torch.nn.Module:
    """Block ``i`` of ``src`` in float32 on ``device`` (starts block ``i`` of ``pass_name`` in ``qdllm_export.timing``).
    Block ``i + 1``'s tensors are then read in a background thread (one block of float32 arrays on the host),
    so the next call finds them read while this block was being quantized."""
    start_block(pass_name, i)
    with phase("load"):
        ahead = _prefetch.pop("future", None) if _prefetch.get("src") is src and _prefetch.get("i") == i else None
        _prefetch.clear()
        arrays = ahead.result() if ahead is not None else _read_block(src, i)
        if i + 1 < src.hparams.n_layers:
            _prefetch.update(src=src, i=i + 1, future=_reader.submit(_read_block, src, i + 1))
        return _load_block_weights(src, i, device, arrays)


def _read_block(src: HFTensors, i: int) -> dict[str, np.ndarray]:
    """Canonical name -> float32 array of every tensor of block ``i`` (each read opens its own file handle)."""
    return {name: src.get(name) for name in src.layer_names(i)}


def _load_block_weights(src: HFTensors, i: int, device: str, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    hp = src.hparams
    with torch.device("meta"):  # no random init of weights about to be overwritten (seconds a block at 8B)
        block = family_module(hp).Block(hp)
    block = block.to_empty(device=device).to(torch.float32)
    prefix = hp.spec.layer_prefix.format(i=i)
    hf = hp.spec.hf_names(hp)
    params = dict(block.named_parameters())
    filled = {hf[name][len(prefix):] for name in arrays}
    buffers = [n for n, _ in block.named_buffers()]  # built on meta, a buffer would hold no values
    if filled != set(params) or buffers:
        raise QdllmError(f"block {i}: the checkpoint's tensors and the block's parameters differ in "
                         f"{sorted(filled ^ set(params)) + buffers}; this is a bug of the family table, please report it")
    for name, arr in arrays.items():
        with torch.no_grad():
            params[hf[name][len(prefix):]].copy_(torch.from_numpy(arr))
    return block.eval()


@contextmanager
def tf32(on: bool) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 (``on``) or in full float32 inside the block; the previous setting after it."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def fast(x: torch.Tensor):
    """The calibration forwards' matmul precision: TF32 on CUDA (activations only, a relative error of about
    1e-3, far below a 2-4 bit weight's), unchanged elsewhere."""
    return tf32(True) if x.is_cuda else nullcontext()


# ``H += X^T X`` on CUDA with TF32 products and float32 accumulation: inputs rounded to 10 mantissa bits, the
# precision of GPTQ's own H (fp16 activations, float32 accumulation) and of the TF32 forwards that made X;
# 4.5x faster on an H100 (a 16384 x 12288 batch: 91 -> 20 ms). False: full float32 products. CPU: no effect.
HESSIAN_TF32 = True


@torch.no_grad()
def run_block(block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int,
               keep: bool = True) -> torch.Tensor | None:
    """``block`` over ``x [N, L, d]`` in batches; writes the outputs into ``x`` in place unless ``keep`` is False."""
    with fast(x), phase("forward"):
        for s in range(0, x.shape[0], batch):
            y = block(x[s : s + batch], cos, sin)
            if keep:
                x[s : s + batch] = y
    return x if keep else None


class _AllSeen(Exception):
    """Ends a Hessian pass over one batch once every linear of interest has seen its input."""


@torch.no_grad()
def collect_hessians(block: torch.nn.Module, roles: tuple[str, ...] | list[str], x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """``H [n_in, n_in]`` of each linear in ``roles`` of ``block``, from its inputs over ``x [N, L, d]``. Each
    batch runs only as far into the block as the last of ``roles`` (the o / gate-up passes skip the rest). A
    mixture's starved experts get the calibration fill (``models.llada_moe.FILL_SHARE``) in this pass only."""
    linears = block.linears()
    src = {r: input_source(r, roles) for r in roles}  # linears of a group read one input: one H for them
    acc = {s: HessianAccumulator(linears[s].in_features, device=x.device) for s in set(src.values())}
    pending: set[str] = set()

    def seen(r: str, inp: tuple[torch.Tensor, ...]) -> None:
        if src[r] == r:
            with tf32(HESSIAN_TF32), phase("hessian"):
                acc[r].add_batch(inp[0])
        pending.discard(r)
        if not pending:
            raise _AllSeen

    hooks = [linears[r].register_forward_hook(lambda mod, inp, out, r=r: seen(r, inp)) for r in roles]
    try:
        with fast(x), phase("forward"), _filling(block):
            for s in range(0, x.shape[0], batch):
                pending.update(roles)
                try:
                    block(x[s : s + batch], cos, sin)
                except _AllSeen:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {r: acc[src[r]].H for r in roles}


@contextmanager
def _filling(block: torch.nn.Module) -> Iterator[None]:
    """The calibration fill of a mixture's ``block.mlp`` on (nothing for a dense block)."""
    mlp = getattr(block, "mlp", None)
    if not hasattr(mlp, "fill"):
        yield
        return
    mlp.fill = True
    try:
        yield
    finally:
        mlp.fill = False


def input_source(role: str, roles: tuple[str, ...] | list[str]) -> str:
    """The first of ``roles`` in ``role``'s true-sequential group (it reads the same input), else ``role``."""
    group = next((g for g in SEQUENTIAL_GROUPS if role in g), (role,))
    return next(r for r in group if r in roles)
