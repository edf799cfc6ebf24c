"""``qdllm-export quantize MODEL OUT_DIR``: Quant-dLLM / RTN / GPTQ into a quantized checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from formats.errors import QdllmError
from formats.gguf_types import DEFAULT_EMBED, EMBED_CHOICES
from qdllm_export.cli import checks
from qdllm_export.cli.app import app, block_progress, console, console_err

METHOD_HELP = "quant-dllm (MCS + DAQ + ABMP) | gptq | rtn."
TUNE_HELP = ("Block-output tuning: signed-gradient steps per transformer block that re-round the fitted codes against the "
             "float model's block output (default: 50 for ggml / MatMulNBits types, 100 for binary planes; 0: off; "
             "scales and file format unchanged).")
EQUALIZE_HELP = ("Fold per-channel scales into the norms and v / up before fitting (function-preserving; off by default: "
                 "it did not lower NLL on both model families).")
CLI_FIELDS = ("method", "bits", "group_size", "abmp", "abmp_ratio", "iters", "seed", "calib_samples", "seq_len",
              "prefix_ratio", "act_order", "static_groups")  # QuantConfig / CalibConfig fields that are also flags


def run_quantize(model: str, out_dir: Path, *, method: str, bits: float, group_size: int, calib: Optional[Path],
                 calib_samples: int, seq_len: int, mcs: bool, prefix_ratio: float, abmp: bool, abmp_ratio: float,
                 data_aware: bool, iters: int, device: str, seed: int, force: bool, quiet: bool = False,
                 true_sequential: bool = True, act_order: bool = False, static_groups: bool = False,
                 tables: Any = None, tune_iters: Optional[int] = None, equalize: bool = False):
    """Shared by ``quantize`` and the export verbs; ``tables``: a ``targets.tables.TablesSpec`` (default Q4_K /
    Q6_K). Returns (PipelineResult, record)."""
    from qdllm_export.backends import resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.pipeline import check_quantizable, quantize_checkpoint
    from qdllm_export.quant import QuantConfig

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QdllmError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    folder = resolve(model)
    try:
        qcfg = QuantConfig(method=method, bits=bits, group_size=group_size, abmp=abmp, abmp_ratio=abmp_ratio,
                           data_aware=data_aware, iters=iters, seed=seed, act_order=act_order, static_groups=static_groups)
        ccfg = CalibConfig(path=str(calib) if calib else None, n_samples=calib_samples, seq_len=seq_len, mcs=mcs,
                           prefix_ratio=prefix_ratio, seed=seed)
    except QdllmError as e:  # the configs name their fields; the user typed flags
        raise QdllmError(checks.flag_names(str(e), CLI_FIELDS)) from None
    check_quantizable(folder, group_size)
    with block_progress() as on_layer:
        result, record = quantize_checkpoint(folder, out_dir, qcfg, ccfg, tables=tables, device=device, force=force,
                                             on_layer=on_layer, true_sequential=true_sequential,
                                             **tuning(tune_iters, equalize, seed))
    return result, record


def tuning(tune_iters: Optional[int], equalize: bool, seed: int) -> dict[str, Any]:
    """``recon`` / ``equalize`` of ``pipeline.quantize_checkpoint`` from the flags (``None``: the default effort)."""
    from qdllm_export.quant.recon import ReconConfig

    return {"recon": ReconConfig(iters=tune_iters, seed=seed),
            "equalize": equalize}


def summary_table(result, title: str, record: dict | None = None) -> Table:
    """One row per quantized linear, then the embedding and the head as the checkpoint holds them."""
    t = Table("tensor", "shape", "stored as", "bits/w", "weight err", "output err", title=title)
    for r in result.layers:
        t.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", r.detail, f"{r.bits_per_weight:.3f}",
                  f"{r.rel_weight_error:.4f}", "-" if r.rel_output_error is None else f"{r.rel_output_error:.4f}")
    for name, tab in (record or {}).get("tables", {}).items():
        shape = (record["tensors"].get(name) or {}).get("shape")
        t.add_row(name, "x".join(map(str, shape)) if shape else "-", tab["type"], f"{tab['bits_per_weight']:.3f}",
                  f"{tab['rel_weight_error']:.4f}", "-")
    return t


def coverage_text(record: dict) -> str | None:
    """One line on a mixture's calibration: tokens routed to each expert per block (min-max share of an even split
    ``tokens * k / E``), and the experts the calibration fill damped toward the pooled Hessian; None when dense."""
    cov = record.get("expert_coverage")
    if not cov:
        return None
    shares, starved = [], []
    for c in cov:
        fair = max(sum(c["routed"]), 1) / len(c["routed"])
        shares.append(f"blk.{c['block']} {min(c['routed']) / fair:.2f}x-{max(c['routed']) / fair:.2f}x")
        starved += [f"blk.{c['block']} expert {e} ({n} of {c['batches']} batches)"
                    for e, n in enumerate(c["starved_batches"]) if n]
    fill = "; filled toward the pooled Hessian: " + ", ".join(starved) if starved else "; no expert was starved"
    return "expert coverage (calibration tokens per expert, min-max share of an even split): " + ", ".join(shares) + fill


def print_coverage(record: dict, stderr: bool = False) -> None:
    """:func:`coverage_text` on stdout (``stderr``: on stderr, where stdout may be --json)."""
    text = coverage_text(record)
    if text:
        (console_err if stderr else console).print(text, soft_wrap=True)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Hugging Face checkpoint folder (LLaDA, Dream or LLaDA-MoE) or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    out_dir: Path = typer.Argument(..., help="Output folder for the quantized checkpoint (must not exist unless --force)."),
    method: str = typer.Option("quant-dllm", help=METHOD_HELP),
    bits: float = typer.Option(2.0, callback=checks.finite, help="Budget: mean binary planes per block for quant-dllm (e.g. 1.5, 2, 3); integer bits for rtn/gptq."),
    group_size: int = typer.Option(128, min=8, help="Columns per block (a multiple of 8); every linear's n_in must divide by it."),
    calib: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Calibration text or JSONL file (default: bundled Shakespeare train text)."),
    calib_samples: int = typer.Option(128, min=1, help="Number of calibration windows."),
    seq_len: int = typer.Option(256, min=2, help="Tokens per calibration window."),
    mcs: bool = typer.Option(True, "--mcs/--no-mcs", help="Masked Calibration Simulation (off: plain unmasked text, the ablation)."),
    prefix_ratio: float = typer.Option(0.25, callback=checks.between(0.0, 1.0, high_open=True), help="MCS: fraction of each window kept visible, in [0, 1)."),
    abmp: bool = typer.Option(True, "--abmp/--no-abmp", help="Quant-dLLM: adaptive blockwise mixed precision."),
    abmp_ratio: float = typer.Option(0.05, callback=checks.between(0.0, 0.5), help="ABMP: fraction of blocks promoted to K+1 / demoted to K-1 planes."),
    data_aware: bool = typer.Option(True, "--data-aware/--no-data-aware", help="Quant-dLLM: data-aware (DOR) weighting."),
    iters: int = typer.Option(15, min=0, help="Quant-dLLM: alternating re-scaling / re-rounding iterations."),
    device: str = typer.Option("cpu", callback=checks.device_option, help="cpu | cuda."),
    seed: int = typer.Option(0, min=0, help="Seed of calibration masks and quantizer."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="Calibrate q/k/v, o, gate/up, down in turn, each on inputs from the already-quantized earlier groups (off: the ablation)."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: columns by decreasing input energy (GPTQModel desc_act; implies static groups)."),
    static_groups: bool = typer.Option(False, "--static-groups", help="GPTQ: fix every group's scale and zero from the weights before any update."),
    embed_type: str = typer.Option(DEFAULT_EMBED[0], callback=checks.one_of(*EMBED_CHOICES), help="Type of token_embd, held by the checkpoint and every file written from it (llama.cpp's fallback where its block does not divide the width)."),
    head_type: str = typer.Option(DEFAULT_EMBED[1], callback=checks.one_of(*EMBED_CHOICES), help="Type of output, the LM head (weighted by its calibrated input importance), held by the checkpoint and every file written from it."),
    tune_iters: Optional[int] = typer.Option(None, min=0, help=TUNE_HELP),
    equalize: bool = typer.Option(False, "--equalize/--no-equalize", help=EQUALIZE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it is a quantized checkpoint this tool wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Quantize every linear of the transformer blocks, and the embedding and head to --embed-type / --head-type."""
    from qdllm_export.backends import resolve
    from qdllm_export.targets.tables import TablesSpec

    checks.output_folder(out_dir, force, [resolve(model), calib])
    result, record = run_quantize(model, out_dir, method=method, bits=bits, group_size=group_size, calib=calib,
                                  calib_samples=calib_samples, seq_len=seq_len, mcs=mcs, prefix_ratio=prefix_ratio,
                                  abmp=abmp, abmp_ratio=abmp_ratio, data_aware=data_aware, iters=iters, device=device,
                                  seed=seed, force=force, true_sequential=true_sequential, act_order=act_order,
                                  static_groups=static_groups, tables=TablesSpec(embed_type, head_type),
                                  tune_iters=tune_iters, equalize=equalize)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    if as_json:
        print(json.dumps({"out_dir": str(out_dir), "method": method, "bits": bits,
                          "bits_per_weight_linear": record["bits_per_weight_linear"],
                          "bits_per_weight_linear_native": record["bits_per_weight_linear_native"],
                          "bits_per_weight_model": record["bits_per_weight_model"], "tables": record["tables"], "size_bytes": size,
                          "seconds": record["seconds"], "block_output_errors": record["block_output_errors"],
                          "tensors": record["tensors"]}))
        return
    console.print(summary_table(result, f"{method} {bits:g} bits", record))
    print_coverage(record)
    console.print(f"wrote {out_dir}", soft_wrap=True)  # a path is never wrapped inside a table title
    native = record["bits_per_weight_linear_native"]
    own = f" ({native:.3f} in {method}'s own packing: codes + fp16 scale and zero per group)" if native else ""
    console.print(f"quantized linears: {record['bits_per_weight_linear']:.3f} bits/weight as planes{own}; "
                  f"whole model (tables and norms included): {record['bits_per_weight_model']:.3f} bits/weight, "
                  f"folder {size / 2**20:.2f} MiB, {record['seconds']:.1f} s", soft_wrap=True)
