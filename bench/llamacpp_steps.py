"""Step time of our llama.cpp runtime against stock ``llama-diffusion-cli`` on the same GGUF and canvas.

Both run the whole canvas through llama.cpp once per denoising step (non-causal, every position's logits), so
their time per forward should match; what differs is what sits around it (Python, ctypes, the sampler, thread
pools). For each canvas length ``N`` (default 69, ``generate``'s canvas for ``--prompt ROMEO: --gen-length 64``,
and 128, the canvas issue 15 timed the tool on) and ``--steps`` (64):

* ``llama-diffusion-cli -m F -p ROMEO: -ub N -c N -b N --diffusion-steps S`` + one block over the canvas (LLaDA) or
  ``--diffusion-eps 0.001 --diffusion-algorithm 1`` (Dream), ``--temp 0 --top-k 1 --seed 0``; its threads by
  default (the machine's physical cores), ``-t 1``, and ``-t 1 -fa off`` (our runtime's attention: flash
  attention off, so the logits are the exact forward's; the tool's ``auto`` turns it on). ms/step = its reported total time over the forwards it
  ran (it wraps the prompt in ChatML, about 35 tokens here, so on a short canvas it runs out of masks and stops
  early; the table gives the count);
* ``qdllm-export generate F --prompt ROMEO: --gen-length N-5 --steps S --runtime llama.cpp`` (LLaDA: one block),
  default threads and ``QDLLM_LLAMACPP_THREADS=1``; ms/step = the sampler loop's time (what ``generate`` runs
  between loading the model and printing) over its forwards, measured in a fresh process of the same code;
* ``--before DIR``: the same for another source tree (``git archive REV | tar -x -C DIR``).

"whole s" is the wall time of the complete command in a fresh process (start-up and model load included). Runs
are interleaved (each repeat runs every configuration once) and the median is reported, so a change in the
machine's load hits all of them alike. Prints a markdown table; ``--write`` puts it in docs/benchmarks.md
(section ``llamacpp-steps``)::

    bash scripts/build_llama_tools.sh   # once: builds .work/llamacpp/build/bin/llama-diffusion-cli
    python bench/llamacpp_steps.py [--gguf F] [--canvas 69 128] [--steps 64] [--repeats 3] \
        [--before .work/before --before-label REV] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402

TOOL = Path(os.environ.get("QDLLM_LLAMA_DIFFUSION_CLI", ROOT / ".work" / "llamacpp" / "build" / "bin" / "llama-diffusion-cli"))
PROMPT = "ROMEO:"

# Runs in a fresh process with PYTHONPATH=<tree>: generate's own steps (read_header, open, prompt_ids, sample),
# timing the sampler loop and counting the forwards. Prints one JSON line.
INNER = r"""
import json, sys, time
from qdllm_export.backends import read_header
from qdllm_export.cli.common import prompt_ids
from runtime_ref.sampler import sample
path, canvas, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
head = read_header(path, "llama.cpp")
be = head.open()
ids = prompt_ids(head, sys.argv[4], None)
gen = canvas - ids.shape[1]
shapes = []
def fn(x):
    shapes.append(x.shape)
    return be.logits(x)
t0 = time.perf_counter()
sample(be, ids, dict(gen_length=gen, steps=steps, block_length=gen, temperature=0.0, seed=0), logits_fn=fn)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "forwards": len(shapes), "canvas": int(shapes[0][1]), "prompt": int(ids.shape[1]),
                  "threads": be.threads}))
"""


def family_of(path: Path) -> str:
    """``llada`` or ``dream``, from the file's header."""
    from formats.gguf_read import read_gguf

    return read_gguf(path).hparams.family


def tool_run(path: Path, family: str, canvas: int, steps: int, threads: int | None, extra: list[str]) -> dict[str, Any]:
    """One ``llama-diffusion-cli`` run (``extra``: more flags): wall seconds, forwards run, ms per forward (its own
    timer)."""
    schedule = (["--diffusion-block-length", str(canvas)] if family == "llada"
                else ["--diffusion-eps", "0.001", "--diffusion-algorithm", "1"])
    cmd = [str(TOOL), "-m", str(path), "-p", PROMPT, "-ub", str(canvas), "-c", str(canvas), "-b", str(canvas),
           "--diffusion-steps", str(steps), *schedule, "--temp", "0", "--top-k", "1", "--seed", "0"]
    cmd += (["-t", str(threads)] if threads else []) + extra
    for _ in range(5):  # its log thread is not flushed at exit: under load the last lines are sometimes lost
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = (r.stdout + r.stderr).replace("\r", "\n")
        total = re.search(r"total time: ([0-9.]+)ms", log)
        if r.returncode != 0 or total:
            break
    if r.returncode != 0 or not total:
        raise SystemExit(f"llama-diffusion-cli failed ({r.returncode}): {log[-2000:]}")
    forwards = len(re.findall(rf"diffusion step: \d+/{steps}\b", log))  # its callback runs before each forward
    return {"wall": wall, "forwards": forwards, "ms": float(total.group(1)) / forwards}


