"""PyTorch model families, resolved by ``formats.families`` name: one module per family."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from formats.errors import QdllmError
from formats.families import HParams
from formats.qtensor import QuantizedTensor
from formats.stored import is_stored
from formats.safetensors_io import write_checkpoint
from formats.tensors import TensorSource, canonical_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# Linears of a block in the order their inputs become available (true-sequential groups); the linears
# of one group read the same input.
SEQUENTIAL_GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


def family_module(hp: HParams) -> ModuleType:
    return importlib.import_module(f"qdllm_export.models.{hp.family.replace('-', '_')}")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QdllmError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return DTYPES[name]


def build_model(hp: HParams, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An uninitialised model of the family, parameters named as in the published checkpoints."""
    with torch.device(device):
        model = family_module(hp).Model(hp)
    return model.to(dtype)


def dequantize_torch(qt: Any, device: str | torch.device = "cpu") -> torch.Tensor:
    """``W_hat`` float32 ``[n_out, n_in]`` of any stored quantized tensor (``formats.stored``).

    Binary planes are dequantized in PyTorch, written independently of ``QuantizedTensor.dequantize``
    (NumPy) so parity tests compare two implementations of the contract; the runtime grids (ggml,
    MatMulNBits) through their NumPy decoders (gguf-py's for ggml types).
    """
    if not isinstance(qt, QuantizedTensor):
        return torch.from_numpy(np.ascontiguousarray(qt.dequantize(), dtype=np.float32)).to(device)
    n_out, n_in = qt.shape
    g, nb = qt.group_size, qt.n_blocks
    bits = torch.from_numpy(np.array(qt.signs)).to(device)  # [P, n_out, g/8] uint8
    shifts = torch.arange(8, device=device, dtype=torch.uint8)
    b = ((bits[..., None] >> shifts) & 1).reshape(qt.n_planes, n_out, g).float() * 2 - 1
    rs = torch.from_numpy(qt.row_scale.astype(np.float32)).to(device)
    cs = torch.from_numpy(qt.col_scale.astype(np.float32)).to(device)
    w = torch.zeros(n_out, nb, g, device=device)
    if qt.mu is not None:
        w += torch.from_numpy(qt.mu.astype(np.float32)).to(device)[:, :, None]
    for p, (_, j) in enumerate(qt.plane_index()):
        w[:, j, :] += rs[p][:, None] * cs[p][None, :] * b[p]
    return w.reshape(n_out, n_in)


def load_state(model: torch.nn.Module, source: TensorSource, device: str | torch.device = "cpu") -> None:
    """Copy every tensor of ``source`` into ``model`` (quantized ones dequantized from stored fields)."""
    hp = source.hparams
    hf = hp.spec.hf_names(hp)
    params = dict(model.named_parameters())
    for name in canonical_names(hp):
        val = source.get(name)
        t = dequantize_torch(val, device) if is_stored(val) else torch.from_numpy(np.asarray(val))
        p = params[hf[name]]
        with torch.no_grad():
            p.copy_(t.to(p.dtype))


def load_model(source: TensorSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    model = build_model(source.hparams, dtype, device)
    load_state(model, source, device)
    return model.eval()


def save_checkpoint(model: torch.nn.Module, hp: HParams, folder: str | Path, *, dtype: str = "bfloat16",
                    tokenizer_json: str | Path | None = None, config_extra: dict[str, Any] | None = None,
                    n_shards: int = 1) -> None:
    """Write ``model`` as a published-layout checkpoint: config.json, safetensors, tokenizer.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().float().cpu().numpy() for n, p in model.state_dict().items()}
    if dtype == "bfloat16":
        write_checkpoint(folder, tensors, n_shards, bf16=set(tensors))
    else:
        write_checkpoint(folder, {n: t.astype(np.dtype(dtype)) for n, t in tensors.items()}, n_shards)
    cfg = hp.spec.config_from_hparams(hp, torch_dtype=dtype, **(config_extra or {}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())


# An expert's linears (role ``ffn_gate_exps.X`` etc.): its gate and up read its routed tokens, its down their product.
EXPERT_GROUPS = (("ffn_gate_exps", "ffn_up_exps"), ("ffn_down_exps",))


def sequential_groups(roles: list[str]) -> list[list[str]]:
    """``roles`` split into the true-sequential groups, in order (unknown roles last, together). The linears of
    one group read one input (one Hessian): each expert's gate + up is a group of its own, then each expert's
    down, so the pipeline's stacked fits and shared Hessians never mix two experts' routed tokens."""
    groups = [[r for r in g if r in roles] for g in SEQUENTIAL_GROUPS]
    experts = sorted({int(r.split(".")[1]) for r in roles if r.split(".")[0] in sum(EXPERT_GROUPS, ())})
    for eg in EXPERT_GROUPS:
        groups += [[f"{base}.{x}" for base in eg if f"{base}.{x}" in roles] for x in experts]
    rest = [r for r in roles if not any(r in g for g in groups)]
    return [g for g in groups if g] + ([rest] if rest else [])


def hessian_pass(groups: list[list[str]], g: int) -> list[str]:
    """The roles whose Hessians one calibration pass can collect with ``groups[g]``'s: its own, plus those of the
    groups right after it of the same expert stage. Every expert's gate + up reads the block's normed input, and
    each expert's down only its own gate + up's output: no group of a stage changes another's input, so one pass
    gives each the Hessian its own pass would (instead of one pass over the calibration data per expert)."""

    def stage(group: list[str]) -> int | None:
        base = group[0].split(".")[0]
        return next((k for k, eg in enumerate(EXPERT_GROUPS) if base in eg), None)

    key = stage(groups[g])
    if key is None:
        return list(groups[g])
    out = []
    for group in groups[g:]:
        if stage(group) != key:
            break
        out += group
    return out
