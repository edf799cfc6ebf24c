"""CPU runtime benchmark of the ONNX exports: fp32 vs binary-plane quantized (both kernels).

One full-canvas forward (default 256 tokens, batch 1) of a random model with LLaDA's shape ratios
(default d_model 1024, 16 layers, 16 heads, d_ff 3072, vocab 32000: 284M parameters), its linears
random binary planes (block plane counts cycling 1,2,3 / 2,2,1,3 / 3,1: mean 2, i.e. ~2.2 bits per
weight with scales). Variants, each run in its own subprocess (so RSS is its own):

* ``fp32``: the same model dequantized (``outtype="f32"``), plain MatMuls; the reference logits.
* ``function``: ``qdllm.PlaneMatMul`` (standard ops; dequantizes one linear at a time per call).
* ``matmulnbits-acc0`` / ``-acc4``: ``com.microsoft.MatMulNBits`` bits=2, accuracy_level 0 (fp32
  compute, exact) / 4 (int8 activations).

Quantized files keep ``token_embd`` / ``output`` in f16 (the writer's default), fp32 in f32; their random
values are f16-representable, so all variants compute the same function and the errors are the kernels'.
Prints a markdown table (machine named) and writes JSON::

    python bench/runtime.py [--layers 16 --d-model 1024 ...] [--json .out/bench_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

VARIANTS = ("fp32", "function", "matmulnbits-acc0", "matmulnbits-acc4")
PATTERNS = ((1, 2, 3), (2, 2, 1, 3), (3, 1))


def random_model(hp, seed: int = 0):
    """DictTensors: random quantized linears (planes cycling PATTERNS), random float embeddings/norms/head."""
    from formats.qtensor import QuantizedTensor
    from formats.tensors import DictTensors, canonical_names, canonical_shape, is_linear

    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(canonical_names(hp)):
        shape = canonical_shape(hp, name)
        if is_linear(hp, name):
            n_out, n_in = shape
            nb = n_in // 128
            pat = PATTERNS[i % len(PATTERNS)]
            planes = np.array([pat[j % len(pat)] for j in range(nb)], np.uint8)
            p = int(planes.sum())
            out[name] = QuantizedTensor(
                (n_out, n_in), 128, planes, rng.integers(0, 256, (p, n_out, 16), dtype=np.uint8),
                (np.abs(rng.standard_normal((p, n_out), np.float32)) * 0.02 + 1e-3).astype(np.float16),
                rng.uniform(0.5, 1.5, (p, 128)).astype(np.float16), name=name)
        elif name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        else:  # f16-representable, so the quantized files' f16 embeddings / head equal fp32's exactly
            out[name] = (0.05 * rng.standard_normal(shape, np.float32)).astype(np.float16).astype(np.float32)
    return DictTensors(hp, out)


def machine() -> dict:
    import onnx
    import onnxruntime as ort
    import psutil

    cpu, flags = platform.processor() or "?", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in have]
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "simd": flags, "ram_gb": round(psutil.virtual_memory().total / 1e9, 1), "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "python": platform.python_version(), "os": platform.platform()}


# ------------------------------------------------------------------------------------- child process


def _hwm() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(path: str, threads: int, canvas: int, logits_out: str) -> None:
    """Load one model, then serve the driver over stdin/stdout: "run" -> one timed forward; "stop" -> figures."""
    import psutil

    from runtime_ref.ort import OrtBackend

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    be = OrtBackend(path, threads=threads)
    load = time.perf_counter() - t0
    rss_load = proc.memory_info().rss
    ids = np.random.default_rng(123).integers(0, be.hparams.n_vocab, (1, canvas))
    print(json.dumps({"ready": True}), flush=True)
    first = True
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            out = be.raw_logits(ids)
            dt = time.perf_counter() - t0
            if first:
                np.save(logits_out, out)
                first = False
            print(json.dumps({"t": dt}), flush=True)
        elif line.strip() == "stop":
            break
    print(json.dumps({"load_s": load, "rss_before_mb": rss0 / 1e6, "rss_loaded_mb": rss_load / 1e6,
                      "rss_after_mb": proc.memory_info().rss / 1e6, "peak_rss_mb": _hwm() / 1e6,
                      "describe": be.describe()}, default=str), flush=True)


# ------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ff", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=str(ROOT / ".out" / "bench_runtime.json"))
    ap.add_argument("--workdir", default=None, help="where the .onnx files go (default: a temporary folder)")
    ap.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "CANVAS", "LOGITS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.threads, int(a.child[1]), a.child[2])
        return 0

    from formats.families import HParams
    from formats.onnx import write_onnx

    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    hp = HParams(family="llada", n_vocab=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                 n_kv_heads=a.heads, d_ff=a.ff, rope_theta=500000.0, norm_eps=1e-5, mask_token_id=a.vocab - 1,
                 context_length=4096)
    n_lin = a.layers * (4 * a.d_model * a.d_model + 3 * a.d_model * a.ff)
    n_params = n_lin + 2 * a.vocab * a.d_model + (2 * a.layers + 1) * a.d_model
    tmp = tempfile.TemporaryDirectory(prefix="qdllm-bench-") if a.workdir is None else None
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    mach = machine()
    print(f"model: llada-shaped, d_model {a.d_model}, {a.layers} layers, {a.heads} heads, d_ff {a.ff}, vocab {a.vocab}: "
          f"{n_params / 1e6:.0f}M parameters ({n_lin / 1e6:.0f}M in quantized linears); canvas {a.canvas} tokens, "
          f"batch 1, {a.threads} threads, {a.reps} round-robin runs after 1 warm-up", file=sys.stderr)
    t0 = time.perf_counter()
    src = random_model(hp)
    files = {}
    for v in variants:
        p = work / f"{v}.onnx"
        if v == "fp32":
            write_onnx(p, src, outtype="f32", overwrite=True, qdllm_meta={"bench": "random planes, dequantized"})
        elif v == "function":
            write_onnx(p, src, kernel="function", overwrite=True, qdllm_meta={"bench": "random planes"})
        else:
            write_onnx(p, src, kernel="matmulnbits", accuracy_level=int(v[-1]), overwrite=True,
                       qdllm_meta={"bench": "random planes"})
        files[v] = p
        print(f"  wrote {p.name}: {p.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    del src
    # one process per variant, all loaded first (one at a time), then timed round-robin so that a
    # change in machine load hits every variant alike
    procs, results = {}, {}
    for v in variants:
        pr = subprocess.Popen([sys.executable, __file__, "--threads", str(a.threads), "--child", str(files[v]),
                               str(a.canvas), str(work / f"{v}.logits.npy")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if not pr.stdout.readline():
            raise SystemExit(f"variant {v} failed to load")
        procs[v] = pr
        results[v] = {"times_s": []}

    def run(v: str) -> float:
        procs[v].stdin.write("run\n")
        procs[v].stdin.flush()
        line = procs[v].stdout.readline()
        if not line:
            raise SystemExit(f"variant {v} died")
        return json.loads(line)["t"]

    for v in variants:  # warm-up (allocates the arenas; saves the logits)
        results[v]["first_s"] = run(v)
    for rep in range(a.reps):
        for v in variants:
            results[v]["times_s"].append(run(v))
        print(f"  round {rep + 1}/{a.reps}: " + ", ".join(f"{v} {1e3 * results[v]['times_s'][-1]:.0f} ms" for v in variants),
              file=sys.stderr)
    for v in variants:
        out, _ = procs[v].communicate("stop\n", timeout=600)
        r = results[v]
        r.update(json.loads(out.strip().splitlines()[-1]))
        r["median_ms"] = 1e3 * float(np.median(r["times_s"]))
        r["min_ms"] = 1e3 * float(np.min(r["times_s"]))
    ref = np.load(work / "fp32.logits.npy") if "fp32" in results else None
    for v, r in results.items():
        if ref is not None:
            y = np.load(work / f"{v}.logits.npy")
            r["max_rel_err_vs_fp32"] = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
            r["top1_agreement_vs_fp32"] = float((y.argmax(-1) == ref.argmax(-1)).mean())
        d = r["describe"]
        r["file_mb"] = d["size_bytes"] / 1e6
        r["bits_per_weight_linears"] = d["bits_per_weight_linear"]
    base = results.get("fp32", {}).get("median_ms")
    lines = [
        f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs ({mach['physical_cores']} cores), "
        f"SIMD {'/'.join(mach['simd']) or 'n/a'}, {mach['ram_gb']} GB RAM; onnxruntime {mach['onnxruntime']} "
        f"(CPUExecutionProvider, {a.threads} intra-op threads), Python {mach['python']}.",
        f"Model: random LLaDA-shaped, d_model {a.d_model}, {a.layers} layers, {a.heads} heads, d_ff {a.ff}, "
        f"vocab {a.vocab}: {n_params / 1e6:.0f}M parameters, {n_lin / 1e6:.0f}M of them in binary-plane linears "
        f"(mean 2 planes per 128-column block). One forward of a {a.canvas}-token canvas, batch 1; "
        f"median (min) of {a.reps} runs after a warm-up run; each variant in its own process, all loaded, "
        f"timed round-robin. max rel err = max|y - y_fp32| / max|y_fp32| over all logits.",
        "",
        "| variant | file MB | linears bits/weight in file | load s | median ms (min) | speed vs fp32 | RSS after load MB | peak RSS MB | max rel err vs fp32 | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        bpw = "32 (fp32)" if r["bits_per_weight_linears"] is None else f"{r['bits_per_weight_linears']:.2f}"
        speed = f"{base / r['median_ms']:.2f}x" if base else "n/a"
        err = "ref" if v == "fp32" else (f"{r['max_rel_err_vs_fp32']:.1e}" if "max_rel_err_vs_fp32" in r else "n/a")
        agree = "ref" if v == "fp32" else (f"{100 * r['top1_agreement_vs_fp32']:.1f}%" if "top1_agreement_vs_fp32" in r else "n/a")
        lines.append(f"| {v} | {r['file_mb']:.0f} | {bpw} | {r['load_s']:.1f} | {r['median_ms']:.0f} ({r['min_ms']:.0f}) | {speed} | "
                     f"{r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} | {err} | {agree} |")
    lines.append("")
    lines.append(f"RSS of the process before loading (python, numpy, onnxruntime): about "
                 f"{np.median([r['rss_before_mb'] for r in results.values()]):.0f} MB.")
    table = "\n".join(lines)
    print(table)
    for r in results.values():
        r.pop("describe", None)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"machine": mach, "model": {"d_model": a.d_model, "layers": a.layers, "heads": a.heads,
                                        "d_ff": a.ff, "vocab": a.vocab, "n_params": n_params, "n_quantized": n_lin},
                                        "canvas": a.canvas, "threads": a.threads, "reps": a.reps, "results": results,
                                        "markdown": table}, indent=2))
    print(f"(json: {a.json})", file=sys.stderr)
    if not a.no_doc:
        from bench.report import write_section

        write_section("runtime", "## Runtime: one full-canvas forward in onnxruntime (`bench/runtime.py`)\n\n" + table)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
