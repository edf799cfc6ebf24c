"""The qdllm GGUF layout: key and tensor names, the Q1_0 plane codec and llama.cpp's Q/K permutation.

Shared by the writer (``formats.gguf``) and the reader (``formats.gguf_read``); the layout is
documented for kernel authors in ``docs/gguf-format.md``. NumPy only.

A quantized linear ``W`` (llama.cpp name, e.g. ``blk.0.attn_q.weight``; ``n_out`` rows, ``n_in``
columns, group ``G``, ``nb = n_in / G`` blocks, ``K_j`` planes in block ``j``) is stored as::

    W.qdllm.nplanes   I8    ne {nb}             K_j
    W.qdllm.plane{k}  Q1_0  ne {n_k*G, n_out}   plane k of the blocks with K_j > k (ascending),
                                                d = that plane's row scale
    W.qdllm.cscale{k} F16   ne {G, n_k}         column scales of those planes
    W.qdllm.mu        F16   ne {nb, n_out}      optional per-row, per-block offset

with ``n_k = #{j : K_j > k}`` and ``k = 0 .. max_j K_j - 1``.
"""

from __future__ import annotations

import numpy as np

from formats.errors import QdllmError
from formats.qtensor import QuantizedTensor

FORMAT_VERSION = 1
QK1_0 = 128  # elements per ggml Q1_0 block
Q1_0_BYTES = 18  # f16 d + 16 bytes of sign bits
Q1_0_TYPE = 41  # GGMLQuantizationType.Q1_0

SUFFIX = ".qdllm."
NPLANES = SUFFIX + "nplanes"
MU = SUFFIX + "mu"


def split_qdllm_name(name: str) -> tuple[str, str] | None:
    """``("blk.0.attn_q.weight", "plane1")`` for a plane-part tensor name, else None."""
    if SUFFIX not in name:
        return None
    base, _, part = name.partition(SUFFIX)
    return base, part


