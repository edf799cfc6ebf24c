"""Helpers of the ONNX tests (no tests here): random quantized models and the NumPy reference.

The reference is ``runtime_ref.forward.forward`` (NumPy, dequantizes each weight with
``QuantizedTensor.dequantize()``), independent of the ONNX graph.
"""

from __future__ import annotations

import numpy as np

from formats.families import HParams
from formats.qtensor import QuantizedTensor
from formats.tensors import DictTensors, canonical_names, canonical_shape, is_linear

PLANE_PATTERNS = ([1, 2, 3], [2, 2, 1, 3], [3, 1], [2], [1, 3, 2, 0, 2])


def random_qtensor(rng: np.random.Generator, n_out: int, n_in: int, *, group_size: int = 128, pattern=(1, 2, 3),
                   mu: bool = False, scale: float = 0.03, name: str = "") -> QuantizedTensor:
    """Random binary planes; block j gets ``pattern[j % len(pattern)]`` planes."""
    nb = n_in // group_size
    planes = np.array([pattern[j % len(pattern)] for j in range(nb)], np.uint8)
    p = int(planes.sum())
    signs = rng.integers(0, 256, (p, n_out, group_size // 8), dtype=np.uint8)  # random packed sign bits
    rs = (np.abs(rng.standard_normal((p, n_out))) * scale + 1e-3).astype(np.float16)
    cs = rng.uniform(0.5, 1.5, (p, group_size)).astype(np.float16)
    m = (rng.standard_normal((n_out, nb)) * scale * 0.5).astype(np.float16) if mu else None
    return QuantizedTensor((n_out, n_in), group_size, planes, signs, rs, cs, m, name=name, meta={"method": "random"})


def quantize_source(source, seed: int = 0, *, group_size: int = 128, mu_every: int = 3, scale: float = 0.03) -> DictTensors:
    """``source`` with every block linear replaced by a random ``QuantizedTensor`` (planes patterns
    cycle through ``PLANE_PATTERNS``; every ``mu_every``-th linear has ``mu``)."""
    hp: HParams = source.hparams
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(canonical_names(hp)):
        if is_linear(hp, name):
            n_out, n_in = canonical_shape(hp, name)
            out[name] = random_qtensor(rng, n_out, n_in, group_size=group_size, pattern=PLANE_PATTERNS[i % len(PLANE_PATTERNS)],
                                       mu=(mu_every > 0 and i % mu_every == 0), scale=scale, name=name)
        else:
            out[name] = np.asarray(source.get(name), np.float32)
    src = DictTensors(hp, out)
    src.config = getattr(source, "config", None)
    src.folder = getattr(source, "folder", None)
    return src


def random_quantized_model(hp: HParams, seed: int = 0, *, mu_every: int = 0, group_size: int = 128) -> DictTensors:
    """A model of random quantized linears and random float embeddings / norms / head (no checkpoint)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(canonical_names(hp)):
        shape = canonical_shape(hp, name)
        if is_linear(hp, name):
            out[name] = random_qtensor(rng, *shape, pattern=PLANE_PATTERNS[i % 3], mu=(mu_every > 0 and i % mu_every == 0),
                                       group_size=group_size, name=name)
        elif name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return DictTensors(hp, out)


def reference_logits(source, ids: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None) -> np.ndarray:
    """Raw (unshifted) float32 logits of the NumPy reference forward."""
    from runtime_ref.forward import forward

    return forward(source, ids, rope="neox", attn_mask=mask, positions=positions)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
