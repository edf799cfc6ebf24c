"""Scale benchmark: quantize an LLaDA-8B-shaped checkpoint end to end, streaming one block at a time.

    python bench/scale.py --shape llada-8b --device cuda --workdir /tmp/scale --out scale.json
    python bench/scale.py --shape small --device cpu --workdir /tmp/scale-cpu --out scale-cpu.json
    python bench/scale.py --shape llada-8b --layers 4 --gguf "--outtype q2_k" --device cuda --workdir /tmp/s --out q2k.json

With ``--gguf ARGS`` the child runs ``qdllm-export gguf CHECKPOINT OUT.gguf ARGS`` (a stock llama.cpp file
from the float checkpoint) instead of ``quantize_checkpoint``. With ``--layers N`` the checkpoint has
LLaDA-8B's shapes but only ``N`` blocks: the child times every block of every streaming pass (the
``auto`` sensitivity pass and the quantizing pass), and the result extrapolates wall time and file size
to the 32 blocks of the real model (each block costs the same: same shapes, one block resident).

Writes an official-layout checkpoint of random bf16 weights (config, names and shapes of LLaDA-8B,
sharded), then runs ``quantize_checkpoint`` in a child process that reports wall time, peak GPU memory
and peak host RSS. The child never holds the whole model: compare its RSS to the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402
from formats.families import HParams  # noqa: E402
from formats.safetensors_io import write_safetensors  # noqa: E402

SHAPES = {
    "llada-8b": dict(n_vocab=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=12288),
    "small": dict(n_vocab=32768, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, d_ff=3072),
    "small-deep": dict(n_vocab=32768, d_model=1024, n_layers=32, n_heads=16, n_kv_heads=16, d_ff=3072),
    # LLaDA-MoE-7B-A1B as our sources give it (research/formats.md: mask id 156895; experts as OLMoE-1B-7B, its
    # base: 64 experts of 1024, 8 a token, d 2048, 16 blocks): 7.3 B parameters, 1.4 B active
    "llada-moe-7b-a1b": dict(family="llada-moe", n_vocab=157184, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                             d_ff=8192, n_expert=64, n_expert_used=8, d_ff_exp=1024),
    # Dream-v0-Instruct-7B (Qwen2.5-7B's shapes: GQA 28 / 4 heads, q/k/v biases, research/models.md)
    "dream-7b": dict(family="dream", n_vocab=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944),
}
SHAPES["small-moe"] = dict(family="llada-moe", n_vocab=4096, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512,
                          n_expert=8, n_expert_used=2, d_ff_exp=256)  # a CPU smoke run of the MoE path
SHAPES["small-dream"] = dict(family="dream", n_vocab=4096, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=512)
MASK_IDS = {126464: 126336, 157184: 156895, 152064: 151666}  # LLaDA-8B's, LLaDA-MoE's, Dream's; else the last id
ROPE = {"llada": 500000.0, "llada-moe": 50000.0, "dream": 1000000.0}


def write_random_checkpoint(folder: Path, hp: HParams, device: str, seed: int = 0) -> int:
    """Random N(0, 0.02) bf16 weights (norms 1, biases 0) in the family's published layout, one shard per block."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    expected = hp.spec.expected(hp)
    groups: dict[str, list[str]] = {}
    for hf, (_, i, _) in expected.items():
        groups.setdefault("rest" if i is None else f"{i:03d}", []).append(hf)
    weight_map, total = {}, 0
    names = sorted(groups)
    for k, key in enumerate(names):
        fname = f"model-{k + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for hf in groups[key]:
            shape = expected[hf][2]
            if len(shape) == 1:
                t = (torch.zeros if hf.endswith(".bias") else torch.ones)(shape, device=device)
            else:
                t = torch.randn(shape, generator=g, device=device) * 0.02
            tensors[hf] = t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
            total += tensors[hf].nbytes
        write_safetensors(folder / fname, tensors, {"format": "pt"}, bf16=set(tensors))
        weight_map.update({hf: fname for hf in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    eos = 126081 if hp.n_vocab == 126464 else hp.n_vocab - 3  # LLaDA-8B's ids, or the last ids of a smaller vocab
    cfg = hp.spec.config_from_hparams(hp, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos - 1, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = ROOT / "qdllm_export" / "data" / "tiny-llada" / "tokenizer.json"
    (folder / "tokenizer.json").write_bytes(tok.read_bytes())
    return total


CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
from qdllm_export.calib import CalibConfig
from qdllm_export.pipeline import quantize_checkpoint
from qdllm_export.quant import QuantConfig
src, dst, device, n, L = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
t0 = time.time()
done = []
res, rec = quantize_checkpoint(src, dst, QuantConfig(), CalibConfig(n_samples=n, seq_len=L), device=device, force=True,
                               on_layer=lambda i, nb, w: (done.append(i), print(f"[{time.time()-t0:7.1f}s] block {i}/{nb} {w}", flush=True)) if "done" in w or i == nb else None)
out = {"seconds": time.time() - t0, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
       "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
       "bits_per_weight_linear": rec["bits_per_weight_linear"], "block_output_errors": rec["block_output_errors"]}
print("RESULT " + json.dumps(out), flush=True)
"""


CHILD_GGUF = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
import qdllm_export.block_pass as B  # patched before anything imports load_block by name
marks = []
_load = B.load_block
def _timed(*a, **k):
    marks.append(time.time())
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"MARK {marks[-1] - t0:.1f} s: {k.get('pass_name', 'quantize')} block {a[1]} (peak GPU {gpu:.1f} GiB, "
          f"peak RSS {rss:.2f} GiB)", file=sys.stderr, flush=True)
    return _load(*a, **k)
B.load_block = _timed
from qdllm_export.cli import main
t0 = time.time()
src, dst, device, n, L = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
verb = sys.argv[8] if len(sys.argv) > 8 else "gguf"
sys.argv = ["qdllm-export", verb, src, dst, "--device", device, "--calib-samples", n, "--seq-len", L, "--force"] + sys.argv[7].split()
t0 = time.time()
code = 0
try:
    main()
except SystemExit as e:
    code = e.code or 0
out = {"seconds": time.time() - t0, "exit": code, "marks": [m - t0 for m in marks],
       "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
       "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}
print("RESULT " + json.dumps(out), flush=True)
"""


def extrapolate(res: dict, n_layers: int, full_layers: int, gguf_path: Path) -> dict:
    """Wall time and file size of the ``full_layers`` model from a run on ``n_layers`` blocks.

    ``marks``: the times each streaming pass loaded each block (``n_layers`` per pass); a pass's block
    time is the median gap between its consecutive loads. File size: the measured file plus
    ``full_layers - n_layers`` times the mean bytes of one block's tensors."""
    import statistics

    from gguf import GGUFReader

    marks = res["marks"]
    passes = [marks[p : p + n_layers] for p in range(0, len(marks), n_layers)]
    per_block = [statistics.median([b - a for a, b in zip(ps, ps[1:])]) for ps in passes if len(ps) > 1]
    extra = full_layers - n_layers
    size = gguf_path.stat().st_size
    blk = sum(int(t.n_bytes) for t in GGUFReader(gguf_path).tensors if t.name.startswith("blk."))
    return {"passes": len(passes), "block_seconds": per_block, "seconds_full": res["seconds"] + extra * sum(per_block),
            "file_bytes": size, "file_bytes_full": size + extra * blk / n_layers}


def write_doc(results: list[Path]) -> None:
    """The "scale" (``quantize``) and "scale-gguf" (``gguf --outtype``) sections of docs/benchmarks.md."""
    runs = [json.loads(p.read_text()) for p in results]
    rows = []
    for r in [r for r in runs if "gguf_args" not in r]:
        rows.append([r["shape"], f"{r['n_params'] / 1e9:.2f} B", f"{r['checkpoint_gb']:.2f}", r["device"], r["machine"],
                     r["calibration"], f"{r['seconds'] / 60:.1f}",
                     "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}", f"{r['peak_rss_gb']:.2f}",
                     f"{r['bits_per_weight_linear']:.3f}", f"{r['block_output_errors'][-1]:.3f}"])
    if rows:
        write_section("scale", "## Scale: streaming quantization (`bench/scale.py`)\n\n"
                      "Quant-dLLM at 2 bits, end to end (MCS calibration, DAQ + ABMP + block compensation, writing the "
                      "quantized checkpoint) on an official-layout LLaDA checkpoint of random bf16 weights written as one "
                      "shard per block. Peak GPU memory is `torch.cuda.max_memory_allocated`; peak host RSS is the "
                      "quantizing process's `ru_maxrss` (GiB). The last column is the relative output error of the last "
                      "block, quantized model vs the float block on the same inputs (random weights: not a quality "
                      "figure).\n\n"
                      + md_table(["shape", "params", "checkpoint GiB", "device", "machine", "calibration", "minutes",
                                  "peak GPU GiB", "peak RSS GiB", "bits/w linears", "last block err"], rows))
    gg = [r for r in runs if "gguf_args" in r]
    if gg:
        write_section("scale-gguf", _gguf_body(gg))


def _gguf_body(runs: list[dict]) -> str:
    rows = [[f"`{r['gguf_args']}`" + (f" ({r['variant']})" if r.get("variant") else ""), r["machine"], r["calibration"], f"{r['layers']} of {r['full_layers']}",
             f"{r['seconds'] / 60:.1f}", " + ".join(f"{s:.0f}" for s in r["block_seconds"]),
             f"**{r['seconds_full'] / 60:.1f}**", f"{r['peak_gpu_gb']:.1f}", f"{r['peak_rss_gb']:.2f}",
             f"{r['file_bytes'] / 1e9:.2f}", f"{r['file_bytes_full'] / 1e9:.2f}"] for r in runs]
    return ("## Scale: stock llama.cpp files of LLaDA-8B's shapes (`bench/scale.py --gguf`)\n\n"
            "`qdllm-export gguf CHECKPOINT OUT.gguf ARGS` from a float checkpoint of LLaDA-8B's shapes (random bf16 "
            "weights, official layout) with fewer blocks than the model's 32 (`--layers N`; the device time did not "
            "allow 32): every block has the same shapes and only one is resident, so each streaming pass costs the "
            "same per block. Extrapolated minutes = measured minutes + (32 - N) x the per-block seconds of every "
            "pass (`auto` makes two passes: MCS sensitivity of every candidate type, then quantizing); extrapolated "
            "file = measured file + (32 - N) x one block's tensor bytes. Peak GPU memory "
            "(`torch.cuda.max_memory_allocated`) and peak host RSS (`ru_maxrss`) are measured; they do not grow "
            "with the number of blocks (one block resident, tensors streamed to the file).\n\n"
            + md_table(["ARGS", "machine", "calibration", "blocks run", "minutes (run)", "seconds per block, by pass",
                        "minutes, 32 blocks (extrapolated)", "peak GPU GiB", "peak RSS GiB", "file GB (run)",
                        "file GB, 32 blocks"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", nargs="+", type=Path, help="Only rewrite docs/benchmarks.md from these result files.")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layers", type=int, help="Blocks in the checkpoint (default: the shape's own); results are extrapolated.")
    ap.add_argument("--gguf", help="Run `qdllm-export gguf` with these arguments (e.g. \"--outtype q2_k\").")
    ap.add_argument("--verb", default="gguf", choices=["gguf", "onnx", "quantize"],
                    help="With --gguf ARGS: the CLI verb to run (onnx: a .onnx file, quantize: a quantized checkpoint).")
    ap.add_argument("--reuse", action="store_true", help="Use the checkpoint already in WORKDIR/ckpt if it is complete.")
    a = ap.parse_args()
    if a.doc:
        write_doc(a.doc)
        return
    if a.workdir is None or a.out is None:
        ap.error("--workdir and --out are required")
    shape = dict(SHAPES[a.shape])
    full_layers = shape["n_layers"]
    if a.layers:
        shape["n_layers"] = a.layers
    family = shape.pop("family", "llada")
    hp = HParams(family=family, rope_theta=ROPE[family], norm_eps=1e-5, context_length=4096,
                 mask_token_id=MASK_IDS.get(shape["n_vocab"], shape["n_vocab"] - 1), **shape)
    ckpt = a.workdir / "ckpt"
    t0 = time.time()
    index = ckpt / "model.safetensors.index.json"
    if a.reuse and index.exists():
        size = json.loads(index.read_text())["metadata"]["total_size"]
    else:
        size = write_random_checkpoint(ckpt, hp, "cuda" if a.device.startswith("cuda") else "cpu")
    t_write = time.time() - t0
    print(f"wrote {size / 2**30:.2f} GiB checkpoint in {t_write:.0f} s", flush=True)
    dst = a.workdir / ({"gguf": "model.gguf", "onnx": "model.onnx", "quantize": "quantized"}[a.verb] if a.gguf else "quantized")
    child = [CHILD_GGUF] if a.gguf else [CHILD]
    proc = subprocess.run([sys.executable, "-c", *child, str(ROOT), str(ckpt), str(dst), a.device,
                           str(a.samples), str(a.seq_len)] + ([a.gguf, a.verb] if a.gguf else []),
                          capture_output=False, text=True, stdout=subprocess.PIPE)
    print(proc.stdout[-4000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"quantization failed with exit code {proc.returncode}")
    res = json.loads(line[-1][7:])
    if a.gguf and a.verb == "gguf" and shape["n_layers"] < full_layers:
        res.update(gguf_args=a.gguf, layers=shape["n_layers"], full_layers=full_layers,
                   **extrapolate(res, shape["n_layers"], full_layers, dst))
    elif a.gguf:  # a whole run: every block's time from the marks (one per block and streaming pass)
        m = res["marks"]
        res.update(verb=a.verb, args=a.gguf, layers=shape["n_layers"], full_layers=full_layers,
                   block_seconds_all=[b - x for x, b in zip(m, m[1:])],
                   file_bytes=sum(f.stat().st_size for f in ([dst, *dst.parent.glob(dst.name + ".data")] if dst.is_file()
                                                              else dst.rglob("*"))))  # an ONNX file's external data too
    n_params = sum(int(np.prod(s)) for _, _, s in hp.spec.expected(hp).values())
    res.update(shape=a.shape, device=a.device, machine=machine(), n_params=n_params, checkpoint_gb=size / 2**30,
               calibration=f"{a.samples} x {a.seq_len} tokens", write_seconds=t_write)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "block_output_errors"}, indent=1))


if __name__ == "__main__":
    main()
