"""``GGUFBackend``: a GGUF file run by the NumPy reference forward (the Backend protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from formats.gguf_read import GGUFModel, read_gguf
from formats.tensors import canonical_names, canonical_shape, is_linear
from runtime_ref.forward import forward, forward_aligned


CACHE_BYTES = 2 << 30  # decoded float32 weights kept in memory up to this size (and a quarter of free RAM)


class DecodedWeights:
    """A GGUF file's tensors with each weight decoded to float32 once and kept (a ``TensorSource`` for
    ``runtime_ref.forward``).

    The forward otherwise decodes every linear at every call (Q1_0 planes to signs and scales, then the
    dequantization): 90% of a 64-step ``generate`` of the tiny model went there. The token embedding stays
    memory-mapped (``get_rows`` decodes only the rows a batch uses). Values are exactly those the streaming
    path computes, so logits do not change.
    """

    def __init__(self, tensors: Any):
        self._src = tensors
        self.hparams = tensors.hparams
        self.rope = tensors.rope
        self._cache: dict[str, np.ndarray] = {}

    def names(self) -> list[str]:
        return self._src.names()

    def get(self, name: str) -> np.ndarray:
        w = self._cache.get(name)
        if w is None:
            t = self._src.get(name)
            w = t.dequantize() if hasattr(t, "dequantize") else np.asarray(t, dtype=np.float32)
            self._cache[name] = w
        return w

    def get_rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        return self._src.get_rows(name, idx)

    @staticmethod
    def fits(hp: Any, budget: int | None = None) -> bool:
        """Whether the decoded weights (all but the embedding) fit ``budget`` bytes (default: ``CACHE_BYTES``,
        at most a quarter of the memory available now)."""
        if budget is None:
            import psutil

            budget = min(CACHE_BYTES, psutil.virtual_memory().available // 4)
        need = 4 * sum(int(np.prod(canonical_shape(hp, n))) for n in canonical_names(hp) if n != "token_embd.weight")
        return need <= budget


class GGUFBackend:
    """A ``.gguf`` file of a ``llada`` / ``dream`` model (quantized planes or float), memory-mapped.

    ``decoded``: keep the decoded float32 weights in memory (default: when they fit, see
    ``DecodedWeights.fits``); False streams them from the memory map at every forward."""

    def __init__(self, path: str | Path, decoded: bool | None = None):
        self.model: GGUFModel = read_gguf(path)
        self.hparams = self.model.hparams
        self.tokenizer = self.model.tokenizer
        self.source = str(path)
        self.tensors = self.model.tensors  # TensorSource, file row order (rope = self.tensors.rope)
        if decoded is None:
            decoded = DecodedWeights.fits(self.hparams)
        self._run = DecodedWeights(self.tensors) if decoded else self.tensors  # what the forward reads

    def checkpoint_tensors(self):
        """The file's tensors in checkpoint row order (llama.cpp's Q/K permutation undone)."""
        return self.model.checkpoint_tensors()

    def quantized_names(self) -> list[str]:
        """Canonical names of the tensors the file stores quantized (binary planes or a ggml block type)."""
        return [n for n, t in self.model.tensor_types().items() if t not in ("F32", "F16", "BF16")]

    def logits(self, ids: np.ndarray, attn_mask: np.ndarray | None = None) -> np.ndarray:
        """Aligned float32 logits ``[B, T, V]`` (Dream's shift applied)."""
        return forward_aligned(self._run, np.asarray(ids), attn_mask=attn_mask)

    def raw_logits(self, ids: np.ndarray, attn_mask: np.ndarray | None = None) -> np.ndarray:
        """Unshifted logits, as llama.cpp returns them."""
        return forward(self._run, np.asarray(ids), attn_mask=attn_mask)

    def describe(self) -> dict[str, Any]:
        """``inspect`` figures, one key per fact (shared with the ONNX and checkpoint descriptions: ``format``,
        ``path``, ``family``, ``hparams``, ``n_params``, ``tensors``, ``size_bytes``, ``bits_per_weight``,
        ``bits_per_weight_linear``)."""
        m, hp = self.model, self.hparams
        infos = m.infos
        n_params = sum(int(np.prod(canonical_shape(hp, n))) for n in canonical_names(hp))
        types: dict[str, str] = {}
        rows: list[dict[str, Any]] = []
        q_bytes = q_weights = n_stock = 0
        plane_counts: list[np.ndarray] = []
        for name, kind in m.layout.items():
            shape = canonical_shape(hp, name)
            n = int(np.prod(shape))
            if kind in ("float", "stacked"):
                types[name] = m.info_of(name).ggml_type
                nbytes = m.nbytes_of(name)
                if is_linear(hp, name) and types[name] not in ("F32", "F16", "BF16"):  # a stock ggml type
                    q_bytes += nbytes
                    q_weights += n
                    n_stock += 1
            else:
                nbytes = sum(t.nbytes for t in infos.values() if t.name.startswith(name + ".qdllm."))
                planes = np.asarray(m.raw(name + ".qdllm.nplanes"), dtype=np.int64)
                plane_counts.append(planes)
                mu = " +mu" if name + ".qdllm.mu" in infos else ""
                types[name] = f"Q1_0 planes (K_j {planes.min()}..{planes.max()}, mean {planes.mean():.3f}){mu}"
                q_bytes += nbytes
                q_weights += n
            rows.append({"name": name, "shape": list(shape), "type": types[name], "bits_per_weight": 8.0 * nbytes / n})
        size = Path(self.source).stat().st_size
        data_bytes = sum(t.nbytes for t in infos.values())
        all_planes = np.concatenate(plane_counts) if plane_counts else np.zeros(0)
        bpw_q = 8.0 * q_bytes / q_weights if q_weights else None
        return {
            "format": "gguf",
            "path": self.source,
            "family": hp.family,
            "hparams": hp.to_dict(),
            "qk_permuted": m.permuted,
            "rope": self.tensors.rope,
            "outtype": m.qdllm_meta.get("outtype", "llama.cpp"),
            "llama_cpp_runs": not plane_counts,  # stock llama.cpp loads every tensor of the file
            "group_size": m.qdllm_meta.get("group_size"),
            "qdllm": dict(m.qdllm_meta),
            "n_params": n_params,
            "n_tensors_file": len(infos),
            "tensors": rows,
            "n_quantized_linears": len(plane_counts) + n_stock,
            "mean_planes": float(all_planes.mean()) if all_planes.size else None,
            "bits_per_weight_linear": bpw_q,  # the quantized linears' tensors in this file
            "bits_per_weight": 8.0 * size / n_params,  # the whole file
            "bits_per_weight_tensors": 8.0 * data_bytes / n_params,  # all tensor data, no header
            "size_bytes": size,
            "vocab": None if self.tokenizer is None else self.tokenizer.get_vocab_size(),
        }
