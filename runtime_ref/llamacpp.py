"""``LlamaCppBackend``: a stock GGUF file run by llama.cpp itself (llama-cpp-python's low-level API).

The model runs as ``llama-diffusion-cli`` runs it: non-causal attention (``llama_set_causal_attn(ctx,
false)``), the whole canvas of ``T`` tokens in one ubatch (``n_ctx = n_batch = n_ubatch = T``), logits of
every position, flash attention off (it would round K/V to f16). ``llada`` / ``dream`` have no KV cache,
so every call is an independent forward. The model is loaded once; a context is made per canvas length
and kept for the next call of that length.

llama.cpp computes k-quant and i-quant dot products against activations rounded to 8 bits (``Q8_K`` /
``Q8_0``), so its logits differ from an exact float forward of the same weights by more than float
rounding (docs/gguf-format.md, "llama.cpp as a runtime"). Logits are aligned like every backend's
(``runtime_ref.backend``): Dream's are shifted so row ``i`` scores token ``i``.

Without llama-cpp-python: one ``QdllmError`` naming the pip extra. No torch.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import QdllmError
from formats.gguf_read import GGUFModel, read_gguf
from runtime_ref.backend import shift_right

EXTRA = "pip install 'qdllm-export[llamacpp]'"
PLANES_FIX = ("export a stock type llama.cpp runs (qdllm-export gguf MODEL OUT.gguf --outtype q2_k, iq2_xs, q4_k or "
              "auto --bpw 2.5), or run this file with --runtime numpy")
_LOG_CB = None  # keeps the no-op log callback alive


def load_llama_cpp() -> Any:
    """The ``llama_cpp`` module with its backend initialised and its logging silenced.

    llama-cpp-python's ggml is built with OpenMP (libgomp), whose threads spin at every barrier of every
    graph node by default. On a machine where another process holds a core, a spinning thread waits for a
    descheduled one and each forward runs 5-10x slower (docs/benchmarks.md, "llama.cpp steps"), so the first
    import loads libgomp with ``OMP_WAIT_POLICY=passive`` (threads sleep at once). Only libgomp's start-up
    reads the variable; the environment is restored right after, and a value the user exported wins.
    """
    global _LOG_CB
    try:
        llama_cpp = _import_llama_cpp()
    except ImportError:
        raise QdllmError(f"--runtime llama.cpp needs llama-cpp-python: {EXTRA}") from None
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
    return llama_cpp


def _import_llama_cpp() -> Any:
    """``import llama_cpp`` with ``OMP_WAIT_POLICY=passive`` in the environment while libgomp starts."""
    import sys

    if "llama_cpp" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        import llama_cpp

        return llama_cpp
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        import llama_cpp
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    return llama_cpp


def check_runs_in_llama_cpp(model: GGUFModel) -> None:
    """Refuse a file holding qdllm binary planes (stock llama.cpp reports their weights missing)."""
    planes = [n for n, kind in model.layout.items() if kind == "quantized"]
    if planes:
        raise QdllmError(f"{model.path}: holds qdllm binary-plane tensors ({planes[0]}, ...), which llama.cpp cannot "
                         f"run; {PLANES_FIX}")


def amx_cpu() -> bool:
    """True on a CPU with Intel AMX (Sapphire Rapids and later; Linux ``/proc/cpuinfo`` flag ``amx_int8``).

    There llama.cpp repacks Q4_K / Q5_K / Q6_K / Q8_0 weights into its AMX buffer and its AMX matmul segfaults
    (measured with llama-cpp-python 0.3.36 on a Xeon with AMX, our files and ggml's own bytes alike, d 256-2048;
    llama.cpp issue 20824). Loading without the extra buffer types (``llama-diffusion-cli --no-repack``)
    runs the plain CPU kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


