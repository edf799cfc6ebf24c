"""Reading and validating GGUF files of LLaDA / Dream models (written by us or by llama.cpp's converter).

The container is parsed by ``formats.gguf_container`` (bounds-checked), then the metadata and tensor list are checked against the
family table, and every failure is a ``FormatError`` naming the file. Tensor data stay memory-mapped;
``GGUFTensors.get`` decodes one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import FormatError, QdllmError
from formats.families import FAMILIES, HParams
from formats.gguf_container import FLOAT_TYPES, TensorInfo, dequantize_raw, parse_gguf, raw_array
from formats.gguf_layout import (FORMAT_VERSION, MU, NPLANES, inverse_permutation, permute_tensor, plane_shapes,
                                 q1_0_decode, row_permutation, split_qdllm_name)
from formats.gguf_tokenizer import tokenizer_from_gguf
from formats.qtensor import MAX_PLANES, QuantizedTensor
from formats.tensors import canonical_names, canonical_shape, expert_of, is_linear

__all__ = ["GGUFModel", "GGUFTensors", "TensorInfo", "read_gguf", "parse_gguf"]


class GGUFTensors:
    """A ``TensorSource`` over a validated GGUF file, rows in the *file's* order.

    ``permuted`` says whether Q/K rows are in llama.cpp's permuted order (``llada``), ``rope`` which
    RoPE the weights need ("norm" or "neox"). With ``checkpoint_order=True`` the permutation is
    undone, giving the checkpoint's row order (``rope`` then "neox").
    """

    def __init__(self, model: "GGUFModel", checkpoint_order: bool = False):
        self._m = model
        self.hparams = model.hparams
        self.checkpoint_order = checkpoint_order
        self.permuted = model.permuted and not checkpoint_order
        self.rope = "norm" if self.permuted else "neox"

    def names(self) -> list[str]:
        return canonical_names(self.hparams)

    def _fail(self, name: str, what: str) -> FormatError:
        return FormatError(f"{self._m.path}: tensor {name}: {what}")

    def get(self, name: str) -> np.ndarray | QuantizedTensor:
        m = self._m
        if name not in m.layout:
            raise KeyError(name)
        kind = m.layout[name]
        if kind == "quantized":
            value: np.ndarray | QuantizedTensor = self._quantized(name)
        elif kind == "stacked":  # one expert of llama.cpp's 3-D experts tensor
            stacked, x = expert_of(self.hparams, name)
            t = m.infos[stacked]
            value = dequantize_raw(np.asarray(raw_array(m.mm, t)[x]), t.ggml_type).reshape(canonical_shape(self.hparams, name))
            if not np.isfinite(value).all():
                raise self._fail(name, "holds NaN or inf values")
        else:
            t = m.infos[name]
            value = dequantize_raw(raw_array(m.mm, t), t.ggml_type).reshape(canonical_shape(self.hparams, name))
            if not np.isfinite(value).all():
                raise self._fail(name, "holds NaN or inf values")
        if self.checkpoint_order and m.permuted:
            perm = row_permutation(self.hparams, name)
            value = permute_tensor(value, None if perm is None else inverse_permutation(perm))
        return value

    def _quantized(self, name: str) -> QuantizedTensor:
        m = self._m
        g = m.group_size
        n_out, n_in = canonical_shape(self.hparams, name)
        planes = raw_array(m.mm, m.infos[name + NPLANES]).astype(np.uint8)
        signs, rscale, cscale = [], [], []
        for k in range(int(planes.max(initial=0))):
            s, d, ok = q1_0_decode(raw_array(m.mm, m.infos[f"{name}.qdllm.plane{k}"]), g)
            if not ok:
                raise self._fail(name, f"plane {k} has different scales within one group of {g} columns")
            signs.append(s)
            rscale.append(d)
            cscale.append(np.array(raw_array(m.mm, m.infos[f"{name}.qdllm.cscale{k}"])))
        mu = np.array(raw_array(m.mm, m.infos[name + MU])) if name + MU in m.infos else None
        try:
            return QuantizedTensor(
                shape=(n_out, n_in), group_size=g, planes=planes,
                signs=np.concatenate(signs) if signs else np.zeros((0, n_out, g // 8), np.uint8),
                row_scale=np.concatenate(rscale) if rscale else np.zeros((0, n_out), np.float16),
                col_scale=np.concatenate(cscale) if cscale else np.zeros((0, g), np.float16),
                mu=mu, name=name, meta={k: v for k, v in m.qdllm_meta.items() if k in ("method", "bits")},
            )
        except QdllmError as e:
            raise self._fail(name, str(e)) from None

    # ------------------------------------------------------------- fast paths used by runtime_ref.forward
    def get_rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        """float32 rows ``idx`` of a float tensor (embedding lookup without decoding the whole table)."""
        m = self._m
        if m.layout.get(name) != "float":
            return np.asarray(self.get(name))[idx]
        t = m.infos[name]
        raw = raw_array(m.mm, t)
        flat = np.asarray(idx).reshape(-1)
        rows = dequantize_raw(np.asarray(raw[flat]), t.ggml_type)
        if not np.isfinite(rows).all():
            raise self._fail(name, "holds NaN or inf values")
        return rows.reshape(np.shape(idx) + (rows.shape[-1],))

    def matmul(self, name: str, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """``x @ W.T`` decoding a float tensor ``chunk`` rows at a time (memory stays bounded)."""
        m = self._m
        if m.layout.get(name) != "float" or (self.checkpoint_order and row_permutation(self.hparams, name) is not None):
            w = self.get(name)
            return x @ (w.dequantize() if isinstance(w, QuantizedTensor) else w).T
        t = m.infos[name]
        raw = raw_array(m.mm, t)
        out = np.empty(x.shape[:-1] + (raw.shape[0],), np.float32)
        for a in range(0, raw.shape[0], chunk):
            w = dequantize_raw(np.asarray(raw[a : a + chunk]), t.ggml_type)
            if not np.isfinite(w).all():
                raise self._fail(name, "holds NaN or inf values")
            out[..., a : a + chunk] = x @ w.T
        return out


def _get(meta: dict[str, Any], path: Path, key: str, kind: str, default: Any = None) -> Any:
    """A metadata value of ``kind`` ('int' | 'float' | 'bool' | 'str'), or ``default`` when absent (None: required)."""
    if key not in meta:
        if default is None:
            raise FormatError(f"{path}: metadata key {key!r} is missing (llama.cpp and qdllm need it)")
        return default
    v = meta[key]
    if isinstance(v, np.ndarray) and v.ndim == 1 and len(v) and kind in ("int", "float") and (v == v[0]).all():
        v = v[0].item()  # per-layer arrays with one value
    ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
          "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str)}[kind]
    if not ok(v):
        raise FormatError(f"{path}: metadata key {key!r} is {type(v).__name__} {str(v)[:60]}, expected {kind}")
    return v


class GGUFModel:
    """A validated GGUF file: ``hparams``, ``metadata``, ``qdllm_meta``, ``tokenizer``, ``tensors``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._load()
        except QdllmError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, ZeroDivisionError) as e:
            raise FormatError(f"{self.path}: corrupt GGUF file ({type(e).__name__}: {e})") from None

    def _load(self) -> None:
        path = self.path
        self.version, meta, self.infos, self.mm = parse_gguf(path)
        self.metadata = meta
        arch = _get(meta, path, "general.architecture", "str")
        if arch not in FAMILIES:
            raise FormatError(f"{path}: architecture {arch!r} is not one qdllm reads ({', '.join(FAMILIES)})")
        spec = FAMILIES[arch]
        self.qdllm_meta = {k[6:]: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items() if k.startswith("qdllm.")}
        version = self.qdllm_meta.get("format_version")
        if version is not None and version != FORMAT_VERSION:
            raise FormatError(f"{path}: qdllm format version {version!r} is unknown; this qdllm-export reads version "
                              f"{FORMAT_VERSION} (upgrade qdllm-export or re-export the file)")
        a = arch + "."
        n_heads = _get(meta, path, a + "attention.head_count", "int")
        d_model = _get(meta, path, a + "embedding_length", "int")
        if n_heads <= 0 or d_model <= 0:
            raise FormatError(f"{path}: embedding_length {d_model} / head_count {n_heads} must be positive")
        head_dim = _get(meta, path, a + "attention.key_length", "int", d_model // n_heads)
        moe: dict[str, int] = {}
        if spec.has_experts():
            moe["n_expert"] = _get(meta, path, a + "expert_count", "int")
            moe["n_expert_used"] = _get(meta, path, a + "expert_used_count", "int")
            if not 0 < moe["n_expert_used"] <= moe["n_expert"]:
                raise FormatError(f"{path}: {a}expert_used_count {moe['n_expert_used']} must lie in 1..{a}expert_count "
                                  f"({moe['n_expert']})")
            moe["d_ff_exp"] = _get(meta, path, a + "expert_feed_forward_length", "int",
                                   _get(meta, path, a + "feed_forward_length", "int") // moe["n_expert_used"])
        emb = self.infos.get("token_embd.weight")
        if emb is None or len(emb.ne) != 2:
            raise FormatError(f"{path}: tensor 'token_embd.weight' is missing or not 2-D")
        hp = HParams(
            family=arch, n_vocab=emb.ne[1], d_model=d_model, n_layers=_get(meta, path, a + "block_count", "int"),
            n_heads=n_heads, n_kv_heads=_get(meta, path, a + "attention.head_count_kv", "int", n_heads),
            d_ff=_get(meta, path, a + "feed_forward_length", "int"),
            rope_theta=float(_get(meta, path, a + "rope.freq_base", "float", 10000.0)),
            norm_eps=float(_get(meta, path, a + "attention.layer_norm_rms_epsilon", "float")),
            mask_token_id=_get(meta, path, "tokenizer.ggml.mask_token_id", "int"),
            context_length=_get(meta, path, a + "context_length", "int"), head_dim=head_dim,
            bos_token_id=_get(meta, path, "tokenizer.ggml.bos_token_id", "int", -1),
            eos_token_id=_get(meta, path, "tokenizer.ggml.eos_token_id", "int", -1), **moe,
        )
        for fld in ("n_layers", "n_kv_heads", "d_ff", "head_dim", "context_length"):
            if not 0 < getattr(hp, fld) < 1 << 31:
                raise FormatError(f"{path}: {fld} = {getattr(hp, fld)} is out of range")
        n_per_layer = len(spec.layer_tensors())
        if hp.n_layers * n_per_layer > len(self.infos):
            raise FormatError(f"{path}: block_count {hp.n_layers} but only {len(self.infos)} tensors in the file")
        if not (np.isfinite(hp.rope_theta) and hp.rope_theta > 0 and np.isfinite(hp.norm_eps) and hp.norm_eps >= 0):
            raise FormatError(f"{path}: rope.freq_base {hp.rope_theta} / rms epsilon {hp.norm_eps} out of range")
        if n_heads % hp.n_kv_heads or head_dim % 2:
            raise FormatError(f"{path}: head counts {n_heads}/{hp.n_kv_heads}, head size {head_dim} are inconsistent")
        if _get(meta, path, a + "rope.dimension_count", "int", head_dim) != head_dim:
            raise FormatError(f"{path}: partial RoPE (rope.dimension_count != head size) is not supported")
        if _get(meta, path, a + "vocab_size", "int", hp.n_vocab) != hp.n_vocab:
            raise FormatError(f"{path}: {a}vocab_size {meta[a + 'vocab_size']} != token_embd rows {hp.n_vocab}")
        for key in ("mask", "bos", "eos"):
            tid = getattr(hp, f"{key}_token_id")
            if not (0 <= tid < hp.n_vocab or (key != "mask" and tid == -1)):
                raise FormatError(f"{path}: {key} token id {tid} is outside the vocabulary of {hp.n_vocab}")
        shift = _get(meta, path, "diffusion.shift_logits", "bool", True)
        if shift != spec.shift_logits:
            raise FormatError(f"{path}: diffusion.shift_logits={shift}, but {arch} models are "
                              f"{'' if spec.shift_logits else 'not '}shifted")
        self.hparams, self.family = hp, spec
        self.permuted = spec.gguf_rope == "norm"
        self._validate_tensors()
        keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "mask": "mask_token_id"}
        self.special_ids = {k: meta["tokenizer.ggml." + v] for k, v in keys.items()
                            if isinstance(meta.get("tokenizer.ggml." + v), int)}
        self.tokenizer = self._tokenizer()
        self.tensors = GGUFTensors(self)

    def _validate_tensors(self) -> None:
        path, hp, infos = self.path, self.hparams, self.infos
        has_planes = any(split_qdllm_name(n) for n in infos)
        self.group_size = 0
        if has_planes:
            if "format_version" not in self.qdllm_meta:
                raise FormatError(f"{path}: holds qdllm plane tensors but no qdllm.format_version key")
            self.group_size = _get(self.metadata, path, "qdllm.group_size", "int")
            if self.group_size <= 0 or self.group_size % 128:
                raise FormatError(f"{path}: qdllm.group_size {self.group_size} is not a positive multiple of 128")
        self.layout: dict[str, str] = {}
        seen: set[str] = set()

        def check(tname: str, ggml_types: tuple[str, ...], shape: tuple[int, ...]) -> None:
            t = infos.get(tname)
            if t is None:
                raise FormatError(f"{path}: tensor {tname!r} is missing (a {hp.family} model with these hparams needs it)")
            if t.ggml_type not in ggml_types:
                raise FormatError(f"{path}: tensor {tname} has type {t.ggml_type}, expected {' or '.join(ggml_types)}")
            if t.shape != tuple(shape):
                raise FormatError(f"{path}: tensor {tname} has ne {list(t.ne)}, expected {list(reversed(shape))}")
            seen.add(tname)

        for name in canonical_names(hp):
            shape = canonical_shape(hp, name)
            ex = expert_of(hp, name)
            if ex is not None and name not in infos and name + NPLANES not in infos:  # llama.cpp's stacked experts
                if ex[0] not in seen:
                    check(ex[0], FLOAT_TYPES, (hp.n_expert,) + tuple(shape))
                self.layout[name] = "stacked"
                continue
            if name in infos or not (has_planes and is_linear(hp, name) and name + NPLANES in infos):
                types = ("F32", "F16", "BF16") if len(shape) == 1 else FLOAT_TYPES
                check(name, types, shape)
                self.layout[name] = "float"
                continue
            n_out, n_in = shape
            g = self.group_size
            if n_in % g:
                raise FormatError(f"{path}: tensor {name} has {n_in} columns, not a multiple of the group size {g}")
            check(name + NPLANES, ("I8",), (n_in // g,))
            planes = raw_array(self.mm, infos[name + NPLANES])
            if planes.min(initial=0) < 0 or planes.max(initial=0) > MAX_PLANES:
                raise FormatError(f"{path}: tensor {name + NPLANES} holds plane counts outside 0..{MAX_PLANES}")
            for sfx, (gtype, pshape) in plane_shapes(n_out, n_in, g, planes.astype(np.uint8), name + MU in infos).items():
                check(name + sfx, (gtype,), pshape)
            self.layout[name] = "quantized"
        extra = sorted(set(infos) - seen)
        if extra:
            raise FormatError(f"{path}: unexpected tensor(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                              f"not in the {hp.family} layout")

    def _tokenizer(self) -> Any:
        meta, path = self.metadata, self.path
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            return None
        tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
        merges = meta.get("tokenizer.ggml.merges", [])
        if not isinstance(tokens, list) or len(tokens) != self.hparams.n_vocab:
            raise FormatError(f"{path}: tokenizer.ggml.tokens must list {self.hparams.n_vocab} strings")
        if types is None:
            types = np.ones(len(tokens), np.int32)
        if not isinstance(types, np.ndarray) or len(types) != len(tokens) or not isinstance(merges, list):
            raise FormatError(f"{path}: tokenizer.ggml.token_type / merges have the wrong type or length")
        if len(set(tokens)) != len(tokens):
            raise FormatError(f"{path}: tokenizer.ggml.tokens holds duplicate strings")
        pre = _get(meta, path, "tokenizer.ggml.pre", "str", "gpt-2")
        add_bos = _get(meta, path, "tokenizer.ggml.add_bos_token", "bool", False)
        try:
            return tokenizer_from_gguf(tokens, [int(t) for t in types], merges, pre, self.special_ids.get("bos"), add_bos)
        except QdllmError as e:
            raise FormatError(f"{path}: tokenizer: {e}") from None
        except BaseException as e:  # tokenizers raises plain Exception, or a pyo3 PanicException (BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)):
                raise
            raise FormatError(f"{path}: tokenizer cannot be rebuilt ({type(e).__name__}: {str(e)[:200]})") from None

    def checkpoint_tensors(self) -> GGUFTensors:
        """The tensors in checkpoint row order (llama.cpp's Q/K permutation undone)."""
        return GGUFTensors(self, checkpoint_order=True)

    def raw(self, tensor_name: str) -> np.ndarray:
        """A file tensor's stored array, memory-mapped (typed for F32/F16/I8..., uint8 block rows otherwise)."""
        return raw_array(self.mm, self.infos[tensor_name])

    def tensor_types(self) -> dict[str, str]:
        """Canonical name -> 'F16' / 'Q8_0' / ... or 'planes' for quantized linears (an expert of a stacked
        tensor: that tensor's type)."""
        return {n: ("planes" if k == "quantized" else self.info_of(n).ggml_type) for n, k in self.layout.items()}

    def info_of(self, name: str) -> TensorInfo:
        """The file tensor that holds the float / ggml tensor ``name`` (an expert: its layer's stacked tensor)."""
        if self.layout.get(name) == "stacked":
            return self.infos[expert_of(self.hparams, name)[0]]
        return self.infos[name]

    def nbytes_of(self, name: str) -> int:
        """Bytes of ``name``'s data in the file (an expert: its share of the stacked tensor)."""
        if self.layout.get(name) == "stacked":
            return self.info_of(name).nbytes // self.hparams.n_expert
        return self.infos[name].nbytes


def read_gguf(path: str | Path) -> GGUFModel:
    """Open and validate a GGUF file of a ``llada`` or ``dream`` model; raises ``FormatError``."""
    return GGUFModel(path)
