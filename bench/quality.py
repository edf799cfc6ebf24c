"""Quality benchmark: validation NLL of FP, RTN, GPTQ and Quant-dLLM (with ablations) on the bundled models.

    python bench/quality.py [--models tiny-llada tiny-dream] [--device cpu]

Every variant is quantized with the same calibration windows and evaluated on identical seeded masks
of the bundled validation text; bits per weight count every stored bit of the quantized linears.
Writes the table to docs/benchmarks.md (section "quality") and a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402
from qdllm_export.backends import open_model, resolve  # noqa: E402
from qdllm_export.calib import CalibConfig  # noqa: E402
from qdllm_export.cli.evaluate import DEFAULT_DATA, text_token_windows  # noqa: E402
from qdllm_export.pipeline import quantize_checkpoint  # noqa: E402
from qdllm_export.quant import QuantConfig  # noqa: E402
from runtime_ref.likelihood import masked_nll  # noqa: E402

VARIANTS: list[tuple[str, dict | None, dict]] = [
    ("FP (bf16 weights)", None, {}),
    ("RTN-2", dict(method="rtn", bits=2), {}),
    ("GPTQ-2", dict(method="gptq", bits=2), {}),
    ("GPTQ-3", dict(method="gptq", bits=3), {}),
    ("Quant-dLLM-2", dict(method="quant-dllm", bits=2), {}),
    ("Quant-dLLM-2 without MCS", dict(method="quant-dllm", bits=2), dict(mcs=False)),
    ("Quant-dLLM-2 without ABMP", dict(method="quant-dllm", bits=2, abmp=False), {}),
    ("Quant-dLLM-2 without data-aware weighting", dict(method="quant-dllm", bits=2, data_aware=False), {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llada", "tiny-dream"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--mc", type=int, default=8)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "quality.json")
    ap.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    ap.add_argument("--resume", action="store_true", help="Keep the rows already in --json and run only the missing ones.")
    a = ap.parse_args()
    results = json.loads(a.json.read_text())["results"] if a.resume and a.json.exists() else []
    done = {(r["model"], r["variant"]) for r in results}
    for model in a.models:
        folder = resolve(model)
        fp = open_model(model, device=a.device)
        windows = text_token_windows(fp.tokenizer, DEFAULT_DATA, a.eval_seq_len, a.eval_windows)
        fp_nll = next((r["nll"] for r in results if r["model"] == model and r["bits_per_weight"] is None), None)
        for label, q, c in VARIANTS:
            if (model, label) in done:
                continue
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                bpw = None
                if q is None:
                    be = fp
                else:
                    ccfg = CalibConfig(n_samples=a.calib_samples, seq_len=a.calib_seq_len, **c)
                    _, rec = quantize_checkpoint(folder, Path(tmp) / "q", QuantConfig(**q), ccfg, device=a.device)
                    bpw = rec["bits_per_weight_linear"]
                    be = open_model(str(Path(tmp) / "q"), device=a.device)
                res = masked_nll(be.logits, windows, mask_id=be.hparams.mask_token_id, n_mc=a.mc, seed=0,
                                 protect_first=be.hparams.spec.shift_logits)
            fp_nll = res.nll if fp_nll is None else fp_nll
            row = dict(model=model, variant=label, bits_per_weight=bpw, nll=res.nll, stderr=res.stderr,
                       delta=res.nll - fp_nll, seconds=time.time() - t0)
            results.append(row)
            print(json.dumps(row), flush=True)
            settings = {k: v for k, v in vars(a).items() if k not in ("json", "resume")}
            a.json.write_text(json.dumps({"machine": machine(), "settings": settings, "results": results}, indent=1))
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    results.sort(key=lambda r: (a.models.index(r["model"]) if r["model"] in a.models else 99, order[r["variant"]]))
    if a.no_doc:
        return
    rows = []
    for r in results:
        rows.append([r["model"], r["variant"], "16 (bf16)" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}",
                     f"{r['nll']:.4f} ± {r['stderr']:.4f}", f"{r['delta']:+.4f}"])
    body = (
        "## Quality: validation NLL of the bundled models (`bench/quality.py`)\n\n"
        f"Machine: {machine()}. Calibration: {a.calib_samples} windows x {a.calib_seq_len} tokens of the bundled "
        f"Shakespeare train text (MCS unless stated). Eval: masked-diffusion NLL bound (nats/token) on "
        f"{a.eval_windows} windows x {a.eval_seq_len} tokens of the held-out validation text, {a.mc} stratified masks "
        "per window, identical masks for every variant; ± is the standard error over windows (the deltas are paired, "
        "so their noise is much smaller). Bits per weight: every stored bit of the quantized linears (signs, fp16 "
        "scales, mu, plane counts); embeddings and head stay bf16.\n\n"
        + md_table(["model", "variant", "bits/weight (linears)", "NLL", "ΔNLL vs FP"], rows)
    )
    write_section("quality", body)


if __name__ == "__main__":
    main()