class LlamaCppBackend:
    """A stock ``.gguf`` of a ``llada`` / ``dream`` model run by llama.cpp (Backend protocol)."""

    runtime = "llama.cpp"

    def __init__(self, path: str | Path, threads: int | None = None, model_file: GGUFModel | None = None):
        """Load ``path`` into llama.cpp. ``model_file``: the same file already parsed by ``read_gguf`` (else it
        is parsed here, which validates it). ``threads``: llama.cpp's n_threads (default: the environment's
        ``QDLLM_LLAMACPP_THREADS``, else all cores up to 8)."""
        self.model_file: GGUFModel = model_file or read_gguf(path)  # hparams and tokenizer from it
        check_runs_in_llama_cpp(self.model_file)
        self.hparams = self.model_file.hparams
        self.tokenizer = self.model_file.tokenizer
        self.source = str(path)
        self.threads = threads or int(os.environ.get("QDLLM_LLAMACPP_THREADS", 0)) or min(8, os.cpu_count() or 1)
        self._L = load_llama_cpp()
        L = self._L
        params = L.llama_model_default_params()
        params.use_extra_bufts = not amx_cpu()
        self._model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise QdllmError(f"{path}: llama.cpp could not load the file (it needs a llama-cpp-python whose "
                             "llama.cpp knows the llada / dream architectures and these ggml types)")
        vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = int(L.llama_vocab_n_tokens(vocab))
        if self.n_vocab != self.hparams.n_vocab:
            raise QdllmError(f"{path}: llama.cpp sees {self.n_vocab} tokens, the file's token_embd {self.hparams.n_vocab}")
        self._ctx: tuple[int, Any, Any, np.ndarray] | None = None  # (length, context, batch, its token array)

    # ---------------------------------------------------------------------------------------- contexts
    def _context(self, t: int) -> tuple[Any, Any, np.ndarray]:
        """A context, a batch and a writable int32 ``[t]`` view of the batch's tokens for canvases of ``t``
        tokens (made once per length, the last one kept). Positions ``0..t-1``, sequence 0 and the logits
        flags are written once here; a call only writes the tokens."""
        if self._ctx is not None and self._ctx[0] == t:
            return self._ctx[1], self._ctx[2], self._ctx[3]
        self._free_context()
        L = self._L
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = t
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = L.llama_init_from_model(self._model, cp)
        if not ctx:
            raise QdllmError(f"{self.source}: llama.cpp could not create a context of {t} tokens")
        L.llama_set_causal_attn(ctx, False)
        batch = L.llama_batch_init(t, 0, 1)
        batch.n_tokens = t
        np.ctypeslib.as_array(batch.pos, shape=(t,))[:] = np.arange(t)
        np.ctypeslib.as_array(batch.n_seq_id, shape=(t,))[:] = 1
        np.ctypeslib.as_array(batch.logits, shape=(t,))[:] = 1
        for i in range(t):
            batch.seq_id[i][0] = 0
        tokens = np.ctypeslib.as_array(batch.token, shape=(t,))
        self._ctx = (t, ctx, batch, tokens)
        return ctx, batch, tokens

    def _free_context(self) -> None:
        if self._ctx is not None:
            _, ctx, batch, _ = self._ctx
            self._ctx = None
            self._L.llama_batch_free(batch)
            self._L.llama_free(ctx)

    def close(self) -> None:
        """Free llama.cpp's context and model (also done when the backend is garbage-collected)."""
        self._free_context()
        if getattr(self, "_model", None):
            self._L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------- forward
    def raw_logits(self, ids: np.ndarray) -> np.ndarray:
        """Unshifted float32 logits ``[B, T, V]`` for int ids ``[B, T]``: one llama_decode per row."""
        ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
        B, t = ids.shape
        if t > self.hparams.context_length:
            raise QdllmError(f"{self.source}: a canvas of {t} tokens exceeds the {self.hparams.context_length}-token context")
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.n_vocab:
            raise QdllmError(f"{self.source}: token ids must lie in [0, {self.n_vocab})")
        L = self._L
        ctx, batch, tokens = self._context(t)
        out = np.empty((B, t, self.n_vocab), np.float32)
        for b in range(B):
            tokens[:] = ids[b]
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise QdllmError(f"{self.source}: llama_decode failed (code {rc}) on a canvas of {t} tokens")
            out[b] = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(t, self.n_vocab))
        return out

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Aligned float32 logits ``[B, T, V]`` (Dream's shift applied)."""
        out = self.raw_logits(ids)
        return shift_right(out) if self.hparams.spec.shift_logits else out

    # ---------------------------------------------------------------------------------------- verify, inspect
    def checkpoint_tensors(self):
        """The file's tensors in checkpoint row order, decoded by the NumPy reader (for verify's reference)."""
        return self.model_file.checkpoint_tensors()

    def quantized_names(self) -> list[str]:
        """Canonical names of the tensors stored in a quantized ggml type."""
        return [n for n, t in self.model_file.tensor_types().items() if t not in ("F32", "F16", "BF16")]

    def describe(self) -> dict[str, Any]:
        from runtime_ref.gguf_model import GGUFBackend

        info = GGUFBackend(self.source, decoded=False).describe()
        return {**info, "runtime": "llama.cpp"}


# ------------------------------------------------------------------------------------------------ emulation
# The type llama.cpp's CPU backend rounds a matmul's activations to, by weight type (ggml-cpu.c type traits,
# ``vec_dot_type``): the k-quants and i-quants use Q8_K (256 values, float32 d = max / -127), the 32-wide
# types Q8_0 (fp16 d = amax / 127; Q8_1 for the affine Q4_1 / Q5_1, same values), F16 weights fp16.
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
            "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0")