def ours_run(tree: Path, path: Path, family: str, canvas: int, steps: int, threads: int | None) -> dict[str, Any]:
    """Our sampler loop in a fresh process (ms per forward), then the whole ``generate`` command (wall)."""
    env = {k: v for k, v in os.environ.items() if k not in ("QDLLM_LLAMACPP_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads:
        env["QDLLM_LLAMACPP_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-c", INNER, str(path), str(canvas), str(steps), PROMPT], cwd=tree, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: sampler loop failed: {r.stderr[-2000:]}")
    inner = json.loads(r.stdout.strip().splitlines()[-1])
    assert inner["canvas"] == canvas, inner
    n_prompt = inner["prompt"]
    block = ["--block-length", str(canvas - n_prompt)] if family == "llada" else []
    cmd = [sys.executable, "-m", "qdllm_export", "generate", str(path), "--prompt", PROMPT, "--gen-length",
           str(canvas - n_prompt), "--steps", str(steps), *block, "--runtime", "llama.cpp"]
    t0 = time.perf_counter()
    w = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if w.returncode != 0:
        raise SystemExit(f"{tree}: generate failed ({w.returncode}): {w.stderr[-2000:]}")
    return {"wall": wall, "forwards": inner["forwards"], "ms": 1e3 * inner["seconds"] / inner["forwards"],
            "threads": inner["threads"]}


# (name, kind, threads, the tool's extra flags). "-fa off": the tool's default flash attention (auto: on for the
# CPU) rounds K and V to f16; our runtime keeps it off so that its logits are the exact forward's.
CONFIGS = [("llama-diffusion-cli", "tool", None, []), ("llama-diffusion-cli -t 1", "tool", 1, []),
           ("llama-diffusion-cli -t 1 -fa off", "tool", 1, ["-fa", "off"]),
           ("ours", "ours", None, []), ("ours, QDLLM_LLAMACPP_THREADS=1", "ours", 1, [])]


def measure(path: Path, canvases: list[int], steps: int, repeats: int, before: tuple[str, Path] | None
            ) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """{(configuration, canvas): [run, ...]}, every configuration once per repeat (interleaved)."""
    family = family_of(path)
    configs = list(CONFIGS) + ([(f"{before[0]} (before)", "before", None, [])] if before else [])
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(repeats):
        for name, kind, threads, extra in configs:
            for n in canvases:
                if kind == "tool":
                    r = tool_run(path, family, n, steps, threads, extra)
                else:
                    r = ours_run(before[1] if kind == "before" else ROOT, path, family, n, steps, threads)
                runs.setdefault((name, n), []).append(r)
                print(f"[{rep + 1}/{repeats}] {name:34s} canvas {n:4d}: {r['forwards']:3d} forwards, "
                      f"{r['ms']:8.1f} ms/step, {r['wall']:6.2f} s whole", file=sys.stderr, flush=True)
    return runs


def table(runs: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    """Markdown: one row per (configuration, canvas), medians, and the ratio to the tool's best ms/step."""
    best = {n: min(statistics.median(r["ms"] for r in rs) for (name, m), rs in runs.items()
                   if m == n and name.startswith("llama-diffusion-cli")) for _, n in runs}
    rows = []
    for (name, n), rs in runs.items():
        ms = statistics.median(r["ms"] for r in rs)
        rows.append([name, n, rs[0]["forwards"], f"{ms:.1f}", f"{ms / best[n]:.2f}",
                     f"{statistics.median(r['wall'] for r in rs):.2f}", " / ".join(f"{r['ms']:.0f}" for r in rs)])
    rows.sort(key=lambda r: (r[1], r[0]))
    return md_table(["runtime", "canvas", "forwards", "ms/step", "x tool's best", "whole s", "ms/step of each run"], rows)


def default_gguf(tmp: Path) -> Path:
    """tiny-llada as q2_k (``--rounding rtn``), written by this tree."""
    out = tmp / "tiny-llada-q2k.gguf"
    r = subprocess.run([sys.executable, "-m", "qdllm_export", "gguf", "tiny-llada", str(out), "--outtype", "q2_k",
                        "--rounding", "rtn"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="a stock GGUF (default: tiny-llada --outtype q2_k --rounding rtn)")
    ap.add_argument("--canvas", type=int, nargs="+", default=[69, 128])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, help="source tree of the commit to compare with")
    ap.add_argument("--before-label", default="before", help="its name in the table (e.g. a commit hash)")
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    a = ap.parse_args()
    if not TOOL.exists():
        raise SystemExit(f"{TOOL} not found: build it with bash scripts/build_llama_tools.sh")
    path = a.gguf or default_gguf(Path(tempfile.mkdtemp(prefix="llamacpp_steps.")))
    load0 = os.getloadavg()[0]
    runs = measure(path.resolve(), a.canvas, a.steps, a.repeats,
                   (a.before_label, a.before.resolve()) if a.before else None)
    load1 = os.getloadavg()[0]
    body = (f"## llama.cpp steps: our runtime against llama-diffusion-cli (`bench/llamacpp_steps.py`)\n\n"
            f"{machine()}; load average {load0:.1f} at the start, {load1:.1f} at the end (other jobs running); "
            f"`{path.name}` ({family_of(path)}), {a.steps} steps, prompt `{PROMPT}`, median of {a.repeats} "
            f"interleaved runs. ms/step: time per full-canvas forward inside the sampling loop (the tool's own "
            f"timer; ours around `sample`); whole s: the complete command in a fresh process.\n\n" + table(runs))
    print(body)
    if a.write:
        write_section("llamacpp-steps", body)


if __name__ == "__main__":
    main()
