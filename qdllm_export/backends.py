"""Open any MODEL argument as a ``runtime_ref.backend.Backend``.

MODEL is a bundled model's name (``tiny-llada``), a Hugging Face checkpoint folder, a quantized
checkpoint folder (``quantize`` output), a ``.gguf`` file or a ``.onnx`` file. torch is imported only
when a checkpoint folder is run, so the verbs on a .gguf / .onnx file start without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import QdllmError
from formats.families import HParams
from formats.qtensor import QuantizedTensor
from formats.stored import is_stored
from formats.tensors import HFTensors, TensorSource, canonical_names, is_linear
from formats.tokenizer import load_tokenizer
from runtime_ref.backend import Backend, shift_right

DATA = Path(__file__).parent / "data"
BUNDLED = ("tiny-llada", "tiny-dream", "tiny-llada-moe")


def resolve(model: str) -> Path:
    """A bundled name or a path, checked to exist."""
    if model in BUNDLED:
        p = DATA / model
        if not (p / "config.json").is_file():
            raise QdllmError(f"bundled model {model!r} is missing from the installation ({p}); reinstall qdllm-export")
        return p
    p = Path(model)
    if not p.exists():
        raise QdllmError(f"{model}: no such file or folder (bundled models: {', '.join(BUNDLED)})")
    return p


def open_source(model: str) -> TensorSource:
    """The tensors of a checkpoint folder (HF or quantized), without loading them."""
    p = resolve(model)
    if not p.is_dir():
        raise QdllmError(f"{p}: expected a checkpoint folder")
    from formats.checkpoint import QuantizedCheckpoint, is_quantized_checkpoint

    return QuantizedCheckpoint(p) if is_quantized_checkpoint(p) else HFTensors(p)


class TorchBackend:
    """A checkpoint folder run by the PyTorch model (quantized tensors dequantized from stored fields)."""

    def __init__(self, source: TensorSource, folder: Path, dtype: str = "float32", device: str = "cpu"):
        import torch

        from qdllm_export.models import load_model, torch_dtype

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise QdllmError(f"--device {device}: no CUDA device is visible to PyTorch; use --device cpu")
        self.source_tensors = source
        self.hparams = source.hparams
        self.source = str(folder)
        self.folder = folder
        self.device = device
        self.model = load_model(source, torch_dtype(dtype), device)
        self.tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None

    def checkpoint_tensors(self) -> TensorSource:
        return self.source_tensors

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
            out = self.model(t).float().cpu().numpy()
        return shift_right(out) if self.hparams.spec.shift_logits else out

    def describe(self) -> dict[str, Any]:
        return describe_source(self.source_tensors, self.folder)


def describe_source(source: TensorSource, folder: Path) -> dict[str, Any]:
    """``inspect`` figures of a checkpoint folder, read from headers and quantized fields only."""
    hp = source.hparams
    stored_type = getattr(source, "stored_type", None) or (lambda n: source.ckpt.dtype(source.hf_name(n)))
    rows, total_bits, n_params, q_bits, q_params = [], 0, 0, 0, 0
    for name in canonical_names(hp):
        t = source.get(name)
        if is_stored(t):
            n, bits = t.shape[0] * t.shape[1], t.stored_bits()
            if is_linear(hp, name):
                q_bits, q_params = q_bits + bits, q_params + n
            kind = f"planes(mean {t.mean_planes():.2f})" if isinstance(t, QuantizedTensor) else stored_type(name).lower()
            rows.append({"name": name, "shape": list(t.shape), "type": kind, "bits_per_weight": bits / n})
        else:
            n, dtype = int(np.prod(t.shape)), stored_type(name)
            float_bits = {"BF16": 16, "F16": 16}.get(dtype, 32)
            bits = float_bits * n
            rows.append({"name": name, "shape": list(t.shape), "type": dtype.lower(), "bits_per_weight": float(float_bits)})
        total_bits += bits
        n_params += n
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    fmt = "quantized-checkpoint" if q_params else "checkpoint"
    return {"format": fmt, "path": str(folder), "family": hp.family, "hparams": hp.to_dict(), "n_params": n_params,
            "bits_per_weight": total_bits / n_params, "bits_per_weight_linear": q_bits / q_params if q_params else None,
            "size_bytes": size, "tensors": rows}


def describe_model(model: str) -> dict[str, Any]:
    """``inspect`` figures of any MODEL argument (folders are not loaded into PyTorch)."""
    p = resolve(model)
    if p.is_dir():
        return describe_source(open_source(model), p)
    return open_model(model).describe()


def model_kind(path: Path) -> str:
    """``"gguf"``, ``"onnx"`` or ``"folder"`` for a resolved MODEL path."""
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".gguf", ".onnx"):
        return suffix[1:]
    raise QdllmError(f"{path}: unknown file type; expected a .gguf or .onnx file or a checkpoint folder")


RUNTIMES = ("numpy", "llama.cpp")  # engines of a .gguf file: qdllm's NumPy reference forward, stock llama.cpp


def check_runtime(runtime: str | None, kind: str, model: str) -> None:
    """``--runtime`` is for .gguf files only."""
    if runtime not in (None, "numpy") and kind != "gguf":
        raise QdllmError(f"--runtime {runtime}: runs .gguf files only; {model} is a {'checkpoint folder' if kind == 'folder' else '.' + kind + ' file'}")


def open_model(model: str, dtype: str = "float32", device: str = "cpu", runtime: str | None = None) -> Backend:
    """Any MODEL argument as a Backend; ``runtime`` ("numpy" | "llama.cpp") picks the engine of a .gguf file."""
    p = resolve(model)
    kind = model_kind(p)
    check_runtime(runtime, kind, model)
    if kind == "gguf":
        if runtime == "llama.cpp":
            from runtime_ref.llamacpp import LlamaCppBackend

            return LlamaCppBackend(p)
        from runtime_ref.gguf_model import GGUFBackend

        return GGUFBackend(p)
    if kind == "onnx":
        from runtime_ref.ort import OrtBackend

        return OrtBackend(p)
    return TorchBackend(open_source(model), p, dtype, device)


@dataclass
class ModelHeader:
    """What MODEL is, read without loading its weights: enough to check options before any load."""

    model: str  # the argument as given
    kind: str  # "folder" | "gguf" | "onnx"
    source: str  # the resolved path
    hparams: HParams
    tokenizer: Any  # tokenizers.Tokenizer or None
    opened: Any = None  # the Backend itself when opening it costs nothing (a memory-mapped GGUF)
    runtime: str | None = None  # engine of a .gguf file (RUNTIMES); None: numpy
    parsed: Any = None  # the parsed GGUFModel of a .gguf run by llama.cpp (handed on, not parsed again)

    def open(self, dtype: str = "float32", device: str = "cpu") -> Backend:
        """The model as a Backend (this is where PyTorch, onnxruntime or llama.cpp load the weights)."""
        if self.opened is not None:
            return self.opened
        if self.parsed is not None:
            from runtime_ref.llamacpp import LlamaCppBackend

            return LlamaCppBackend(self.source, model_file=self.parsed)
        return open_model(self.model, dtype, device, self.runtime)


def read_header(model: str, runtime: str | None = None) -> ModelHeader:
    """The family, hyper-parameters and tokenizer of any MODEL argument, no weights loaded. With
    ``runtime="llama.cpp"`` a .gguf file is checked to be one llama.cpp runs, and llama-cpp-python to be
    installed, before anything loads."""
    p = resolve(model)
    kind = model_kind(p)
    check_runtime(runtime, kind, model)
    if kind == "gguf":
        be = open_model(model)  # memory-mapped; nothing is decoded until the first forward
        if runtime == "llama.cpp":
            from runtime_ref.llamacpp import check_runs_in_llama_cpp, load_llama_cpp

            check_runs_in_llama_cpp(be.model)
            load_llama_cpp()
            return ModelHeader(model, kind, be.source, be.hparams, be.tokenizer, runtime=runtime, parsed=be.model)
        return ModelHeader(model, kind, be.source, be.hparams, be.tokenizer, opened=be)
    if kind == "onnx":
        from formats.onnx import read_onnx_info
        from runtime_ref.ort import _tokenizer

        info = read_onnx_info(p)
        return ModelHeader(model, kind, str(p), info.hparams, _tokenizer(info.tokenizer_json, str(p)))
    src = open_source(model)
    tok = load_tokenizer(p) if (p / "tokenizer.json").is_file() else None
    return ModelHeader(model, kind, str(p), src.hparams, tok)
