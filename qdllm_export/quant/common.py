"""Helpers shared by the matrix quantizers: input checks, sign packing in torch, plane assembly."""

from __future__ import annotations

import numpy as np
import torch

from formats.errors import QdllmError
from formats.qtensor import QuantizedTensor

FP16_MAX = 65504.0


def tensor_label(name: str) -> str:
    return f"tensor {name}" if name else "tensor <unnamed>"


def check_weight(W: torch.Tensor, group_size: int, name: str) -> None:
    if not isinstance(W, torch.Tensor):
        raise QdllmError(f"{tensor_label(name)}: expected a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise QdllmError(f"{tensor_label(name)}: expected a 2-D weight [n_out, n_in], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise QdllmError(f"{tensor_label(name)}: expected a floating-point weight, got {W.dtype}")
    n_out, n_in = W.shape
    if n_out == 0 or n_in == 0:
        raise QdllmError(f"{tensor_label(name)}: empty weight of shape {tuple(W.shape)}")
    if n_in % group_size:
        raise QdllmError(
            f"{tensor_label(name)}: n_in={n_in} is not divisible by the group size {group_size}; "
            "choose a group size that divides it or keep this tensor unquantized"
        )
    if not bool(torch.isfinite(W).all()):
        raise QdllmError(f"{tensor_label(name)}: the weight holds NaN or inf values")


def check_hessian(H: torch.Tensor | None, n_in: int, name: str) -> None:
    if H is None:
        return
    if not isinstance(H, torch.Tensor) or H.shape != (n_in, n_in):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise QdllmError(f"{tensor_label(name)}: Hessian has shape {shape}, expected {(n_in, n_in)}")
    if not bool(torch.isfinite(H).all()):
        raise QdllmError(f"{tensor_label(name)}: the Hessian holds NaN or inf values")


def check_planes(planes: np.ndarray, n_blocks: int, name: str) -> np.ndarray:
    p = np.asarray(planes)
    if p.shape != (n_blocks,):
        raise QdllmError(f"{tensor_label(name)}: planes has shape {p.shape}, expected ({n_blocks},)")
    if not np.issubdtype(p.dtype, np.integer) or p.min() < 1 or p.max() > 8:
        raise QdllmError(f"{tensor_label(name)}: planes per block must be integers in 1..8, got {p.tolist()}")
    return p.astype(np.uint8)


def to_fp16_checked(x: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """Round to fp16 (returned as float32 holding fp16 values); error if it overflows."""
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > FP16_MAX:
        raise QdllmError(f"{tensor_label(name)}: {what} overflows float16 (|value| > {FP16_MAX}); weights too large")
    return x.to(torch.float16).to(torch.float32)


def pack_signs_torch(b: torch.Tensor) -> torch.Tensor:
    """``b [..., G]`` bool (True = +1) -> ``[..., G // 8]`` uint8, LSB first (as formats.qtensor.pack_signs)."""
    shp = b.shape
    x = b.reshape(*shp[:-1], shp[-1] // 8, 8).to(torch.uint8)
    w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=b.device)
    return (x * w).sum(-1).to(torch.uint8)


class PlaneCollector:
    """Collects per-block planes (on any device), moves them to the CPU and assembles a QuantizedTensor."""

    def __init__(self, shape: tuple[int, int], group_size: int, planes: np.ndarray):
        self.shape = shape
        self.group_size = group_size
        self.planes = planes.astype(np.uint8)
        self.blocks: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None] = [None] * len(planes)

    def add_block(self, j: int, rs: torch.Tensor, cs: torch.Tensor, pos: torch.Tensor) -> None:
        """Block ``j``: row scales ``rs [K, n_out]``, column scales ``cs [K, G]`` (fp16-representable),
        signs ``pos [K, n_out, G]`` bool (True = +1), order 0 first."""
        K = int(self.planes[j])
        if rs.shape[0] != K or cs.shape[0] != K or pos.shape[0] != K:
            raise AssertionError(f"block {j}: got {rs.shape[0]} planes, expected {K}")
        packed = pack_signs_torch(pos).cpu().numpy()
        rs16 = rs.to(torch.float16).cpu().numpy()
        cs16 = cs.to(torch.float16).cpu().numpy()
        self.blocks[j] = [(packed[k], rs16[k], cs16[k]) for k in range(K)]

    def build(self, mu: np.ndarray | None, name: str, meta: dict) -> QuantizedTensor:
        signs, rss, css = [], [], []
        for k in range(int(self.planes.max())):
            for j in range(len(self.planes)):
                if self.planes[j] > k:
                    s, r, c = self.blocks[j][k]
                    signs.append(s)
                    rss.append(r)
                    css.append(c)
        return QuantizedTensor(
            shape=self.shape,
            group_size=self.group_size,
            planes=self.planes.copy(),
            signs=np.ascontiguousarray(np.stack(signs)),
            row_scale=np.ascontiguousarray(np.stack(rss)),
            col_scale=np.ascontiguousarray(np.stack(css)),
            mu=mu,
            name=name,
            meta=meta,
        )


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
    """``(tr(D H D^T), tr(W H W^T))`` with ``D = W - W_hat``, in float64, row-chunked to bound memory."""
    Hd = H.to(torch.float64)
    num = den = 0.0
    for r in range(0, W.shape[0], chunk):
        w = W[r : r + chunk].to(torch.float64)
        d = w - W_hat[r : r + chunk].to(torch.float64)
        num += float(((d @ Hd) * d).sum())
        den += float(((w @ Hd) * w).sum())
    return num, den
