"""Which grid quantizes a linear when a ggml type is asked for: the registry of every type (ours and
ggml's own encoder through libggml), llama-quantize's fallback for row lengths a type's block does not
divide, and plain fp16 as the last resort."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from formats.errors import QdllmError
from formats.ggml_tensor import GGMLTensor
from qdllm_export.grids.ggml import SPECS, GGMLGrid, fp16
from qdllm_export.grids.lattice import LatticeGrid
from qdllm_export.grids.libggml import LATTICE, LibGGMLGrid


class F16Grid:
    """Plain fp16 (``F16``), the last fallback: one block of the whole row, rounded at once."""

    ggml_type = "F16"

    def __init__(self, n_in: int):
        self.name, self.block, self.unit = "f16", int(n_in), int(n_in)

    def bits_per_weight(self, n_in: int) -> float:
        return 16.0

    def init(self, Wb: torch.Tensor, imp: torch.Tensor | None) -> dict:
        return {}

    def round(self, st: dict, c: int, w: torch.Tensor) -> torch.Tensor:
        st["w"] = fp16(w)
        return st["w"]

    def refit(self, st: dict, T: torch.Tensor, imp: torch.Tensor | None, refit: bool) -> torch.Tensor:
        return st["w"]

    def pack(self, states: list[dict], shape: tuple[int, int], name: str) -> GGMLTensor:
        w = torch.cat([st["w"] for st in states], dim=1).cpu().numpy().astype(np.float16)
        return GGMLTensor(shape, "F16", np.ascontiguousarray(w).view(np.uint8), name=name)



# lattice types whose default grid is ours (``grids.lattice``: GPTQ one lattice group at a time inside the
# block, scales from ggml's encoding then refitted), kept where it lowered llama.cpp's NLL on both bundled
# models (docs/benchmarks.md, llama.cpp section); the others are ggml's encoder a whole block at a time.
OUR_LATTICE = ("iq2_xs",)

# lowercase type name -> zero-argument Grid factory. Ours: the scalar types (``SPECS``) and ``OUR_LATTICE``.
# ggml's own encoder through libggml (llama-cpp-python): the other lattice types, and every type as
# ``ggml-<name>`` (llama.cpp's quantizer with our importance as its imatrix: the reference ours are measured against).
GGML_GRIDS: dict[str, Callable[[], Any]] = {
    **{name: partial(GGMLGrid, spec) for name, spec in SPECS.items()},
    **{name: partial(LatticeGrid, name) if name in OUR_LATTICE else partial(LibGGMLGrid, name.upper(), name)
       for name in LATTICE},
    **{f"ggml-{name}": partial(LibGGMLGrid, spec.ggml_type, f"ggml-{name}") for name, spec in SPECS.items()},
    **{f"ggml-{name}": partial(LibGGMLGrid, name.upper(), f"ggml-{name}") for name in LATTICE},
}

# llama.cpp's fallback for a row length its type's block does not divide (llama-quant.cpp,
# ``llama_tensor_get_type``): the 2-3 bit k-quants and i-quants -> iq4_nl, q4_k -> q5_0, q5_k -> q5_1,
# q6_k -> q8_0; and f16 when even the 32-wide fallback does not divide the row.
FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", **{n: "iq4_nl" for n in LATTICE},
            "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def grid_block(name: str) -> int:
    """The block (along n_in) of a registered type."""
    base = name.removeprefix("ggml-")
    return SPECS[base].block if base in SPECS else 256


def fallback_type(name: str, n_in: int) -> str:
    """The type a tensor with rows of ``n_in`` gets when ``name`` is asked for: ``name`` itself when its
    block divides ``n_in``, else llama.cpp's fallback (``FALLBACK``), else ``"f16"``."""
    if name not in GGML_GRIDS:
        raise QdllmError(f"unknown ggml type {name!r}; supported: {', '.join(GGML_GRIDS)}")
    if n_in % grid_block(name) == 0:
        return name
    prefix = "ggml-" if name.startswith("ggml-") else ""
    fb = FALLBACK.get(name.removeprefix("ggml-"))
    if fb is not None and n_in % grid_block(fb) == 0:
        return prefix + fb
    return "f16"


def grid_for(name: str, n_in: int):
    """The grid that quantizes a linear with rows of ``n_in`` when type ``name`` is asked for (after the
    fallback of :func:`fallback_type`; ``grid.name`` says which type it is)."""
    t = fallback_type(name, n_in)
    return F16Grid(n_in) if t == "f16" else GGML_GRIDS[t]()
