"""CPU runtime benchmark of the ONNX exports: fp32, binary planes (both kernels) and MatMulNBits grids.

One full-canvas forward (default 256 tokens, batch 1) of a random model with LLaDA's shape ratios
(default d_model 1024, 16 layers, 16 heads, d_ff 3072, vocab 32000: 284M parameters). Variants, each run
in its own subprocess (so RSS is its own):

* ``fp32``: the binary-plane model dequantized (``outtype="f32"``), plain MatMuls;
* ``function`` / ``matmulnbits-acc0`` / ``-acc4``: random binary planes (block plane counts cycling
  1,2,3 / 2,2,1,3 / 3,1: mean 2, ~2.2 bits per weight) as ``qdllm.PlaneMatMul`` or ``MatMulNBits`` bits=2;
* ``int2-b32``, ``int2-b128``, ``int4-b32``, ...: random ``NBitsTensor`` linears (``--outtype int2`` ...
  files: one MatMulNBits node per linear) at accuracy level 4, ``-acc0`` at level 0;
* ``auto-b128``: a 2/4-bit mix (attn_v and attn_output int4, the rest int2: ~2.44 bits per weight, what
  ``--outtype auto --bpw 2.5 --block-size 128`` spends);
* ``...-lut``: the same file with onnxruntime's 2-bit lookup-table kernel (``mlas.use_lut_gemm``).

The int files are written as ``qdllm-export onnx`` writes them: ``token_embd`` / ``output`` 8-bit
(``int2-b32-f16emb``: f16, the planes files' default), weights in external data that onnxruntime maps
(``int2-b32-single``: one file); fp32 keeps its tables in f32. The random embeddings are
f16-representable. The error column compares each file with the NumPy forward (``runtime_ref.forward``)
of the tensors it stores, so it is the kernel's error alone.
Prints a markdown table (machine named) and writes JSON::

    python bench/runtime.py [--layers 16 --d-model 1024 ...] [--variants fp32,int2-b32,...] [--json .out/bench_runtime.json]
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

PATTERNS = ((1, 2, 3), (2, 2, 1, 3), (3, 1))
AUTO_INT4 = ("attn_v.weight", "attn_output.weight")  # the int4 linears of the auto-like mix


@dataclass(frozen=True)
class Variant:
    """How one file is written and run: ``source`` ("planes" | "int2-b32" | ... | "auto-b128"), the writer's
    options, the accuracy level of MatMulNBits nodes and whether the LUT kernel is on."""

    source: str
    outtype: str = "quantized"
    kernel: str = "function"
    level: int = 0
    lut: bool = False
    embed: str | None = None  # the writer's embed_type (None: its default, f16 for quantized files)
    external: bool | None = None  # the writer's external_data (None: single file under ~1.8 GB)

    @property
    def file(self) -> str:
        ext = "-ext" if self.external else ""
        return f"{self.source}-{self.outtype}-{self.kernel}-{self.level}-{self.embed or 'default'}{ext}.onnx"


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("planes", outtype="f32"),
    "function": Variant("planes"),
    "matmulnbits-acc0": Variant("planes", kernel="matmulnbits", level=0),
    "matmulnbits-acc4": Variant("planes", kernel="matmulnbits", level=4),
    # the int outtypes as `qdllm-export onnx` writes them: accuracy level 4, int8 embeddings and head, external data
    "int2-b32": Variant("int2-b32", level=4, embed="int8", external=True),
    "int2-b32-lut": Variant("int2-b32", level=4, lut=True, embed="int8", external=True),
    "int2-b32-acc0": Variant("int2-b32", level=0, embed="int8", external=True),
    "int2-b32-f16emb": Variant("int2-b32", level=4, external=True),
    "int2-b32-single": Variant("int2-b32", level=4, embed="int8"),
    "int2-b128": Variant("int2-b128", level=4, embed="int8", external=True),
    "int2-b128-lut": Variant("int2-b128", level=4, lut=True, embed="int8", external=True),
    "int4-b32": Variant("int4-b32", level=4, embed="int8", external=True),
    "int4-b128": Variant("int4-b128", level=4, embed="int8", external=True),
    "auto-b128": Variant("auto-b128", level=4, embed="int8", external=True),
    "auto-b128-lut": Variant("auto-b128", level=4, lut=True, embed="int8", external=True),
}
DEFAULT = ("fp32", "function", "matmulnbits-acc4", "int2-b32", "int2-b32-lut", "int2-b32-f16emb", "int2-b32-single",
           "int2-b128", "int2-b128-lut", "int4-b32", "int4-b128", "auto-b128", "auto-b128-lut")


# ------------------------------------------------------------------------------------- random models


def random_model(hp, seed: int = 0):
    """DictTensors: random quantized linears (planes cycling PATTERNS), random float embeddings/norms/head."""
    from formats.qtensor import QuantizedTensor

    rng = np.random.default_rng(seed)

    def linear(i: int, name: str, n_out: int, n_in: int):
        nb = n_in // 128
        pat = PATTERNS[i % len(PATTERNS)]
        planes = np.array([pat[j % len(pat)] for j in range(nb)], np.uint8)
        p = int(planes.sum())
        return QuantizedTensor(
            (n_out, n_in), 128, planes, rng.integers(0, 256, (p, n_out, 16), dtype=np.uint8),
            (np.abs(rng.standard_normal((p, n_out), np.float32)) * 0.02 + 1e-3).astype(np.float16),
            rng.uniform(0.5, 1.5, (p, 128)).astype(np.float16), name=name)

    return _model(hp, rng, linear)


def random_nbits_model(hp, grid: str, seed: int = 0):
    """DictTensors of random MatMulNBits linears: ``grid`` "int2-b32" | "int4-b128" | ... | "auto-b128" (the
    ``AUTO_INT4`` linears int4, the rest int2). Codes uniform, zero point mid-range, weights of std ~0.03."""
    from formats.nbits import NBitsTensor, pack_low_first

    rng = np.random.default_rng(seed)
    kind, block = grid.split("-b")

    def linear(i: int, name: str, n_out: int, n_in: int):
        bits = (4 if name.split(".", 2)[2] in AUTO_INT4 else 2) if kind == "auto" else int(kind[3:])
        bs, nb = int(block), n_in // int(block)
        q = rng.integers(0, 2**bits, (n_out, nb, bs), dtype=np.uint8)
        z = np.full((n_out, nb), 2 ** (bits - 1), np.uint8)
        s = (np.abs(rng.standard_normal((n_out, nb), np.float32)) * 0.1 / 2**bits + 1e-4).astype(np.float16)
        return NBitsTensor((n_out, n_in), bits, bs, pack_low_first(q, bits), s, pack_low_first(z, bits), name=name)

    return _model(hp, rng, linear)


def _model(hp, rng: np.random.Generator, linear):
    from formats.tensors import DictTensors, canonical_names, canonical_shape, is_linear

    out = {}
    for i, name in enumerate(canonical_names(hp)):
        shape = canonical_shape(hp, name)
        if is_linear(hp, name):
            out[name] = linear(i, name, *shape)
        elif name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        else:  # f16-representable, so the quantized files' f16 embeddings / head equal fp32's exactly
            out[name] = (0.05 * rng.standard_normal(shape, np.float32)).astype(np.float16).astype(np.float32)
    return DictTensors(hp, out)


def source_of(hp, name: str):
    return random_model(hp) if name == "planes" else random_nbits_model(hp, name)


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
            "onnx": onnx.__version__, "python": platform.python_version(), "os": platform.platform(),
            "load_avg": os.getloadavg()}


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


def child(path: str, threads: int, canvas: int, logits_out: str, lut: bool) -> None:
    """Load one model, then serve the driver over stdin/stdout: "run" -> one timed forward; "stop" -> figures."""
    import psutil

    from runtime_ref.ort import OrtBackend

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    be = OrtBackend(path, threads=threads, lut_gemm=lut)
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
            del out  # hold no logits between forwards: the peak is one forward's
            print(json.dumps({"t": dt}), flush=True)
        elif line.strip() == "stop":
            break
    print(json.dumps({"load_s": load, "rss_before_mb": rss0 / 1e6, "rss_loaded_mb": rss_load / 1e6,
                      "rss_after_mb": proc.memory_info().rss / 1e6, "peak_rss_mb": _hwm() / 1e6,
                      "describe": be.describe()}, default=str), flush=True)


# ------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ff", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--json", default=str(ROOT / ".out" / "bench_runtime.json"))
    ap.add_argument("--workdir", default=None, help="where the .onnx files go (default: a temporary folder)")
    ap.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "CANVAS", "LOGITS", "LUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.variant_list = [v for v in a.variants.split(",") if v]
    bad = [v for v in a.variant_list if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    return a


def model_hparams(a: argparse.Namespace):
    """HParams of the benchmark model, and its parameter counts (all, in block linears)."""
    from formats.families import HParams

    hp = HParams(family="llada", n_vocab=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                 n_kv_heads=a.heads, d_ff=a.ff, rope_theta=500000.0, norm_eps=1e-5, mask_token_id=a.vocab - 1,
                 context_length=4096)
    n_lin = a.layers * (4 * a.d_model * a.d_model + 3 * a.d_model * a.ff)
    return hp, n_lin + 2 * a.vocab * a.d_model + (2 * a.layers + 1) * a.d_model, n_lin


def write_files(hp, variants: list[str], work: Path, canvas: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """One .onnx per distinct file among ``variants`` and, per file, the exact NumPy logits of its stored
    weights on the benchmark canvas; returns ({variant: file}, {variant: reference logits .npy})."""
    from formats.onnx import write_onnx

    t0 = time.perf_counter()
    files, refs = {}, {}
    for source in dict.fromkeys(VARIANTS[v].source for v in variants):
        src = source_of(hp, source)
        for v in (v for v in variants if VARIANTS[v].source == source):
            spec = VARIANTS[v]
            p = work / spec.file
            if not p.exists():
                write_onnx(p, src, outtype=spec.outtype, kernel=spec.kernel, accuracy_level=spec.level, overwrite=True,
                           embed_type=spec.embed, external_data=spec.external, qdllm_meta={"bench": f"random {source}"})
                print(f"  wrote {p.name}: {p.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            files[v] = p
        del src
    ids = np.random.default_rng(123).integers(0, hp.n_vocab, (1, canvas))  # the children's canvas
    for p in dict.fromkeys(files.values()):
        np.save(work / f"{p.stem}.ref.npy", exact_logits(p, ids))
    for v, p in files.items():
        refs[v] = work / f"{p.stem}.ref.npy"
    return files, refs


def exact_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """The NumPy forward (fp32) of the tensors a file stores, every quantized one dequantized."""
    from formats.onnx import OnnxTensors
    from formats.stored import is_stored
    from runtime_ref.forward import forward

    class Dequantized(OnnxTensors):
        def get(self, name: str):
            t = super().get(name)
            return t.dequantize() if is_stored(t) and name == "token_embd.weight" else t

    return forward(Dequantized(path), ids, rope="neox")


def launch(files: dict[str, Path], work: Path, a: argparse.Namespace) -> dict[str, subprocess.Popen]:
    """One loaded child process per variant, started one at a time."""
    procs = {}
    for v, path in files.items():
        pr = subprocess.Popen([sys.executable, __file__, "--threads", str(a.threads), "--child", str(path), str(a.canvas),
                               str(work / f"{v}.logits.npy"), str(int(VARIANTS[v].lut))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if not pr.stdout.readline():
            raise SystemExit(f"variant {v} failed to load")
        procs[v] = pr
    return procs


def time_round_robin(procs: dict[str, subprocess.Popen], reps: int) -> dict[str, dict]:
    """A warm-up forward each, then ``reps`` rounds of one forward per variant (a change in machine load hits
    every variant alike)."""
    results = {v: {"times_s": []} for v in procs}

    def run(v: str) -> float:
        procs[v].stdin.write("run\n")
        procs[v].stdin.flush()
        line = procs[v].stdout.readline()
        if not line:
            raise SystemExit(f"variant {v} died")
        return json.loads(line)["t"]

    for v in procs:
        results[v]["first_s"] = run(v)
    for rep in range(reps):
        for v in procs:
            results[v]["times_s"].append(run(v))
        print(f"  round {rep + 1}/{reps}: " + ", ".join(f"{v} {1e3 * results[v]['times_s'][-1]:.0f} ms" for v in procs),
              file=sys.stderr)
    return results


def collect(procs: dict[str, subprocess.Popen], results: dict[str, dict], work: Path, refs: dict[str, Path]) -> None:
    """Stop the children; add their memory figures, medians, and the error against the exact logits."""
    for v, pr in procs.items():
        out, _ = pr.communicate("stop\n", timeout=600)
        r = results[v]
        r.update(json.loads(out.strip().splitlines()[-1]))
        r["median_ms"] = 1e3 * float(np.median(r["times_s"]))
        r["min_ms"] = 1e3 * float(np.min(r["times_s"]))
        ref = np.load(refs[v])
        y = np.load(work / f"{v}.logits.npy")
        r["max_rel_err"] = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
        r["top1_agreement"] = float((y.argmax(-1) == ref.argmax(-1)).mean())
        d = r.pop("describe")
        r["file_mb"] = d["size_bytes"] / 1e6
        r["bits_per_weight_linears"] = d["bits_per_weight_linear"]


def render(results: dict[str, dict], mach: dict, a: argparse.Namespace, n_params: int, n_lin: int) -> str:
    base = results.get("fp32", {})
    lines = [
        f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs ({mach['physical_cores']} cores), "
        f"SIMD {'/'.join(mach['simd']) or 'n/a'}, {mach['ram_gb']} GB RAM; onnxruntime {mach['onnxruntime']} "
        f"(CPUExecutionProvider, {a.threads} intra-op threads), Python {mach['python']}; load average when started "
        f"{mach['load_avg'][0]:.2f}.",
        f"Model: random LLaDA-shaped, d_model {a.d_model}, {a.layers} layers, {a.heads} heads, d_ff {a.ff}, "
        f"vocab {a.vocab}: {n_params / 1e6:.0f}M parameters, {n_lin / 1e6:.0f}M of them in the quantized linears; "
        "token_embd / output f16 in the binary-plane files, int8 in the int files (`-f16emb`: f16), fp32 in fp32; int files "
        "in external data (`-single`: one file). One forward of a "
        f"{a.canvas}-token canvas, batch 1; median (min) of {a.reps} runs after a warm-up run; each variant in its own "
        "process, all loaded, timed round-robin. max rel err = max|y - y_exact| / max|y_exact| over all logits, "
        "y_exact the NumPy forward of the file's own stored weights.",
        "",
        "| variant | file MB | linears bits/weight in file | load s | median ms (min) | speed vs fp32 | RSS after load MB "
        "| peak RSS MB | peak RSS vs fp32 | max rel err | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        bpw = "32 (fp32)" if r["bits_per_weight_linears"] is None else f"{r['bits_per_weight_linears']:.2f}"
        speed = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "n/a"
        mem = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "n/a"
        lines.append(f"| {v} | {r['file_mb']:.0f} | {bpw} | {r['load_s']:.1f} | {r['median_ms']:.0f} ({r['min_ms']:.0f}) | "
                     f"{speed} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} | {mem} | {r['max_rel_err']:.1e} | "
                     f"{100 * r['top1_agreement']:.1f}% |")
    lines += ["", f"RSS of the process before loading (python, numpy, onnxruntime): about "
                  f"{np.median([r['rss_before_mb'] for r in results.values()]):.0f} MB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        child(a.child[0], a.threads, int(a.child[1]), a.child[2], a.child[3] == "1")
        return 0
    hp, n_params, n_lin = model_hparams(a)
    tmp = tempfile.TemporaryDirectory(prefix="qdllm-bench-") if a.workdir is None else None
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"model: llada-shaped, d_model {a.d_model}, {a.layers} layers, d_ff {a.ff}, vocab {a.vocab}: {n_params / 1e6:.0f}M "
          f"parameters; canvas {a.canvas} tokens, {a.threads} threads, {a.reps} round-robin runs after 1 warm-up", file=sys.stderr)
    files, refs = write_files(hp, a.variant_list, work, a.canvas)
    mach = machine()
    procs = launch(files, work, a)
    results = time_round_robin(procs, a.reps)
    collect(procs, results, work, refs)
    table = render(results, mach, a, n_params, n_lin)
    print(table)
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
