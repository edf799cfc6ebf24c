"""Quality benchmark: validation NLL of FP, RTN, GPTQ and Quant-dLLM (ablations, objective choices) on
the bundled models, over several calibration seeds.

    python bench/quality.py [--models tiny-llada tiny-dream] [--seeds 0 1 2] [--device cpu] [--jobs 1]
                            [--variants LABEL ...] [--resume]

Every variant of one seed is quantized from the same calibration windows (the seed picks the windows and
the MCS masks) and evaluated on identical seeded masks of the held-out validation text. Bits per weight
count every stored bit of the quantized linears; for RTN/GPTQ also their native packing (codes plus an
fp16 scale and zero per group). Writes docs/quality.json and the ``quality`` (table "main") and
``quality-objective`` sections of docs/benchmarks.md (``--no-doc``: only the JSON; ``--report-only``: run
nothing, rewrite the sections from the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402

QD = dict(method="quant-dllm", bits=2)
QD1 = dict(QD, outlier_weight=1.0)  # the default before the objective sweep: each "objective" row changes one thing of it
# label -> (QuantConfig fields, CalibConfig overrides, true_sequential, table)
VARIANTS: dict[str, tuple[dict | None, dict, bool, str]] = {
    "FP (bf16 weights)": (None, {}, True, "main"),
    "RTN-2": (dict(method="rtn", bits=2), {}, True, "main"),
    "GPTQ-2": (dict(method="gptq", bits=2), {}, True, "main"),
    "GPTQ-2 act-order": (dict(method="gptq", bits=2, act_order=True), {}, True, "main"),
    "GPTQ-3": (dict(method="gptq", bits=3), {}, True, "main"),
    "GPTQ-3 act-order": (dict(method="gptq", bits=3, act_order=True), {}, True, "main"),
    "Quant-dLLM-2": (QD, {}, True, "main"),
    "Quant-dLLM-2 without MCS": (QD, dict(mcs=False), True, "main"),
    "Quant-dLLM-2 without ABMP": (dict(QD, abmp=False), {}, True, "main"),
    "Quant-dLLM-2 without data-aware weighting": (dict(QD, data_aware=False), {}, True, "main"),
    "Quant-dLLM-2 without true-sequential": (QD, {}, False, "main"),
    "Quant-dLLM-2 DOR outliers c=1 (the previous default)": (QD1, {}, True, "objective"),
    "Quant-dLLM-2 metric=full": (dict(QD1, metric="full"), {}, True, "objective"),
    "Quant-dLLM-2 inblock=gptq (no act-order)": (dict(QD1, inblock="gptq"), {}, True, "objective"),
    "Quant-dLLM-2 inblock=none (joint re-rounding, the previous default)": (dict(QD1, inblock="none"), {}, True, "objective"),
    "Quant-dLLM-2 percdamp=0.1": (dict(QD1, percdamp=0.1), {}, True, "objective"),
    "Quant-dLLM-2 DOR outliers off (c=0)": (dict(QD1, outlier_weight=0.0), {}, True, "objective"),
    "Quant-dLLM-2 percdamp=0.1, DOR outliers off (c=0)": (dict(QD1, percdamp=0.1, outlier_weight=0.0), {}, True, "objective"),
    "Quant-dLLM-2 iters=5": (dict(QD1, iters=5), {}, True, "objective"),
    "Quant-dLLM-2 iters=30": (dict(QD1, iters=30), {}, True, "objective"),
    "Quant-dLLM-2 ABMP score hdiag": (dict(QD1, importance="hdiag"), {}, True, "objective"),
    "Quant-dLLM-2 ABMP ratio 0.1": (dict(QD1, abmp_ratio=0.1), {}, True, "objective"),
    "Quant-dLLM-2 ABMP pool group": (dict(QD1, abmp_pool="group"), {}, True, "objective"),
    "Quant-dLLM-2 ABMP pool linear": (dict(QD1, abmp_pool="linear"), {}, True, "objective"),
}
DETERMINISTIC = ("FP (bf16 weights)", "RTN-2")  # no calibration data: one seed is every seed
# rows of another table repeated in a table as its point of comparison (on that table's seeds)
TABLE_REFERENCE = {"main": ("FP (bf16 weights)",), "objective": ("FP (bf16 weights)",)}


def _eval_setup(model: str, device: str, a: argparse.Namespace):
    from qdllm_export.backends import open_model
    from qdllm_export.cli.evaluate import DEFAULT_DATA, text_token_windows

    fp = open_model(model, device=device)
    return fp, text_token_windows(fp.tokenizer, DEFAULT_DATA, a.eval_seq_len, a.eval_windows)


def _nll(backend, windows, mc: int):
    from runtime_ref.likelihood import masked_nll

    return masked_nll(backend.logits, windows, mask_id=backend.hparams.mask_token_id, n_mc=mc, seed=0,
                      protect_first=backend.hparams.spec.shift_logits)


def run_one(model: str, label: str, seed: int, a: argparse.Namespace) -> dict:
    """Quantize ``model`` with variant ``label`` on calibration seed ``seed`` and evaluate it."""
    import torch

    from qdllm_export.backends import open_model, resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant import QuantConfig

    torch.set_num_threads(a.threads)
    q, c, ts, _ = VARIANTS[label]
    t0 = time.time()
    fp, windows = _eval_setup(model, a.device, a)
    bpw = native = whole = tables = None
    with tempfile.TemporaryDirectory() as tmp:
        if q is None:
            res = lin = _nll(fp, windows, a.mc)
        else:
            ccfg = CalibConfig(n_samples=a.calib_samples, seq_len=a.calib_seq_len, seed=seed, **c)
            _, rec = quantize_checkpoint(resolve(model), Path(tmp) / "q", QuantConfig(**q), ccfg, device=a.device,
                                         true_sequential=ts)
            bpw, native, whole = rec["bits_per_weight_linear"], rec.get("bits_per_weight_linear_native"), rec["bits_per_weight_model"]
            tables = "/".join(t["type"] for t in rec["tables"].values())
            res = _nll(open_model(str(Path(tmp) / "q"), device=a.device), windows, a.mc)  # the model as shipped
            lin = _nll(float_tables(Path(tmp) / "q", model, a.device), windows, a.mc)
    return dict(model=model, variant=label, seed=seed, bits_per_weight=bpw, bits_per_weight_native=native,
                bits_per_weight_model=whole, tables=tables, nll=res.nll, nll_linears=lin.nll, stderr=res.stderr,
                seconds=time.time() - t0)


def float_tables(folder: Path, model: str, device: str):
    """The quantized checkpoint at ``folder`` with the float checkpoint's embedding and head: its linears' loss alone."""
    from formats.checkpoint import QuantizedCheckpoint
    from formats.tensors import HFTensors, OverlaySource
    from qdllm_export.backends import TorchBackend, resolve

    src = OverlaySource(QuantizedCheckpoint(folder), HFTensors(resolve(model)), ["token_embd.weight", "output.weight"])
    return TorchBackend(src, folder, device=device)


def _tasks(a: argparse.Namespace, done: set) -> list[tuple[str, str, int]]:
    out = []  # the main table first, seed by seed, so a cut-short run still fills whole rows
    for table in ("main", "objective"):
        for seed in a.seeds:
            for label in a.variants:
                if VARIANTS[label][3] != table or (label in DETERMINISTIC and seed != a.seeds[0]):
                    continue
                out += [(m, label, seed) for m in a.models if (m, label, seed) not in done]
    return out


def summarise(results: list[dict], models: list[str], labels: list[str]) -> list[dict]:
    """Per (model, variant): mean and spread over seeds of NLL and of the paired delta against FP."""
    rows = []
    for model in models:
        fp = [r["nll"] for r in results if r["model"] == model and r["variant"] == "FP (bf16 weights)"]
        if not fp:
            continue
        for label in labels:
            rs = [r for r in results if r["model"] == model and r["variant"] == label]
            if not rs:
                continue
            deltas = [r["nll"] - fp[0] for r in rs]
            shipped = all("nll_linears" in r for r in rs)  # rows before the tables were chosen at quantize held bf16 ones
            lin = [r.get("nll_linears", r["nll"]) - fp[0] for r in rs]
            rows.append(dict(model=model, variant=label, n_seeds=len(rs), bits=rs[0]["bits_per_weight"],
                             native=rs[0].get("bits_per_weight_native"), whole=rs[0].get("bits_per_weight_model"),
                             tables=rs[0].get("tables") or "bf16", nll=statistics.mean(r["nll"] for r in rs),
                             stderr=rs[0]["stderr"], delta=statistics.mean(deltas) if shipped else None,
                             spread=statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                             delta_linears=statistics.mean(lin), deltas=deltas if shipped else lin))
    return rows


def _bits(r: dict) -> tuple[str, str]:
    if r["bits"] is None:
        return "16 (bf16)", "16"
    return f"{r['bits']:.3f}", "-" if r["native"] is None else f"{r['native']:.3f}"


def doc_body(rows: list[dict], a: argparse.Namespace, table: str) -> str:
    lines = []
    for r in rows:
        if VARIANTS[r["variant"]][3] != table and r["variant"] not in TABLE_REFERENCE[table]:
            continue
        planes, native = _bits(r)
        whole = "16 (bf16)" if r["bits"] is None else ("-" if r["whole"] is None else f"{r['whole']:.3f}")
        shipped = "-" if r["delta"] is None else f"{r['delta']:+.4f} ± {r['spread']:.4f}"
        lines.append([r["model"], r["variant"], planes, native, whole, r["tables"], shipped,
                      f"{r['delta_linears']:+.4f}", " ".join(f"{d:+.3f}" for d in r["deltas"])])
    head = ["model", "variant", "bits/w linears (planes)", "bits/w linears, native packing", "bits/w whole file",
            "tables (embd/head)", "ΔNLL vs FP, file as shipped (mean ± sd over seeds)",
            "ΔNLL vs FP, linears only (bf16 tables)", "ΔNLL per calibration seed (as shipped; '-' rows: linears only)"]
    return (
        f"Machine: {a.machine}. Calibration: {a.calib_samples} windows x {a.calib_seq_len} tokens of the bundled "
        "Shakespeare train text per calibration seed (the seed picks the windows and the MCS masks; the last column "
        "lists one ΔNLL per seed run; RTN and FP use no calibration; MCS and true-sequential unless stated). Eval: masked-diffusion NLL bound (nats/token) on "
        f"{a.eval_windows} windows x {a.eval_seq_len} tokens of the held-out validation text, {a.mc} stratified masks per "
        "window, identical masks for every variant; ± after the NLL is the standard error over windows, ± after ΔNLL "
        "the standard deviation over calibration seeds (deltas are paired, so they are far less noisy than the NLL). "
        "Bits per weight: every stored bit of the quantized linears as binary planes (signs, fp16 scales, mu, plane "
        "counts); for RTN/GPTQ also as their own packing (codes + fp16 scale + fp16 zero per 128-group). The file as "
        "shipped holds the embedding and head the checkpoint chose (default Q4_K / Q6_K, `quantize --embed-type / "
        "--head-type`); 'bits/w whole file' counts every tensor of it; 'linears only' evaluates the same quantized "
        "linears with the float checkpoint's bf16 embedding and head. Rows with '-' as shipped were measured before "
        "the tables were chosen at quantize (their files held bf16 tables).\n\n" + md_table(head, lines)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llada", "tiny-dream"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="LABEL")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="Parallel worker processes.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: small ops do not wait on a busy core).")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--mc", type=int, default=8)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "quality.json")
    ap.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    ap.add_argument("--resume", action="store_true", help="Keep the rows already in --json and run only the missing ones.")
    ap.add_argument("--report-only", action="store_true", help="Run nothing: rewrite the docs sections from --json.")
    a = ap.parse_args()
    if "FP (bf16 weights)" not in a.variants:
        a.variants.insert(0, "FP (bf16 weights)")
    prev = json.loads(a.json.read_text()) if (a.resume or a.report_only) and a.json.exists() else {}
    results = prev.get("results", [])
    a.machine = prev.get("machine", machine()) if results else machine()
    done = {(r["model"], r["variant"], r["seed"]) for r in results}
    tasks = [] if a.report_only else _tasks(a, done)
    settings = prev.get("settings") if a.report_only else {
        k: v for k, v in vars(a).items() if k not in ("json", "resume", "report_only", "machine", "variants", "seeds", "no_doc")}

    def save() -> None:
        a.json.write_text(json.dumps({"machine": a.machine, "settings": settings, "results": results}, indent=1))

    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        futures = [pool.submit(run_one, m, l, s, a) for m, l, s in tasks]
        for f in as_completed(futures):
            row = f.result()
            results.append(row)
            print(json.dumps(row), flush=True)
            save()
    for r in [r for r in results if r["variant"] in DETERMINISTIC]:  # one seed stands for all
        for s in a.seeds[1:]:
            if not any(x["model"] == r["model"] and x["variant"] == r["variant"] and x["seed"] == s for x in results):
                results.append({**r, "seed": s})
    save()
    if a.no_doc:
        return
    rows = summarise(results, a.models, list(VARIANTS))
    write_section("quality", "## Quality: validation NLL of the bundled models (`bench/quality.py`)\n\n" + doc_body(rows, a, "main"))
    obj_seeds = {r["seed"] for r in results if VARIANTS[r["variant"]][3] == "objective"}
    obj_rows = summarise([r for r in results if r["seed"] in obj_seeds], a.models, list(VARIANTS))
    write_section("quality-objective", "## Quant-dLLM objective choices, by NLL (`bench/quality.py`)\n\n"
                  "Each row changes one setting of the configuration before this sweep (`outlier_weight=1`, the first "
                  "row); the `c=0` row is today's default (the main table's Quant-dLLM-2). The choices and their paired "
                  "per-seed differences are in docs/quantizer.md, \"Choices by NLL\".\n\n"
                  + doc_body(obj_rows, a, "objective"))


if __name__ == "__main__":
    main()