Q8_0_TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "IQ4_NL", "Q1_0")


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """``x [..., k]`` float32 as llama.cpp's ``quantize_row_q8_K_ref`` stores it (k a multiple of 256)."""
    b = x.reshape(-1, 256).astype(np.float32)
    idx = np.abs(b).argmax(-1)
    mx = b[np.arange(len(b)), idx]  # the signed value of largest magnitude (first one on ties)
    safe = np.where(mx == 0, np.float32(1), mx)
    iscale = (np.float32(-127.0) / safe).astype(np.float32)
    q = np.minimum(np.rint(b * iscale[:, None]), 127).astype(np.float32)
    d = np.where(mx == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    return (q * d[:, None]).reshape(x.shape)


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """``x [..., k]`` float32 as llama.cpp's AVX ``quantize_row_q8_0`` stores it (k a multiple of 32)."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax == 0, np.float32(0), np.float32(127) / np.where(amax == 0, np.float32(1), amax)).astype(np.float32)
    q = np.rint(b * inv[:, None])
    return (q * d.astype(np.float16).astype(np.float32)[:, None]).reshape(x.shape)


def round_activations(x: np.ndarray, weight_type: str) -> np.ndarray:
    """The activations a llama.cpp CPU matmul with a ``weight_type`` weight actually multiplies."""
    if weight_type in K_QUANTS:
        return round_q8_k(x)
    if weight_type in Q8_0_TYPES:
        return round_q8_0(x)
    if weight_type in ("F16", "BF16"):
        return x.astype(np.float16 if weight_type == "F16" else np.float32).astype(np.float32)
    return x


class LlamaCppArithmetic:
    """A ``TensorSource`` over a GGUF file's tensors whose ``matmul`` rounds the activations as llama.cpp's CPU
    backend does before multiplying (``round_activations``): the NumPy forward of it reproduces llama.cpp's
    logits up to float accumulation order, so a test can hold llama.cpp to a tight tolerance on any type."""

    def __init__(self, model: GGUFModel):
        self._src = model.tensors
        self.hparams, self.rope = self._src.hparams, self._src.rope
        self.types = model.tensor_types()
        self._w: dict[str, np.ndarray] = {}

    def names(self) -> list[str]:
        return self._src.names()

    def get(self, name: str) -> Any:
        return self._src.get(name)

    def get_rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        return self._src.get_rows(name, idx)

    def matmul(self, name: str, x: np.ndarray) -> np.ndarray:
        w = self._w.get(name)
        if w is None:
            t = self._src.get(name)
            w = self._w[name] = t.dequantize() if hasattr(t, "dequantize") else np.asarray(t, np.float32)
        return round_activations(x, self.types[name]) @ w.T
