"""Block-output tuning and equalization (issue 16): ΔNLL of the shipped checkpoint per variant, family and seed.

    python bench/recon.py run MODEL KIND VARIANT [--seeds 0 1 2] [--iters N] [--lr X] [--batch W] [--threads 1]
    python bench/recon.py report

``KIND``: q2_k | auto (``--bpw 2.5``) | int2 (MatMulNBits, block 128) | planes (Quant-dLLM 2) | gptq3 (GPTQ 3-bit
g128 planes, the reference). ``VARIANT``: ``base`` (no tuning), ``tune`` (block-output tuning, ``--iters``
steps, default ``quant.recon.DEFAULT_ITERS`` of the kind), ``eq`` (equalization alone), ``eq+tune`` (both). Every run quantizes the bundled
model with MCS calibration (128 x 256 tokens, the seed's windows and masks) and measures the masked-diffusion NLL
bound of the quantized checkpoint as shipped (embedding Q4_K and head Q6_K included) in PyTorch on 64 windows x
128 tokens of the bundled validation text, 4 Monte-Carlo masks, the same masks for every file; ΔNLL against
the float model. Rows append to ``docs/results/recon.jsonl``; ``report`` writes the section "recon" of
docs/benchmarks.md (means over seeds, per seed in the JSONL).
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

RESULTS = ROOT / "docs" / "results" / "recon.jsonl"
KINDS = ("q2_k", "auto", "int2", "planes", "gptq3")
VARIANTS = ("base", "tune", "eq", "eq+tune")
MODELS = ("tiny-llada", "tiny-dream", "tiny-llada-moe")
EQ_SCORING = 2  # 2: the no-change candidate scored as s = 1 (2026-12-06); rows without the key scored it as 1/mean|W|


def target(model: str, kind: str, ccfg, bpw: float = 2.5):
    """The pipeline target of ``kind`` for the bundled ``model`` (``bpw``: auto's budget)."""
    from qdllm_export.backends import resolve
    from qdllm_export.quant import QuantConfig

    if kind in ("q2_k", "auto"):
        from qdllm_export.targets.ggml import StockSpec, stock_target

        return stock_target(resolve(model), StockSpec(kind, bpw=bpw if kind == "auto" else None), ccfg)
    if kind == "int2":
        from qdllm_export.targets.nbits import NBitsSpec, nbits_target

        return nbits_target(resolve(model), NBitsSpec("int2", block_size=128), ccfg)
    return {"planes": QuantConfig(method="quant-dllm", bits=2), "gptq3": QuantConfig(method="gptq", bits=3)}[kind]


def run(a: argparse.Namespace) -> None:
    import torch

    from qdllm_export.backends import open_model, resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.cli.evaluate import DEFAULT_DATA, text_token_windows
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant.recon import ReconConfig
    from runtime_ref.likelihood import masked_nll

    torch.set_num_threads(a.threads)

    def nll(be, windows) -> float:
        return masked_nll(be.logits, windows, mask_id=be.hparams.mask_token_id, n_mc=4, seed=0,
                          protect_first=be.hparams.spec.shift_logits).nll

    fp = open_model(a.model)
    windows = text_token_windows(fp.tokenizer, DEFAULT_DATA, 128, 64)
    base = nll(fp, windows)
    iters = a.iters if "tune" in a.variant else 0
    for seed in a.seeds:
        t0 = time.time()
        ccfg = CalibConfig(n_samples=128, seq_len=256, seed=seed)
        recon = ReconConfig(iters=iters, lr=a.lr, seed=seed, **({"batch": a.batch} if a.batch else {}))
        with tempfile.TemporaryDirectory() as tmp:
            _, rec = quantize_checkpoint(resolve(a.model), Path(tmp) / "q", target(a.model, a.kind, ccfg, a.bpw), ccfg,
                                         recon=recon, equalize=a.variant.startswith("eq"))
            v = nll(open_model(str(Path(tmp) / "q")), windows)
        blocks = rec.get("reconstruction", {}).get("blocks", [])
        steps = blocks[0]["iters"] if blocks else 0  # the default resolved by what was tuned
        row = dict(model=a.model, kind=a.kind, variant=a.variant, seed=seed, iters=steps, lr=a.lr, dnll=v - base,
                   bits_per_weight_linear=rec["bits_per_weight_linear"], seconds=time.time() - t0,
                   kept=[b["kept"] for b in blocks], loss_ratio=[b["loss_after"] / b["loss_before"] for b in blocks],
                   threads=a.threads, **({"batch": a.batch} if a.batch else {}), **({"eq_scoring": EQ_SCORING} if a.variant.startswith("eq") else {}),
                   **({"bpw": a.bpw} if a.kind == "auto" else {}))
        print(json.dumps(row), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _rows() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []


def _key(row: dict) -> tuple:
    """What a row measured: the same key measured again (a later tree) replaces it in the report."""
    return (row["model"], row["kind"], row["variant"], row["iters"], row.get("lr"), row["seed"],
            row.get("bpw", 2.5 if row["kind"] == "auto" else None),
            row.get("steps_bf16"), row.get("eq_scoring"), row.get("batch"))


def _old_eq(row: dict) -> bool:
    """An equalization row measured before the no-change candidate was scored as s = 1."""
    return row["variant"].startswith("eq") and row.get("eq_scoring", 1) < EQ_SCORING


def _cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    m = statistics.mean(r["dnll"] for r in rows)
    return f"{m:+.4f} ({len(rows)})" if len(rows) > 1 else f"{m:+.4f} (1)"


def report(_: argparse.Namespace) -> None:
    from qdllm_export.quant.recon import DEFAULT_ITERS

    rows = list({_key(r): r for r in _rows()}.values())  # a later measurement of the same setting and seed supersedes
    main = [r for r in rows if r.get("lr") is None and r["variant"] in VARIANTS and r["iters"] in (0, *DEFAULT_ITERS.values())
            and not _old_eq(r) and not r.get("steps_bf16") and not r.get("batch")]
    columns = sorted({(VARIANTS.index(r["variant"]), r["iters"]) for r in main})
    labels = [VARIANTS[v] + (f" {it}" if it else "") for v, it in columns]
    table = []
    budgets = sorted({r.get("bpw", 2.5) for r in main if r["kind"] == "auto"})
    for kind, bpw in [(k, b) for k in KINDS for b in (budgets if k == "auto" else [None])]:
        for model in MODELS:
            sel = [r for r in main if r["kind"] == kind and r["model"] == model and (bpw is None or r.get("bpw", 2.5) == bpw)]
            if not sel:
                continue
            cells = [_cell([r for r in sel if (VARIANTS.index(r["variant"]), r["iters"]) == c]) for c in columns]
            table.append([kind if bpw is None else f"auto --bpw {bpw}", model, f"{sel[0]['bits_per_weight_linear']:.3f}", *cells])
    sweep = [r for r in rows if r not in main]
    sweep_rows = [[r["kind"], r["model"], r["variant"] + (" (old no-change scoring)" if _old_eq(r) else "") + (" (bf16 steps)" if r.get("steps_bf16") else "")
                   + (f" ({r['batch']} window{'s' if r['batch'] != 1 else ''} a step)" if r.get("batch") else ""),
                   r["iters"], r.get("lr") or "default", r["seed"], f"{r['dnll']:+.4f}"]
                  for r in sweep]
    body = ("## Block-output tuning and equalization (`bench/recon.py`, issue 16)\n\n"
            f"Machines: {machine()} for the rows of 2026-12-06 (equalization re-measured, tiny-llada-moe), an Intel "
            "Xeon @ 2.80GHz (2 cores) for the earlier ones; the figures are ΔNLL, not times. ΔNLL (nats/token) of the quantized checkpoint as shipped (embedding Q4_K, head "
            "Q6_K) in PyTorch, against the float model: masked-diffusion bound on 64 x 128 tokens of the bundled "
            "validation text, 4 Monte-Carlo masks, identical masks for every file; MCS calibration 128 x 256 "
            "tokens. Each cell: mean over calibration seeds, the latest measurement of each (their count in brackets; per seed, with each block's "
            "loss ratio and the time, in `docs/results/recon.jsonl`). `tune N`: block-output tuning with N steps a "
            f"block (the default: {DEFAULT_ITERS['grid']} for the grids, {DEFAULT_ITERS['planes']} for planes); "
            "`eq`: equalization; gptq3 (GPTQ 3-bit g128 planes, MCS) is the reference planes must reach.\n\n"
            + md_table(["kind", "model", "bits/w linears", *labels], table)
            + "\n\nOther settings tried (one row per seed; lr: the first step as a fraction of a code step, before "
            "the per-kind scale):\n\n"
            + md_table(["kind", "model", "variant", "steps", "lr", "seed", "ΔNLL"], sweep_rows) + "\n")
    write_section("recon", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model", choices=MODELS)
    r.add_argument("kind", choices=KINDS)
    r.add_argument("variant", choices=VARIANTS)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--iters", type=int, default=None)
    r.add_argument("--lr", type=float, default=None)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--batch", type=int, default=None, help="tuning windows a step (default: the library's).")
    r.add_argument("--bpw", type=float, default=2.5, help="auto's budget, bits per weight of the linears.")
    sub.add_parser("report")
    a = ap.parse_args()
    (run if a.cmd == "run" else report)(a)


if __name__ == "__main__":
    main()
