"""A model's tensors by canonical name, whatever they are stored in.

Canonical names are llama.cpp's (``token_embd.weight``, ``blk.3.attn_q.weight``, ...) with rows in the
*checkpoint's* order (no llama.cpp Q/K permutation: writers apply it). A value is a float32 array or,
for a quantized linear, a stored quantized tensor of any kind (``formats.stored``: binary planes,
ggml bytes, MatMulNBits codes). Every writer (GGUF, ONNX) and the NumPy runtime read
models through ``TensorSource``; sources load lazily so only one tensor need be in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol, Union

import numpy as np

from formats.errors import QdllmError
from formats.families import Family, HParams, read_config
from formats.qtensor import QuantizedTensor
from formats.safetensors_io import Checkpoint
from formats.stored import is_stored

Tensor = Union[np.ndarray, QuantizedTensor, Any]  # Any: another kind of formats.stored


class TensorSource(Protocol):
    hparams: HParams

    def names(self) -> list[str]:
        """Canonical names in family order (globals first, then layer by layer)."""
        ...

    def get(self, name: str) -> Tensor:
        ...


def canonical_names(hp: HParams) -> list[str]:
    """Canonical names of every tensor of a model, in family order (each expert of a layer its own name)."""
    out = [t.gguf for t in hp.spec.global_tensors()]
    for i in range(hp.n_layers):
        out.extend(hp.spec.layer_names(hp, i))
    return out


def canonical_shape(hp: HParams, name: str) -> tuple[int, ...]:
    found = hp.spec.spec_of(name)
    if found is None:
        raise QdllmError(f"no tensor named {name!r} in a {hp.family} model")
    return found[0].shape(hp)


def is_linear(hp: HParams, name: str) -> bool:
    found = hp.spec.spec_of(name) if name.startswith("blk.") else None
    return found is not None and found[0].linear


def expert_of(hp: HParams, name: str) -> tuple[str, int] | None:
    """(llama.cpp's stacked tensor name, expert index) of an expert's canonical name, else None."""
    found = hp.spec.spec_of(name) if name.startswith("blk.") else None
    if found is None or not found[0].per_expert:
        return None
    spec, i, x = found
    return spec.stacked.format(i=i), int(x)


def fetch_checked(source: TensorSource, name: str, where: str | Path, stored_ok: tuple[str, ...] = ()) -> Tensor:
    """``source.get(name)``, checked against the family table: present, the right shape, and quantized
    only if it is a block linear (or one of ``stored_ok``, e.g. the embeddings of a stock GGUF). Writers
    call it so every format refuses a bad model the same way."""
    hp = source.hparams
    try:
        value = source.get(name)
    except KeyError:
        raise QdllmError(f"{where}: the model has no tensor {name!r}; a {hp.family} model needs it") from None
    want = canonical_shape(hp, name)
    got = value.shape if is_stored(value) else np.shape(value)
    if tuple(got) != tuple(want):
        raise QdllmError(f"{where}: tensor {name} has shape {tuple(got)}, but the hparams imply {want}")
    if is_stored(value) and not is_linear(hp, name) and name not in stored_ok:
        raise QdllmError(f"{where}: tensor {name} is quantized, but only block linears may be")
    return value


class DictTensors:
    """Tensors held in a dict (tests, small models)."""

    def __init__(self, hparams: HParams, tensors: dict[str, Tensor]):
        self.hparams = hparams
        self.tensors = tensors

    def names(self) -> list[str]:
        return [n for n in canonical_names(self.hparams) if n in self.tensors]

    def get(self, name: str) -> Tensor:
        return self.tensors[name]


class HFTensors:
    """An official Hugging Face checkpoint folder read lazily, validated against the family table.

    Every expected tensor must exist with the expected shape; each error names the file and the fix.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.family: Family
        self.family, self.hparams, self.config = read_config(self.folder)
        self.ckpt = Checkpoint(self.folder)
        self._hf_name: dict[str, str] = {}
        for hf, (spec, i, shape, name) in self.family.expected_named(self.hparams).items():
            if hf not in self.ckpt:
                raise QdllmError(
                    f"{self.folder}: tensor {hf!r} is missing from the checkpoint; the config says "
                    f"{self.hparams.n_layers} layers of a {self.family.name} model (is a shard missing or the config wrong?)"
                )
            got = self.ckpt.shape(hf)
            if tuple(got) != tuple(shape):
                raise QdllmError(
                    f"{self.ckpt.file_of(hf).path}: tensor {hf!r} has shape {tuple(got)} but config.json implies "
                    f"{tuple(shape)}; the config does not belong to these weights"
                )
            self._hf_name[name] = hf

    def names(self) -> list[str]:
        return canonical_names(self.hparams)

    def hf_name(self, name: str) -> str:
        return self._hf_name[name]

    def get(self, name: str) -> np.ndarray:
        arr = self.ckpt.get(self._hf_name[name])
        if not np.isfinite(arr).all():
            raise QdllmError(f"{self.ckpt.file_of(self._hf_name[name]).path}: tensor {self._hf_name[name]!r} holds NaN or inf")
        return arr

    def dtype(self) -> str:
        """Storage dtype of the first linear weight: 'BF16', 'F16' or 'F32'."""
        return self.ckpt.dtype(self._hf_name["blk.0.attn_q.weight"])

    def n_params(self) -> int:
        return sum(int(np.prod(self.ckpt.shape(h))) for h in self._hf_name.values())

    def layer_names(self, i: int) -> Iterator[str]:
        return iter(self.family.layer_names(self.hparams, i))


class OverlaySource:
    """``base``'s tensors, except the quantized linears, which come from ``planes``.

    ``verify`` uses it when the reference is a float checkpoint and the file holds quantized planes:
    the PyTorch reference then runs the file's stored planes (the stored values are the truth) with
    every other tensor from the checkpoint.
    """

    def __init__(self, base: TensorSource, planes: TensorSource, names: list[str] | None = None):
        self.hparams = base.hparams
        self.base, self.planes = base, planes
        if names is not None:  # the tensors the file stores quantized (e.g. a stock GGUF's, decoded to floats)
            self.quantized = set(names)
        else:
            self.quantized = {n for n in planes.names() if is_linear(planes.hparams, n) and is_stored(planes.get(n))}

    def names(self) -> list[str]:
        return self.base.names()

    def get(self, name: str) -> Tensor:
        return self.planes.get(name) if name in self.quantized else self.base.get(name)

    def dtype(self) -> str:
        return getattr(self.base, "dtype", lambda: "F32")()
