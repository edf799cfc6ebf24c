"""The streaming quantization pipeline: one transformer block resident at a time.

For block ``i``: load its weights from the checkpoint; run the calibration activations through the
float block with hooks that accumulate each linear's input statistics ``H`` (the block's plan, e.g.
ABMP's planes, comes from these); then quantize its linears **true-sequentially**: the groups
``q/k/v``, ``o``, ``gate/up``, ``down`` in turn, each group's ``H`` taken from inputs produced by the
block with the earlier groups already quantized (``true_sequential=False``: every group uses the float
block's ``H``). The quantized block then produces the next block's inputs, its shard is written and
it is freed. The embedding and the head are encoded in their shipping types (``targets.tables``): the
embedding first, so calibration runs through it, the head last, weighted by its inputs' importance. A target that needs no data (RTN) skips
calibration altogether.

Peak memory: one block's weights, its ``H`` matrices and the calibration activations
``[n_samples, seq_len, d_model]`` (float32, on ``device``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from formats.checkpoint import QuantizedCheckpointWriter
from formats.errors import QdllmError
from formats.stored import is_stored, record_of
from formats.tensors import HFTensors, canonical_names, canonical_shape, is_linear
from formats.tokenizer import load_tokenizer
from qdllm_export.calib import CalibConfig, apply_mcs, calibration_windows
from qdllm_export.block_pass import collect_hessians, fast, load_block, run_block
from qdllm_export.models import dequantize_torch, hessian_pass, sequential_groups
from qdllm_export.models.layers import rope_tables
from qdllm_export.quant import QuantConfig
from qdllm_export.quant.recon import ReconConfig
from qdllm_export.targets.base import Target
from qdllm_export.targets.planes import as_target
from qdllm_export.timing import phase
from qdllm_export.targets.tables import TABLES, TablesSpec, encode_table, table_values, type_name

OnLayer = Callable[[int, int, str], None]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    kind: str  # "planes" | "ggml" | "nbits"
    detail: str  # planes: mean planes; grids: the type
    bits_per_weight: float
    rel_weight_error: float
    rel_output_error: float | None
    stored: dict[str, Any] = field(default_factory=dict)  # formats.stored.record_of
    bits_per_weight_native: float | None = None  # uniform codes in their own packing (GPTQ/RTN)


@dataclass
class PipelineResult:
    layers: list[LayerReport] = field(default_factory=list)
    block_errors: list[float] = field(default_factory=list)  # relative output error of each quantized block
    recon: list[dict[str, Any]] = field(default_factory=list)  # block-output tuning, per block (quant.recon)
    equalized: list[dict[str, float]] = field(default_factory=list)  # per block: site -> alpha (quant.equalize)
    refolded: list[str] = field(default_factory=list)  # canonical names of the float tensors equalization changed
    coverage: list[dict[str, Any]] = field(default_factory=list)  # per MoE block: calibration routing (_hessians)
    seconds: float = 0.0

    def linear_bits_per_weight(self, native: bool = False) -> float:
        n = sum(r.shape[0] * r.shape[1] for r in self.layers)
        bits = [(r.bits_per_weight_native if native and r.bits_per_weight_native is not None else r.bits_per_weight)
                for r in self.layers]
        return sum(b * r.shape[0] * r.shape[1] for b, r in zip(bits, self.layers)) / n


def _err_text(r: LayerReport) -> str:
    out = "-" if r.rel_output_error is None else f"{r.rel_output_error:.4f}"
    return f"{r.name.split('.', 2)[2]} err {out}"


def _stored(src: HFTensors, name: str, bf16: bool) -> np.ndarray:
    """A float tensor to copy unchanged: bf16 bits as stored (memory-mapped, no float copy), else float32."""
    return src.ckpt.raw(src.hf_name(name)) if bf16 and src.ckpt.dtype(src.hf_name(name)) == "BF16" else src.get(name)


# ------------------------------------------------------------------------------------------ one block
@dataclass
class _Calib:
    """Calibration activations entering the current block, and the RoPE tables (None without data);
    ``x_fp``: the same windows through the float model (block-output tuning's targets), else None."""

    x: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    batch: int
    x_fp: torch.Tensor | None = None


def quantize_block(block: torch.nn.Module, i: int, target: Target, calib: _Calib, true_sequential: bool,
                   result: PipelineResult, on_layer: OnLayer | None, n_layers: int,
                   recon: ReconConfig | None = None, equalize: bool = False) -> dict[str, Any]:
    """Quantize the linears of ``block`` in place (weights replaced by their stored values); returns
    role -> stored tensor. ``calib.x`` becomes the quantized block's outputs (``calib.x_fp`` the float
    block's). ``recon``: block-output tuning of the fitted codes (``quant.recon``); ``equalize``: per-channel
    scales folded into the norms and v / up first (``quant.equalize``; the block's norms then hold them)."""
    linears = block.linears()
    roles = list(linears)
    data = calib.x is not None
    tuning = data and recon is not None and recon.on
    goal = _recon_goal(block, calib, recon) if tuning else None
    floats = {r: m.weight.detach().clone() for r, m in linears.items()} if tuning else {}
    tunables: dict[str, Any] = {}
    if data and equalize:
        with phase("equalize"):
            _equalize(block, i, target, calib, result)
    groups = sequential_groups(roles) if true_sequential else [roles]
    # the float block's H of every linear only where the plan reads them (ABMP); else the first group's
    first = roles if getattr(target, "plan_needs_hessians", True) else groups[0]
    Hs = _hessians(block, i, first, calib, result) if data else None
    y_ref = run_block(block, calib.x[: calib.batch].clone(), calib.cos, calib.sin, calib.batch) if data else None
    with phase("plan"):
        plan = target.plan_block(i, {r: m.weight for r, m in linears.items()}, Hs)
    out: dict[str, Any] = {}
    fresh = set(groups[0])  # roles whose H was collected on the inputs their group is fitted on
    for g, group in enumerate(groups):
        if data and group[0] not in fresh:
            stage = hessian_pass(groups, g)
            Hs.update(_hessians(block, i, stage, calib, result))
            fresh.update(stage)
        if true_sequential and len(group) > 1 and hasattr(target, "quantize_stacked"):
            names = [f"blk.{i}.{r}.weight" for r in group]
            if on_layer:
                on_layer(i, n_layers, " + ".join(n.split(".", 2)[2] for n in names))
            with phase("fit:" + "+".join(group)):
                stacked = target.quantize_stacked(names, [linears[r].weight.data for r in group],
                                                  None if Hs is None else Hs[group[0]])
            if stacked is not None:
                for r, name, res in zip(group, names, stacked):
                    _take_tunable(tunables, r, res)
                    out[r] = _store_result(linears[r], name, res, result)
                continue
        for r in group:
            name = f"blk.{i}.{r}.weight"
            if on_layer:
                on_layer(i, n_layers, name + (f" (last: {_err_text(result.layers[-1])})" if result.layers else ""))
            with phase("fit:" + r):
                res = target.quantize(name, linears[r].weight.data, None if Hs is None else Hs[r], plan[r])
            _take_tunable(tunables, r, res)
            out[r] = _store_result(linears[r], name, res, result)
    if tunables and goal is not None:
        with phase("recon"):
            _tune_block(block, i, tunables, floats, Hs, calib, goal, recon, out, result)
    if data:
        del Hs
        run_block(block, calib.x, calib.cos, calib.sin, calib.batch)  # the quantized block feeds the next one
        n_ref = y_ref.shape[0]
        result.block_errors.append(float((calib.x[:n_ref] - y_ref).norm() / y_ref.norm()))
    return out


def _hessians(block: torch.nn.Module, i: int, roles: list[str], calib: _Calib, result: PipelineResult
              ) -> dict[str, torch.Tensor]:
    """``collect_hessians``; where ``roles`` hold a mixture's experts, the routing of that pass (the experts'
    calibration tokens) is added to ``result.coverage``."""
    mlp = getattr(block, "mlp", None)
    counted = bool(result.coverage) and result.coverage[-1]["block"] == i  # the down pass routes as gate / up's did
    if counted or not hasattr(mlp, "tally") or not any("_exps." in r for r in roles):
        return collect_hessians(block, roles, calib.x, calib.cos, calib.sin, calib.batch)
    mlp.tally = {}
    try:
        Hs = collect_hessians(block, roles, calib.x, calib.cos, calib.sin, calib.batch)
        t = mlp.tally
        result.coverage.append({"block": i, "tokens": t["tokens"], "batches": t["batches"],
                                "routed": t["routed"].tolist(), "starved_batches": t["starved"].tolist()})
    finally:
        mlp.tally = None
    return Hs


def _equalize(block: torch.nn.Module, i: int, target: Target, calib: _Calib, result: PipelineResult) -> None:
    """Fold per-channel scales into ``block`` (``quant.equalize``), scored by ``target``'s own fits."""
    from qdllm_export.quant.equalize import equalize_block, input_stats

    stats = input_stats(block, lambda: run_block(block, calib.x, calib.cos, calib.sin, calib.batch, keep=False))

    def fit(role: str, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        return target.quantize(f"blk.{i}.{role}.weight", W, H, None)[1]

    result.equalized.append(equalize_block(block, stats, fit))


def _take_tunable(tunables: dict[str, Any], role: str, res: tuple[Any, torch.Tensor, dict[str, Any]]) -> None:
    t = res[2].pop("tunable", None)
    if t is not None:
        tunables[role] = t


def _recon_goal(block: torch.nn.Module, calib: _Calib, recon: ReconConfig) -> torch.Tensor:
    """The float block's outputs ``[N, L, d]`` the tuning aims at: on the float model's inputs (``calib.x_fp``,
    which then moves on to the next block) or on the quantized ones (``local``)."""
    if recon.target == "float":
        return run_block(block, calib.x_fp, calib.cos, calib.sin, calib.batch)
    return run_block(block, calib.x.clone(), calib.cos, calib.sin, calib.batch)


def _tune_block(block: torch.nn.Module, i: int, tunables: dict[str, Any], floats: dict[str, torch.Tensor],
                Hs: dict[str, torch.Tensor], calib: _Calib, goal: torch.Tensor, recon: ReconConfig,
                out: dict[str, Any], result: PipelineResult) -> None:
    """Block-output tuning of the fitted codes (``quant.recon``); where it lowers the block's output error the
    tuned tensors replace the fitted ones in ``out``, in the block and in the report."""
    from torch.func import functional_call

    from qdllm_export.quant import error_stats
    from qdllm_export.quant.recon import reconstruct

    linears = block.linears()
    pname = {m: n for n, m in block.named_modules()}
    keys = {r: f"{pname[m]}.weight" for r, m in linears.items()}

    def run(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(block, {keys[r]: w for r, w in weights.items()}, (x, calib.cos, calib.sin))

    fitted = {r: m.weight.detach() for r, m in linears.items()}
    with fast(calib.x):  # TF32 forwards and backwards on CUDA, as the calibration forwards
        points, rep = reconstruct(run, tunables, fitted, calib.x, goal, recon)
    result.recon.append({"block": i, "loss_before": rep.loss_before, "loss_after": rep.loss_after, "kept": rep.kept,
                         "tuned": list(rep.tuned), "iters": rep.iters})
    if points is None:
        return
    for r, X in points.items():
        name = f"blk.{i}.{r}.weight"
        stored = tunables[r].commit(X)
        with torch.no_grad():
            linears[r].weight.copy_(_stored_values(stored, tunables[r].nearest(X), name))
        stats = error_stats(floats[r], linears[r].weight.detach(), Hs.get(r) if Hs else None)
        layer = next(rl for rl in result.layers if rl.name == name)
        layer.stored, layer.rel_weight_error = record_of(stored), float(stats["rel_weight_err"])
        layer.rel_output_error = stats.get("rel_output_err")
        out[r] = stored


def _store_result(m: torch.nn.Linear, name: str, res: tuple[Any, torch.Tensor, dict[str, Any]], result: PipelineResult) -> Any:
    """Put a quantized linear's stored values into the block and report it; returns the stored tensor."""
    stored, w_hat, stats = res
    with torch.no_grad(), phase("store"):
        m.weight.copy_(_stored_values(stored, w_hat, name))  # the stored values are the truth
    rec = record_of(stored)
    detail = f"{stored.mean_planes():.2f} planes" if rec["kind"] == "planes" else str(stats.get("grid", rec.get("ggml_type", "")))
    result.layers.append(LayerReport(name, stored.shape, rec["kind"], detail, stored.bits_per_weight(),
                                     float(stats["rel_weight_err"]), stats.get("rel_output_err"), rec,
                                     stats.get("bits_per_weight_native")))
    return stored


def _stored_values(stored: Any, w_hat: torch.Tensor, name: str, check_rows: int = 8) -> torch.Tensor:
    """float32 ``[n_out, n_in]`` on ``w_hat``'s device: what ``stored`` decodes to. Binary planes are
    dequantized in PyTorch; a grid's fit already holds its decoded values (``grids.base.GridResult``), so
    only its first ``check_rows`` rows are decoded (by the format's own NumPy decoder, gguf-py's for ggml
    types) and must match bit for bit: decoding a whole 8B linear in NumPy cost seconds per block."""
    if record_of(stored)["kind"] == "planes":
        return dequantize_torch(stored, w_hat.device)
    k = min(check_rows, stored.shape[0])
    head = torch.from_numpy(np.ascontiguousarray(stored.rows(0, k).dequantize(), dtype=np.float32))
    if not torch.equal(head, w_hat[:k].detach().cpu()):
        raise QdllmError(f"tensor {name}: the stored {record_of(stored)['kind']} values differ from the fit's; "
                         "this is a bug of the grid, please report it")
    return w_hat


def _equalized_floats(block: torch.nn.Module, i: int, hf: dict[str, str], result: PipelineResult) -> dict[str, np.ndarray]:
    """HF name -> float32 value of every float tensor of block ``i`` (norms, a mixture's router) that equalization
    changed; their canonical names go to ``result.refolded``."""
    from qdllm_export.quant.equalize import folded_floats

    changed = {f"blk.{i}.{k}.weight": w for k, w in folded_floats(block, result.equalized[-1]).items()}
    result.refolded += list(changed)
    return {hf[n]: w.detach().cpu().numpy().astype(np.float32) for n, w in changed.items()}


# ------------------------------------------------------------------------------------------ whole model
def _calibration(src: HFTensors, model_dir: Path, ccfg: CalibConfig, device: str, batch: int,
                 embedding: np.ndarray | None = None, float_stream: bool = False) -> _Calib:
    """Embedded MCS-masked calibration windows entering block 0; ``embedding`` float32 ``[vocab, d]``: the
    table as shipped (default: the checkpoint's float one); ``float_stream``: also the windows through the
    checkpoint's float embedding (``x_fp``, the float model's stream)."""
    hp = src.hparams
    windows = calibration_windows(load_tokenizer(model_dir), hp, ccfg)
    if ccfg.mcs:
        windows, _ = apply_mcs(windows, hp.mask_token_id, ccfg.prefix_ratio, ccfg.seed, protect_first=hp.spec.shift_logits)
    ids = torch.from_numpy(windows).to(device)
    float_emb = src.get("token_embd.weight")
    x = torch.from_numpy(float_emb if embedding is None else embedding).to(device)[ids]  # [N, L, d] float32
    x_fp = torch.from_numpy(float_emb).to(device)[ids] if float_stream else None
    cos, sin = rope_tables(windows.shape[1], hp.head_dim, hp.rope_theta, torch.device(device))
    return _Calib(x, cos, sin, batch, x_fp)


def _head_importance(src: HFTensors, calib: _Calib) -> np.ndarray:
    """float32 ``[d]``: mean square of each input column of the LM head (the final norm of the quantized
    model's last hidden states over the calibration windows)."""
    w = torch.from_numpy(src.get("output_norm.weight")).to(calib.x.device)
    eps = src.hparams.norm_eps
    acc = torch.zeros(calib.x.shape[-1], dtype=torch.float64, device=calib.x.device)
    for s in range(0, calib.x.shape[0], calib.batch):
        x = calib.x[s : s + calib.batch]
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        acc += h.reshape(-1, h.shape[-1]).to(torch.float64).pow(2).sum(0)
    return (acc / (calib.x.shape[0] * calib.x.shape[1])).float().cpu().numpy()


def _table_record(name: str, t: Any, w: np.ndarray, v: np.ndarray | None = None) -> dict[str, Any]:
    """The record of a stored table: its type, bits per weight and relative error against the float ``w``
    (``v``: ``table_values(t)`` where already decoded)."""
    v = table_values(t) if v is None else v
    n = v.size
    bits = t.stored_bits() if is_stored(t) else 8 * np.asarray(t).itemsize * n
    return {"type": type_name(t), "bits_per_weight": bits / n,
            "rel_weight_error": float(np.linalg.norm(v - w) / max(np.linalg.norm(w), 1e-30))}


def _record(target: Target, ccfg: CalibConfig | None, src: HFTensors, model_dir: Path, result: PipelineResult,
            true_sequential: bool, tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    native = any(r.bits_per_weight_native is not None for r in result.layers)
    hp = src.hparams
    sizes = {n: int(np.prod(canonical_shape(hp, n))) for n in canonical_names(hp)}
    stored_bits = {r.name: r.bits_per_weight * sizes[r.name] for r in result.layers}
    stored_bits.update({n: t["bits_per_weight"] * sizes[n] for n, t in tables.items()})
    float_bits = {"BF16": 16, "F16": 16}.get(src.dtype(), 32)
    model_bits = sum(stored_bits.get(n, float_bits * k) for n, k in sizes.items()) / sum(sizes.values())
    return {
        **target.record(),
        "calibration": None if ccfg is None else {**ccfg.to_dict(), "true_sequential": true_sequential},
        "source": str(model_dir),
        "source_dtype": src.dtype(),
        "family": src.hparams.family,
        "bits_per_weight_linear": result.linear_bits_per_weight(),
        "bits_per_weight_linear_native": result.linear_bits_per_weight(native=True) if native else None,
        "bits_per_weight_model": model_bits,  # every tensor: linears, tables, norms (what ships)
        "block_output_errors": result.block_errors,
        "seconds": result.seconds,
        "tables": tables,
        "tensors": {
            r.name: {"shape": list(r.shape), **r.stored, "detail": r.detail, "bits_per_weight": r.bits_per_weight,
                     "bits_per_weight_native": r.bits_per_weight_native, "rel_weight_error": r.rel_weight_error,
                     "rel_output_error": r.rel_output_error}
            for r in result.layers
        },
    }


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    target: Target | QuantConfig,
    ccfg: CalibConfig,
    *,
    tables: TablesSpec | None = None,
    device: str = "cpu",
    force: bool = False,
    batch: int = 8,
    true_sequential: bool = True,
    on_layer: OnLayer | None = None,
    recon: ReconConfig | None = None,
    equalize: bool = False,
) -> tuple[PipelineResult, dict[str, Any]]:
    """Quantize the linears of an HF checkpoint folder into a quantized checkpoint at ``out_dir``.

    ``target``: a ``QuantConfig`` (binary planes) or any ``qdllm_export.targets.Target``. ``tables``: the
    types of the embedding and the head (``targets.tables``; default Q4_K / Q6_K), which every file written
    from the checkpoint holds. ``recon``: block-output tuning of the fitted codes (``quant.recon``; default
    ``ReconConfig()``: ``quant.recon.DEFAULT_ITERS`` steps; ``iters=0`` turns it off); ``equalize``: function-preserving per-channel scales before the fits (``quant.equalize``; the
    changed norms are stored float32). ``on_layer(block_index, n_blocks, what)`` reports progress. Returns the
    per-layer report and the record written to ``qdllm_quant.json``. Nothing is left at ``out_dir`` on failure.
    """
    t0 = time.time()
    target = as_target(target)
    tables = tables or TablesSpec()
    torch.manual_seed(getattr(getattr(target, "cfg", None), "seed", 0))
    recon = ReconConfig() if recon is None else recon
    tuning = recon.on and target.needs_data and hasattr(target, "tune")
    if tuning:
        target.tune = True
    model_dir = Path(model_dir)
    src = HFTensors(model_dir)
    hp = src.hparams
    bf16 = src.dtype() == "BF16"
    hf = hp.spec.hf_names(hp)
    writer = QuantizedCheckpointWriter(out_dir, model_dir, n_shards=hp.n_layers + 1, force=force)
    result = PipelineResult()
    try:
        if on_layer:
            on_layer(0, hp.n_layers, f"token_embd as {tables.embed_type}")
        embd_float = src.get(TABLES[0])
        embd = encode_table(TABLES[0], embd_float, tables.embed_type, device=device)
        embd_values = table_values(embd)  # decoded once: calibration starts from it, the record compares it
        table_records = {TABLES[0]: _table_record(TABLES[0], embd, embd_float, embd_values)}
        calib = _calibration(src, model_dir, ccfg, device, batch, embd_values,
                             float_stream=tuning and recon.target == "float") if target.needs_data \
            else _Calib(None, None, None, batch)
        del embd_values, embd_float
        for i in range(hp.n_layers):
            block = load_block(src, i, device)
            stored = quantize_block(block, i, target, calib, true_sequential, result, on_layer, hp.n_layers,
                                    recon if tuning else None, equalize and target.needs_data)
            if on_layer:
                err = f", block output error {result.block_errors[-1]:.4f}" if result.block_errors else ""
                on_layer(i + 1, hp.n_layers, f"block {i} done{err}")
            quantized = {hf[f"blk.{i}.{r}.weight"]: t for r, t in stored.items()}
            changed = _equalized_floats(block, i, hf, result) if equalize and target.needs_data else {}
            floats = {hf[n]: _stored(src, n, bf16) for n in src.layer_names(i) if hf[n] not in quantized and hf[n] not in changed}
            writer.add_shard(floats, quantized, bf16, as_is=changed)
            del block, stored, quantized
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if on_layer:
            on_layer(hp.n_layers, hp.n_layers, f"output as {tables.head_type}")
        imp = _head_importance(src, calib) if calib.x is not None else getattr(target, "importance", {}).get(TABLES[1])
        head = encode_table(TABLES[1], src.get(TABLES[1]), tables.head_type, imp, device)
        done = dict(zip(TABLES, (embd, head)))
        writer.add_shard({hf["output_norm.weight"]: _stored(src, "output_norm.weight", bf16)},
                         {hf[n]: t for n, t in done.items() if is_stored(t)}, bf16,
                         as_is={hf[n]: t for n, t in done.items() if not is_stored(t)})
        result.seconds = time.time() - t0
        table_records[TABLES[1]] = _table_record(TABLES[1], head, src.get(TABLES[1]))
        record = _record(target, ccfg if target.needs_data else None, src, model_dir, result, true_sequential,
                         table_records)
        if tuning:
            record["reconstruction"] = {**recon.to_dict(), "blocks": result.recon}
        if result.coverage:
            record["expert_coverage"] = result.coverage
        if equalize and target.needs_data:
            record["equalization"] = {"alphas": result.equalized,
                                      "changed": result.refolded}
        record["tensors"].update({n: {"shape": list(t.shape), **record_of(t)} for n, t in done.items() if is_stored(t)})
        writer.finish(record)
        return result, record
    except BaseException:
        writer.abort()
        raise


def check_quantizable(model_dir: str | Path, group_size: int) -> None:
    """Fail before any work when a linear's input width does not divide the group size."""
    src = HFTensors(model_dir)
    hp = src.hparams
    for name in src.names():
        if name.startswith("blk.0.") and is_linear(hp, name):
            n_in = src.ckpt.shape(src.hf_name(name))[1]
            if n_in % group_size:
                raise QdllmError(f"{model_dir}: {src.hf_name(name)} has n_in={n_in}, not divisible by the group size "
                                 f"{group_size}; pass --group-size with a divisor of {n_in}")