# ---------------------------------------------------------------------------- permutation
def qk_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's ``permute(w, n_head, n_head_kv)`` (convert_hf_to_gguf.py, LLaDA).

    ``permuted = w[perm]``: within each head, rows ``(first half i, second half i)`` become the
    interleaved pair ``(2i, 2i+1)``, turning HF rotate-half RoPE into ggml's NORM RoPE.
    """
    if n_rows % n_head or (n_rows // n_head) % 2:
        raise QdllmError(f"cannot permute {n_rows} rows into {n_head} heads of even size")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def permuted_roles(family_rope: str) -> dict[str, str]:
    """Role -> which head count permutes it ('q' uses n_heads, 'k' n_kv_heads), for NORM-rope families."""
    if family_rope != "norm":
        return {}
    return {"attn_q.weight": "q", "attn_k.weight": "k", "attn_q.bias": "q", "attn_k.bias": "k"}


def row_permutation(hp, name: str) -> np.ndarray | None:
    """The llama.cpp row permutation of tensor ``name`` of a model ``hp`` (None: not permuted)."""
    if not name.startswith("blk."):
        return None
    which = permuted_roles(hp.spec.gguf_rope).get(name.split(".", 2)[2])
    if which is None:
        return None
    heads = hp.n_heads if which == "q" else hp.n_kv_heads
    return qk_permutation(heads * hp.head_dim, heads)


def permute_tensor(t, perm: np.ndarray | None):
    if perm is None:
        return t
    if hasattr(t, "permute_rows"):  # any stored kind (formats.stored): planes, ggml rows of blocks, ...
        return t.permute_rows(perm)
    return np.ascontiguousarray(np.asarray(t)[perm])


# ---------------------------------------------------------------------------- Q1_0 codec
def q1_0_encode(signs: np.ndarray, d: np.ndarray, group_size: int) -> np.ndarray:
    """Pack one order's planes as Q1_0 rows.

    ``signs [n_k, n_out, G/8]`` uint8 (LSB first), ``d [n_k, n_out]`` float16 -> uint8
    ``[n_out, n_k * G/128 * 18]``: per row, per block, per 128 columns: ``f16 d`` then 16 sign bytes.
    """
    n_k, n_out, _ = signs.shape
    sub = group_size // QK1_0
    out = np.empty((n_out, n_k, sub, Q1_0_BYTES), np.uint8)
    dd = np.ascontiguousarray(d.T.astype("<f2")).view(np.uint8).reshape(n_out, n_k, 1, 2)
    out[..., :2] = dd
    out[..., 2:] = signs.transpose(1, 0, 2).reshape(n_out, n_k, sub, QK1_0 // 8)
    return out.reshape(n_out, n_k * sub * Q1_0_BYTES)


def q1_0_decode(raw: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Inverse of ``q1_0_encode``: (signs ``[n_k, n_out, G/8]``, d ``[n_k, n_out]`` f16, consistent).

    ``consistent`` is False when the ``G/128`` Q1_0 blocks of one group carry different ``d``.
    """
    n_out, nbytes = raw.shape
    sub = group_size // QK1_0
    n_k = nbytes // (sub * Q1_0_BYTES)
    blocks = np.asarray(raw).reshape(n_out, n_k, sub, Q1_0_BYTES)
    d_all = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0]  # [n_out, n_k, sub]
    consistent = bool((d_all.view(np.uint16) == d_all[..., :1].view(np.uint16)).all())
    signs = np.ascontiguousarray(blocks[..., 2:].reshape(n_out, n_k, group_size // 8).transpose(1, 0, 2))
    d = np.ascontiguousarray(d_all[..., 0].T).astype(np.float16)
    return signs, d, consistent


def dequantize_q1_0(raw: np.ndarray) -> np.ndarray:
    """A plain ggml Q1_0 tensor (uint8 ``[rows, nblk*18]``) as float32 ``[rows, nblk*128]``: w = d*(2b-1)."""
    rows, nbytes = raw.shape
    blocks = np.asarray(raw).reshape(rows, nbytes // Q1_0_BYTES, Q1_0_BYTES)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)  # [rows, nblk, 1]
    bits = np.unpackbits(blocks[..., 2:], axis=-1, bitorder="little").astype(np.float32)
    return (d * (2.0 * bits - 1.0)).reshape(rows, -1)


def encode_planes(q: QuantizedTensor) -> list[tuple[str, np.ndarray]]:
    """The plane-part tensors of ``q`` as (suffix, array) in file order.

    Arrays: ``nplanes`` int8, ``plane{k}`` uint8 Q1_0 bytes, ``cscale{k}`` and ``mu`` float16.
    """
    g = q.group_size
    if g % QK1_0:
        raise QdllmError(
            f"quantized tensor {q.name or '<unnamed>'}: group size {g} is not a multiple of {QK1_0}, so its planes "
            f"are not ggml Q1_0 rows; quantize with --group-size 128 (or write outtype f16/f32)"
        )
    out: list[tuple[str, np.ndarray]] = [(NPLANES, q.planes.astype(np.int8))]
    for k, (_, sl) in enumerate(q.order_slices()):
        out.append((f"{SUFFIX}plane{k}", q1_0_encode(q.signs[sl], q.row_scale[sl], g)))
        out.append((f"{SUFFIX}cscale{k}", np.ascontiguousarray(q.col_scale[sl], dtype=np.float16)))
    if q.mu is not None:
        out.append((MU, np.ascontiguousarray(q.mu, dtype=np.float16)))
    return out


def plane_shapes(n_out: int, n_in: int, g: int, planes: np.ndarray, has_mu: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Suffix -> (ggml type name, numpy element shape) of every part of a quantized linear."""
    nb = n_in // g
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {NPLANES: ("I8", (nb,))}
    for k in range(int(planes.max(initial=0))):
        n_k = int((planes > k).sum())
        shapes[f"{SUFFIX}plane{k}"] = ("Q1_0", (n_out, n_k * g))
        shapes[f"{SUFFIX}cscale{k}"] = ("F16", (n_k, g))
    if has_mu:
        shapes[MU] = ("F16", (n_out, nb))
    return shapes
