"""What a user waits for: CLI start-up and ``generate`` of 64 tokens from the tiny GGUF, idle and with a busy core.

Each figure is the median wall time of ``--repeats`` runs of the real command in a fresh process
(``python -m qdllm_export ...``), pinned with ``taskset`` to ``--cpus`` (default: the first two cores, a
2-core machine) when taskset exists. "busy" runs one spinning process (``yes > /dev/null``) pinned to the
last of those cores for the whole measurement, as another user's job would. Trees compared:

* ``--before DIR``: a source tree of an older commit (``git archive REV | tar -x -C DIR``), optional;
* this tree, with its default of one OpenBLAS thread, and with ``OPENBLAS_NUM_THREADS=2`` (the choice's
  evidence).

The GGUF is ``qdllm-export gguf tiny-llada`` (quantized, the README's first command), written once by this
tree. Prints a markdown table; ``--write`` puts it in docs/benchmarks.md (section ``cli-speed``)::

    python bench/cli_speed.py [--before .work/before] [--cpus 0,1] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402

PROMPT = ["--prompt", "ROMEO:", "--gen-length", "64"]


def command(tree: Path, args: list[str], cpus: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "qdllm_export", *args]
    return (["taskset", "-c", cpus] + cmd) if cpus else cmd


def wall(tree: Path, args: list[str], cpus: str | None, env: dict[str, str], repeats: int) -> float:
    """Median wall seconds of ``qdllm-export ARGS`` run from ``tree`` (its package first on sys.path)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(command(tree, args, cpus), cwd=tree, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{tree}: qdllm-export {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return statistics.median(times)


@contextmanager
def busy_core(cpu: str | None, on: bool) -> Iterator[None]:
    """One process spinning on ``cpu`` (any core without taskset) while the block runs."""
    if not on:
        yield
        return
    cmd = ["yes"] if not cpu else ["taskset", "-c", cpu, "yes"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield
    finally:
        p.kill()
        p.wait()


def measure(tree: Path, gguf: Path, cpus: str | None, threads: str | None, repeats: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads:
        env["OPENBLAS_NUM_THREADS"] = threads
    last = cpus.split(",")[-1] if cpus else None
    out = {}
    for load in ("idle", "busy"):
        with busy_core(last, load == "busy"):
            out[f"help {load}"] = wall(tree, ["--help"], cpus, env, repeats)
            out[f"inspect {load}"] = wall(tree, ["inspect", str(gguf)], cpus, env, repeats)
            out[f"generate {load}"] = wall(tree, ["generate", str(gguf), *PROMPT], cpus, env, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="source tree of the commit to compare with")
    ap.add_argument("--before-label", default="before", help="its name in the table (e.g. a commit hash)")
    ap.add_argument("--cpus", default="0,1", help="taskset core list; '' to run unpinned")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf", type=Path, help="an existing tiny GGUF (default: written once by this tree)")
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    a = ap.parse_args()
    cpus = a.cpus if a.cpus and shutil.which("taskset") else None
    tmp = Path(tempfile.mkdtemp(prefix="cli_speed."))
    gguf = a.gguf or tmp / "tiny-llada.gguf"
    if not gguf.exists():
        r = subprocess.run([sys.executable, "-m", "qdllm_export", "gguf", "tiny-llada", str(gguf)], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
    runs: list[tuple[str, dict[str, float]]] = []
    if a.before:
        runs.append((f"{a.before_label} (every verb imports torch; OpenBLAS default threads)",
                     measure(a.before.resolve(), gguf, cpus, None, a.repeats)))
    runs.append(("this tree (default: 1 OpenBLAS thread)", measure(ROOT, gguf, cpus, None, a.repeats)))
    runs.append(("this tree, OPENBLAS_NUM_THREADS=2", measure(ROOT, gguf, cpus, "2", a.repeats)))
    cols = ["help idle", "inspect idle", "generate idle", "help busy", "inspect busy", "generate busy"]
    rows = [[name] + [f"{r[c]:.2f}" for c in cols] for name, r in runs]
    pin = f"pinned to cores {cpus}" if cpus else "unpinned"
    body = (f"## CLI speed: start-up and `generate` (`bench/cli_speed.py`)\n\n"
            f"{machine()}; {pin}; median of {a.repeats} fresh processes, seconds. `help`: `qdllm-export --help`; "
            f"`inspect`: `inspect tiny-llada.gguf`; `generate`: `generate tiny-llada.gguf --prompt ROMEO: "
            f"--gen-length 64` (quantized GGUF of the README's first command). busy: `yes > /dev/null` on core "
            f"{cpus.split(',')[-1] if cpus else '(any)'}.\n\n"
            + md_table(["tree"] + cols, rows))
    print(body)
    if a.write:
        write_section("cli-speed", body)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
