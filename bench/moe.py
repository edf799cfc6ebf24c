"""LLaDA-MoE quality table (issue 18): ΔNLL of every output of a mixture beside llama.cpp's own Q2_K recipe.

    python bench/moe.py run [--model tiny-llada-moe] [--kinds planes gptq2 ...] [--seeds 0 1 2] [--threads 2]
                            [--device cuda] [--fill-share 0]
    python bench/moe.py report

Kinds: ``planes`` (Quant-dLLM 2), ``gptq2`` / ``rtn2`` (2-bit g128 planes), ``q2_k``, ``auto`` (``--bpw 2.5``),
``int2`` (MatMulNBits, block 128): each a quantized checkpoint from MCS calibration (128 x 256 tokens, the seed's
windows and masks), with the defaults (block-output tuning on), evaluated as shipped (embedding Q4_K, head Q6_K)
in PyTorch. ``llama-q2_k`` / ``llama-q2_k-mcs``: ``llama_model_quantize``'s Q2_K recipe on our f16 GGUF of the model
(Q4_K / Q6_K tables like ours), without an imatrix and with our MCS imatrix of the seed, evaluated by qdllm's NumPy
forward of the file. Every file: the masked-diffusion NLL bound on 64 windows x 128 tokens of the bundled
validation text, 4 Monte-Carlo masks, identical masks for every file; ΔNLL against the float model. Rows append to
``docs/results/moe.jsonl``; ``report`` writes the section "moe" of docs/benchmarks.md. ``--fill-share S`` sets
``models.llada_moe.FILL_SHARE`` (0: no calibration fill) for the fill ablation, reported in its own table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "moe.jsonl"
OURS = ("planes", "gptq2", "rtn2", "q2_k", "auto", "int2")
LLAMA = ("llama-q2_k", "llama-q2_k-mcs")
LABELS = {"planes": "ours Quant-dLLM-2 (planes)", "gptq2": "ours GPTQ-2 g128 (planes)", "rtn2": "RTN-2 g128 (planes)",
          "q2_k": "ours q2_k", "auto": "ours auto --bpw 2.5", "int2": "ours int2 (MatMulNBits b128)",
          "llama-q2_k": "llama.cpp Q2_K recipe, no imatrix", "llama-q2_k-mcs": "llama.cpp Q2_K recipe, our MCS imatrix"}


def target(folder: Path, kind: str, ccfg, device: str):
    from qdllm_export.quant import QuantConfig

    if kind in ("q2_k", "auto"):
        from qdllm_export.targets.ggml import StockSpec, stock_target

        return stock_target(folder, StockSpec(kind, bpw=2.5 if kind == "auto" else None), ccfg, device=device, tuned=True)
    if kind == "int2":
        from qdllm_export.targets.nbits import NBitsSpec, nbits_target

        return nbits_target(folder, NBitsSpec("int2", block_size=128), ccfg, device=device)
    return {"planes": QuantConfig(method="quant-dllm", bits=2), "gptq2": QuantConfig(method="gptq", bits=2),
            "rtn2": QuantConfig(method="rtn", bits=2)}[kind]


def ours(folder: Path, kind: str, ccfg, tmp: Path, device: str) -> tuple[str, dict]:
    """(path of the quantized checkpoint, its record)."""
    from qdllm_export.pipeline import quantize_checkpoint

    _, rec = quantize_checkpoint(folder, tmp / kind, target(folder, kind, ccfg, device), ccfg, device=device)
    return str(tmp / kind), rec


def llama(folder: Path, kind: str, ccfg, tmp: Path, device: str) -> tuple[str, dict]:
    """(path of llama.cpp's Q2_K-recipe GGUF of the f16 file, its linears' bits per weight)."""
    from bench.llamacpp import llama_file
    from formats.gguf import write_gguf
    from formats.imatrix import write_imatrix
    from formats.tensors import HFTensors
    from formats.tokenizer import load_tokenizer
    from qdllm_export.imatrix import collect_imatrix

    f16 = tmp / "f16.gguf"
    if not f16.exists():
        write_gguf(f16, HFTensors(folder), tokenizer=load_tokenizer(folder), outtype="f16")
    im = None
    if kind.endswith("-mcs"):
        im = write_imatrix(tmp / f"im-{ccfg.seed}.gguf", collect_imatrix(folder, ccfg, device=device), overwrite=True)
    out = llama_file(tmp, f16, "q2_k", f"mcs{ccfg.seed}" if im else "none", im)
    return str(out), {"bits_per_weight_linear": _linear_bits(out)}


def _linear_bits(path: Path) -> float:
    """Bits per weight of the block linears of a GGUF file (stacked experts included)."""
    import gguf

    bits = n = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and any(s in t.name for s in ("attn_q.", "attn_k.", "attn_v.", "attn_output.",
                                                                   "ffn_gate", "ffn_up", "ffn_down")) \
                and "ffn_gate_inp" not in t.name:
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
    return bits / n


def run(a: argparse.Namespace) -> None:
    import torch

    from qdllm_export.backends import open_model, resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.cli.evaluate import DEFAULT_DATA, text_token_windows
    from runtime_ref.likelihood import masked_nll

    torch.set_num_threads(a.threads)
    folder = resolve(a.model)
    if a.fill_share is not None:
        from qdllm_export.models import llada_moe

        llada_moe.FILL_SHARE = a.fill_share

    def nll(be, windows) -> float:
        return masked_nll(be.logits, windows, mask_id=be.hparams.mask_token_id, n_mc=a.mc, seed=0,
                          protect_first=be.hparams.spec.shift_logits).nll

    fp = open_model(a.model, device=a.device)
    windows = text_token_windows(fp.tokenizer, DEFAULT_DATA, 128, a.windows)
    base = nll(fp, windows)
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for seed in a.seeds:
            ccfg = CalibConfig(n_samples=a.calib_samples, seq_len=256, seed=seed)
            for kind in a.kinds:
                if kind == "llama-q2_k" and seed != a.seeds[0]:
                    continue  # no calibration: one file
                t0 = time.time()
                path, rec = (llama if kind in LLAMA else ours)(folder, kind, ccfg, tmp, a.device)
                be = open_model(path, device=a.device) if kind in OURS else open_model(path)
                row = dict(model=a.model, kind=kind, seed=seed, dnll=nll(be, windows) - base, base=base,
                           bits_per_weight_linear=rec["bits_per_weight_linear"], seconds=time.time() - t0,
                           coverage=rec.get("expert_coverage"), windows=a.windows, mc=a.mc, threads=a.threads,
                           device=a.device, fill_share=a.fill_share, note=a.note)
                print(json.dumps({k: v for k, v in row.items() if k != "coverage"}), flush=True)
                if a.results:
                    with open(a.results, "a") as f:
                        f.write(json.dumps(row) + "\n")


def _rows() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []


def _mean_cell(d: list[float]) -> str:
    spread = f" ({min(d):+.3f} to {max(d):+.3f})" if len(d) > 1 else ""
    return f"{statistics.mean(d):+.4f}{spread}"


def report(_: argparse.Namespace) -> None:
    rows = _rows()
    main_rows = [r for r in rows if r.get("fill_share") is None]
    table = []
    for model in sorted({r["model"] for r in rows}):
        for kind in (*OURS, *LLAMA):
            sel = [r for r in main_rows if r["model"] == model and r["kind"] == kind]
            if not sel:
                continue
            table.append([model, LABELS[kind], f"{sel[0]['bits_per_weight_linear']:.3f}",
                          _mean_cell([r["dnll"] for r in sel]), len(sel), f"{statistics.mean(r['seconds'] for r in sel):.0f}",
                          ", ".join(sorted({r.get("device", "cpu") for r in sel}))])
    notes = "".join(f"\n\n{m}: {n}" for m, n in sorted({(r["model"], r["note"]) for r in rows if r.get("note")}))
    cov = next((r["coverage"] for r in main_rows if r.get("coverage")), None)
    cov_text = ""
    if cov:
        from qdllm_export.cli.quantize import coverage_text

        cov_text = "\n\nCalibration coverage of the first quantized file: " + coverage_text({"expert_coverage": cov}) + ".\n"
    body = ("## LLaDA-MoE: every output of a mixture beside llama.cpp's Q2_K recipe (`bench/moe.py`, issue 18)\n\n"
            f"Machines: our rows on the device of the last column (the note names it), llama.cpp's on {machine()}. ΔNLL (nats/token) of each file as shipped (embedding Q4_K, head Q6_K), against the "
            "float model, on identical masks: masked-diffusion bound on 64 windows x 128 tokens of the bundled "
            "validation text, 4 Monte-Carlo masks. Ours: MCS calibration 128 x 256 tokens per seed, default "
            "block-output tuning; evaluated in PyTorch on the device named. llama.cpp: `llama_model_quantize`'s Q2_K recipe of our f16 "
            "GGUF (its own mix: Q2_K with Q3_K / Q4_K for attn_v, attn_output, ffn_down), evaluated by qdllm's NumPy "
            "forward of the file. Mean over calibration seeds, range in brackets; per row in `docs/results/moe.jsonl`.\n\n"
            + md_table(["model", "file", "bits/w linears", "ΔNLL", "seeds", "seconds", "device"], table)
            + _fill_table(rows) + notes + cov_text)
    write_section("moe", body)


def _fill_table(rows: list[dict]) -> str:
    """The calibration-fill ablation: each kind's ΔNLL with the default fill and with ``--fill-share`` runs, on the
    seeds both have."""
    out, means = [], {}
    for model, kind, share in sorted({(r["model"], r["kind"], r["fill_share"]) for r in rows if r.get("fill_share") is not None}):
        abl = {r["seed"]: r["dnll"] for r in rows if (r["model"], r["kind"], r.get("fill_share")) == (model, kind, share)}
        base = {r["seed"]: r["dnll"] for r in rows if (r["model"], r["kind"], r.get("fill_share")) == (model, kind, None)}
        seeds = sorted(set(abl) & set(base))
        if seeds:
            out.append([model, LABELS[kind], _mean_cell([base[s] for s in seeds]), f"{share:g}",
                        _mean_cell([abl[s] for s in seeds]), " ".join(map(str, seeds))])
            means.setdefault((model, share), []).append((statistics.mean(base[s] for s in seeds),
                                                         statistics.mean(abl[s] for s in seeds)))
    if not out:
        return ""
    summary = "; ".join(f"{m} fill {sh:g}: {statistics.mean(a for _, a in v):+.4f} against {statistics.mean(b for b, _ in v):+.4f} "
                        f"with the default ({len(v)} kinds)" for (m, sh), v in sorted(means.items()))
    return ("\n\nCalibration fill ablation (`--fill-share`): an expert under that share of its fair share of a batch's "
            "tokens also sees all tokens at the missing share's weight, for its Hessian; 0 turns the fill off. Same "
            "seeds, masks and device as the table above.\n\n"
            + md_table(["model", "file", "ΔNLL, default fill (0.25)", "fill share", "ΔNLL", "seeds"], out)
            + f"\n\nMean ΔNLL over the kinds: {summary}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="tiny-llada-moe", help="bundled name or checkpoint folder")
    r.add_argument("--kinds", nargs="+", default=[*OURS, *LLAMA], choices=[*OURS, *LLAMA])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--device", default="cpu", help="torch device of our quantizers and of their files' NLL")
    r.add_argument("--fill-share", type=float, help="models.llada_moe.FILL_SHARE for this run (0: no calibration fill)")
    r.add_argument("--windows", type=int, default=64)
    r.add_argument("--mc", type=int, default=4)
    r.add_argument("--calib-samples", type=int, default=128)
    r.add_argument("--note", default="", help="what the model is (kept with each row, printed by report)")
    r.add_argument("--results", default=str(RESULTS), help="JSONL to append rows to ('' for none: a smoke run)")
    sub.add_parser("report")
    a = ap.parse_args()
    (run if a.cmd == "run" else report)(a)


if __name__ == "__main__":
    main()
