"""``qdllm-export gguf MODEL OUT.gguf``: the command users come for.

Two kinds of file: ``--outtype planes`` (the default; Quant-dLLM's binary planes, which only qdllm's
runtimes run) and the stock types (``q2_k`` ... ``iq3_s``, ``auto --bpw B``; ``f16`` / ``f32``), which
stock llama.cpp runs unchanged. For the stock types a plain checkpoint is calibrated (MCS) and quantized
onto ggml's grids by ``qdllm_export.targets.ggml`` into a temporary quantized checkpoint, then written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from formats.errors import QdllmError
from formats.gguf_types import EMBED_CHOICES, OUTTYPES, PLANES, STOCK_TYPES, canonical_outtype, default_embed_types
from qdllm_export.cli import checks
from qdllm_export.cli.app import app, block_progress, console
from qdllm_export.cli.export import export_source, print_closing, quant_options_given, with_quant_options
from qdllm_export.cli.quantize import print_coverage, tuning
from qdllm_export.targets.tables import TablesSpec

NOT_OFFERED = {  # ggml types someone may ask for, and why they are not outtypes
    "q1_0": "Q1_0 is a stock ggml type, but one sign plane per weight is the binary-plane format's building block: "
            "use --outtype planes (Quant-dLLM, about 2 planes per weight)",
    "q2_0": "Q2_0 is not a type of gguf-py 0.19 (the GGUF library this tool writes with)",
}
STOCK_FLAGS = ("--bpw", "--rounding", "--no-true-sequential", "--imatrix")


def outtype_option(value: str) -> str:
    """``--outtype`` callback: a supported outtype (old name ``quantized`` accepted), else the list."""
    if value in NOT_OFFERED:
        raise typer.BadParameter(f"{value!r}: {NOT_OFFERED[value]}; supported: {', '.join(OUTTYPES)}")
    if canonical_outtype(value) not in OUTTYPES:
        raise typer.BadParameter(f"{value!r} is not a supported type; supported: {', '.join(OUTTYPES)}")
    return value


def rounding_option(value: Optional[str]) -> Optional[str]:
    """``--rounding`` callback (the names live with the grid driver, imported only when the flag is given)."""
    if value is None:
        return value
    from qdllm_export.grids.base import ROUNDINGS

    return checks.one_of(*ROUNDINGS)(value)


@app.command("gguf")
@with_quant_options
def gguf_(
    model: str = typer.Argument(..., help="Checkpoint folder (quantized first), quantized checkpoint folder, or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    out: Path = typer.Argument(..., help="Output .gguf path (written to a temporary file, renamed at the end)."),
    outtype: str = typer.Option(PLANES, callback=outtype_option, help="planes (binary planes: qdllm runtimes only; old name 'quantized') | stock llama.cpp types: q2_k q3_k q4_k q5_k q6_k q8_0 iq2_xs iq2_s iq3_s, auto (with --bpw) | f16 | f32."),
    bpw: Optional[float] = typer.Option(None, callback=checks.finite, help="--outtype auto: mean stored bits per weight of the block linears, e.g. 2.5; reachable: about 2.31 (iq2_xs everywhere) to 8.5 (q8_0 everywhere), as the model's widths allow (a budget outside is refused, naming the nearest reachable one)."),
    rounding: Optional[str] = typer.Option(None, callback=rounding_option, help="Stock types: gptq (default: calibrated GPTQ rounding, error compensation between ggml blocks, per linear the scale refit with less output error) | importance (importance-weighted fit, no compensation) | rtn (no data); the ablation."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="Stock types: calibrate each group of linears on the block with the earlier groups already quantized."),
    imatrix: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Stock types: a llama.cpp imatrix file as the importance instead of calibrating (importance rounding; refused if made for another model)."),
    embed_type: Optional[str] = typer.Option(None, callback=checks.one_of(*EMBED_CHOICES), help="Type of token_embd (default: q4_k for planes and 2-4 bit types, the type itself for q5_k-q8_0, f16/f32 for float outtypes)."),
    head_type: Optional[str] = typer.Option(None, callback=checks.one_of(*EMBED_CHOICES), help="Type of output, the LM head (default: q6_k; q8_0 for q8_0; f16/f32 for float outtypes)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a GGUF or ONNX file this tool wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    q: Any = None,
) -> None:
    """Write a llama.cpp GGUF (architecture llada / dream): binary planes, or stock ggml types llama.cpp runs."""
    checks.output_suffix(out, ".gguf", "gguf")
    from formats.gguf import write_gguf
    from formats.gguf_types import EMBED_TYPES
    from runtime_ref.gguf_model import GGUFBackend

    t0 = time.time()
    outtype = canonical_outtype(outtype)
    stock = outtype in STOCK_TYPES or outtype == "auto"
    if not stock:
        checks.unused_with(dict(zip(STOCK_FLAGS, (bpw is not None, rounding is not None, not true_sequential,
                                                  imatrix is not None))), f"with --outtype {outtype} (stock-type options)")
    floats = outtype in ("f16", "f32")  # every tensor written as floats: the writer encodes the tables
    asked = {"token_embd.weight": embed_type, "output.weight": head_type}
    if not floats:
        checks.tables_as_stored(model, asked)
    embed_default, head_default = default_embed_types(outtype)
    embed_type, head_type = embed_type or embed_default, head_type or head_default
    if stock:
        tables = TablesSpec(embed_type, head_type)
        source = stock_source(model, out, force, outtype, bpw, rounding or "gptq", true_sequential, imatrix, q, tables)
    else:
        source = export_source(model, out, "quantized" if outtype == PLANES else outtype, force, q,
                               TablesSpec(embed_type, head_type))
    with source as (src, tok, meta):
        encoder = None
        if floats and not {embed_type, head_type} <= set(EMBED_TYPES):  # a k-quant: torch-side encoder
            from qdllm_export.targets.tables import GridEncoder

            encoder = GridEncoder(device=q["device"])
        write_gguf(out, src, tokenizer=tok, outtype=outtype, qdllm_meta=meta, embed_type=embed_type if floats else None,
                   head_type=head_type if floats else None, encoder=encoder, overwrite=force)
    written = GGUFBackend(out, decoded=False)
    info = written.describe()
    info["requested"] = {"outtype": outtype, "token_embd.weight": embed_type, "output.weight": head_type}
    types = {row["name"]: row["type"] for row in info["tensors"]}
    info["fallbacks"] = fallbacks_of(written.hparams, types, outtype, embed_type, head_type)
    if as_json:
        print(json.dumps({**info, "seconds": time.time() - t0}))
    else:
        print_closing(info, time.time() - t0)
        print_runtime_note(info, outtype)


@contextmanager
def stock_source(model: str, out: Path, force: bool, outtype: str, bpw: float | None, rounding: str,
                 true_sequential: bool, imatrix: Path | None, q: dict[str, Any],
                 tables: Any = None) -> Iterator[tuple[Any, Any, dict]]:
    """Yields (tensors, tokenizer, qdllm metadata) of MODEL with ggml-type linears: a plain checkpoint is
    quantized (``qdllm_export.targets.ggml``) into a temporary folder beside ``out``, removed afterwards."""
    from formats.checkpoint import QuantizedCheckpoint, is_quantized_checkpoint
    from formats.families import read_config
    from formats.tokenizer import load_tokenizer
    from qdllm_export.backends import resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.targets.ggml import StockSpec, check_budget, quantize_stock, stock_target

    folder = resolve(model)
    if not folder.is_dir():
        raise QdllmError(f"{folder}: expected a checkpoint folder or a bundled model name")
    spec = StockSpec(outtype, bpw, rounding, true_sequential, str(imatrix) if imatrix else None)
    if is_quantized_checkpoint(folder):
        raise QdllmError(f"{folder}: is already quantized; write its tensors as stored with --outtype {PLANES} (or f16), "
                         f"or pass the float checkpoint for --outtype {outtype}")
    given = quant_options_given(q)
    checks.unused_with({f: given[f] for f in ("--method", "--bits", "--group-size")},
                       f"with --outtype {outtype} (binary-plane options; see --rounding, --bpw)")
    if imatrix is not None:
        checks.unused_with({f: given[f] for f in ("--calib", "--calib-samples", "--seq-len", "--no-mcs", "--tune-iters",
                                                  "--equalize")}, "with --imatrix (it replaces calibration)")
    if q["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QdllmError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    _, hp, _ = read_config(folder)
    if bpw is not None:
        check_budget(hp, bpw)
    checks.output_file(out, force, [folder, q.get("calib"), imatrix])
    ccfg = CalibConfig(path=str(q["calib"]) if q["calib"] else None, n_samples=q["calib_samples"], seq_len=q["seq_len"],
                       mcs=q["mcs"], prefix_ratio=q["prefix_ratio"], seed=q["seed"])
    if imatrix is not None:
        stock_target(folder, spec, ccfg)  # refuses an imatrix of another model before any work
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with block_progress() as on_layer:
            _, rec = quantize_stock(folder, tmp / "q", spec, ccfg, device=q["device"], force=True, on_layer=on_layer,
                                    tables=tables, **tuning(q["tune_iters"], q["equalize"], q["seed"]))
        print_coverage(rec, stderr=True)
        meta = {"target": "ggml", "method": rec["method"], "rounding": spec.rounding if not imatrix else "importance",
                "true_sequential": true_sequential, "bits_per_weight_linear": rec["bits_per_weight_linear"],
                "calibration": "imatrix" if imatrix else "none" if rounding == "rtn" and outtype != "auto" else
                ("mcs" if ccfg.mcs else "plain"),  # rtn reads no text; auto's sensitivity pass does
                **({"bpw": bpw} if bpw is not None else {}), "fallbacks": rec.get("fallbacks", {}),
                **({"type_counts": rec["type_counts"]} if "type_counts" in rec else {})}
        yield QuantizedCheckpoint(tmp / "q"), load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None, meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fallbacks_of(hp: Any, types: dict[str, str], outtype: str, embed_type: str, head_type: str) -> dict[str, str]:
    """Tensors stored in another type than asked for (a width the type's block does not divide) -> that type."""
    from formats.tensors import is_linear

    want = {"token_embd.weight": embed_type, "output.weight": head_type}
    if outtype in STOCK_TYPES:
        want.update({n: outtype for n in types if is_linear(hp, n)})
    return {n: t for n, t in types.items() if n in want and t.lower() != want[n]}


def print_runtime_note(info: dict[str, Any], outtype: str) -> None:
    """Which engines run the file, the linears' types, and the fallbacks (as llama-quantize lists them)."""
    counts: dict[str, int] = {}
    for row in info["tensors"]:
        if row["name"].startswith("blk.") and row["name"].endswith(".weight") and "norm" not in row["name"]:
            t = "binary planes" if row["type"].startswith("Q1_0 planes") else row["type"]
            counts[t] = counts.get(t, 0) + 1
    types = ", ".join(f"{n} x {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    emb = {row["name"]: row["type"] for row in info["tensors"] if row["name"] in ("token_embd.weight", "output.weight")}
    console.print(f"linears: {types}; token_embd {emb['token_embd.weight']}, output {emb['output.weight']}", soft_wrap=True)
    for name, t in info.get("fallbacks", {}).items():
        asked = info["requested"].get(name, outtype)
        console.print(f"fallback: {name} is {t}: its rows do not fit {asked}'s block (llama-quantize's rule)", soft_wrap=True)
    if info.get("llama_cpp_runs"):
        console.print("runs in: stock llama.cpp (llama-diffusion-cli, llama-cpp-python; --runtime llama.cpp) and qdllm's "
                      "NumPy runtime (--runtime numpy)", soft_wrap=True)
    else:
        console.print("runs in: qdllm's runtimes only (generate / eval / verify, NumPy). Stock llama.cpp cannot load binary "
                      "planes; for a file it runs use --outtype q2_k, iq2_xs, q4_k or auto --bpw 2.5", soft_wrap=True)
