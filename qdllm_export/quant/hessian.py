"""Layer-input statistics and the GPTQ inverse-Hessian factor shared by GPTQ and Quant-dLLM."""

from __future__ import annotations

import torch

from formats.errors import QdllmError


class HessianAccumulator:
    """Running average ``H = (2/N) sum_t x_t x_t^T`` over every input vector ``x_t`` seen so far.

    ``add_batch(x)`` takes ``x [..., n_in]`` (any float dtype, any device); all leading dimensions
    are flattened into vectors and ``N`` counts vectors (tokens). Same update as GPTQ's ``add_batch``
    (``H *= n/(n+b); H += 2/(n+b) X^T X``) except that GPTQ counts sequences, not tokens; every use
    of ``H`` here (damping, weighting, relative errors) is invariant to that overall scale.

    ``H`` lives on the device of ``device`` or, if not given, of the first batch, in ``dtype``
    (float32 as GPTQ by default; float64 for long runs or exact tests).
    """

    def __init__(self, n_in: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if n_in <= 0:
            raise QdllmError(f"HessianAccumulator: n_in must be positive, got {n_in}")
        if dtype not in (torch.float32, torch.float64):
            raise QdllmError(f"HessianAccumulator: dtype must be float32 or float64, got {dtype}")
        self.n_in = int(n_in)
        self.dtype = dtype
        self.count = 0
        self._H: torch.Tensor | None = None
        if device is not None:
            self._H = torch.zeros(n_in, n_in, dtype=dtype, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n_in:
            raise QdllmError(f"HessianAccumulator: input has {x.shape[-1]} features, expected {self.n_in}")
        x = x.detach().reshape(-1, self.n_in)
        b = x.shape[0]
        if b == 0:
            return
        if self._H is None:
            self._H = torch.zeros(self.n_in, self.n_in, dtype=self.dtype, device=x.device)
        x = x.to(device=self._H.device, dtype=self.dtype)
        n = self.count
        self._H.mul_(n / (n + b))
        x = x * (2.0 / (n + b)) ** 0.5
        self._H.addmm_(x.t(), x)
        self.count = n + b

    @property
    def H(self) -> torch.Tensor:
        if self._H is None or self.count == 0:
            raise QdllmError("HessianAccumulator: no batch was added")
        return self._H


def inverse_hessian_factor(H: torch.Tensor, W: torch.Tensor, percdamp: float, name: str = "") -> torch.Tensor:
    """GPTQ preprocessing: returns ``U`` (float32, upper) with ``U^T U = (H + damp I)^-1``.

    Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weight column zeroed IN PLACE in ``W``
    (their input is always zero, so the column never matters). ``damp = percdamp * mean(diag H)``.
    The factorisation runs in float64 for robustness; ``H`` itself is not modified.
    """
    Hd = H.detach().to(dtype=torch.float64, copy=True)
    dead = torch.diag(Hd) == 0
    if bool(dead.any()):
        Hd[dead, dead] = 1.0
        W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(Hd))
    Hd.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        raise QdllmError(
            f"tensor {name or '<unnamed>'}: the layer-input Hessian is not positive definite even after "
            f"damping {percdamp}; raise percdamp or use more calibration data"
        )
    del Hd
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if int(info) != 0:
        raise QdllmError(f"tensor {name or '<unnamed>'}: Cholesky of the inverse Hessian failed; raise percdamp")
    return U.to(torch.float32)
