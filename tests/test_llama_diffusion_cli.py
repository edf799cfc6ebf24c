"""The real client: stock ``llama-diffusion-cli`` runs our ``q2_k`` GGUF of each bundled family (the mixture too).

The tool is built by ``scripts/build_llama_tools.sh`` (about 20 minutes on a busy 2-core machine) from the llama.cpp
that llama-cpp-python vendors; without it these tests are skipped (CI does not build it). The files are written
with ``--rounding rtn`` to keep the test quick (no calibration text is read; the grid and file layout are the same
as the default's). ``-t 1``: on a busy machine llama.cpp's spinning thread pool made two threads 24-29x slower
(docs/benchmarks.md, "llama.cpp steps").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_ref.llamacpp import amx_cpu

REPO = Path(__file__).resolve().parents[1]
DIFFUSION_CLI = Path(os.environ.get("QDLLM_LLAMA_DIFFUSION_CLI",
                                    REPO / ".work" / "llamacpp" / "build" / "bin" / "llama-diffusion-cli"))
STEPS, CANVAS = 16, 64
FAMILIES = ("llada", "dream", "llada-moe")
LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ?")  # llama.cpp's log timestamp, e.g. "0.02.111.248 I "

pytestmark = pytest.mark.skipif(not DIFFUSION_CLI.exists(),
                                reason="llama-diffusion-cli not built (bash scripts/build_llama_tools.sh)")


@pytest.fixture(scope="module")
def q2k_files(tmp_path_factory) -> dict[str, Path]:
    """{family: path} of ``qdllm-export gguf tiny-<family> x.gguf --outtype q2_k --rounding rtn``."""
    out = {}
    for fam in FAMILIES:
        path = tmp_path_factory.mktemp(fam) / f"tiny-{fam}-q2k.gguf"
        r = subprocess.run([sys.executable, "-m", "qdllm_export", "gguf", f"tiny-{fam}", str(path), "--outtype", "q2_k",
                            "--rounding", "rtn"], cwd=REPO, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]
        out[fam] = path
    return out


def run_diffusion_cli(path: Path, family: str, attempts: int = 5) -> tuple[subprocess.CompletedProcess, str]:
    """Run the tool greedily on a ``CANVAS``-token canvas for ``STEPS`` steps; returns (process, its whole log).

    llama.cpp's log is written by a thread that the tool does not flush before it exits (common/log.cpp, "logs
    may be lost"): on a busy machine the last lines, the timing and the text, are sometimes cut (2 runs in 10
    here). A run that exits 0 without its timing line or text is run again, at most ``attempts`` times."""
    schedule = (["--diffusion-block-length", str(CANVAS)] if family.startswith("llada")
                else ["--diffusion-eps", "0.001", "--diffusion-algorithm", "1"])
    cmd = [str(DIFFUSION_CLI), "-m", str(path), "-p", "ROMEO:", "-ub", str(CANVAS), "-c", str(CANVAS), "-b", str(CANVAS),
           "--diffusion-steps", str(STEPS), *schedule, "--temp", "0", "--top-k", "1", "--seed", "0", "-t", "1",
           *(["--no-repack"] if amx_cpu() else [])]
    for _ in range(attempts):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log = (r.stdout + r.stderr).replace("\r", "\n")
        if r.returncode != 0 or ("total time:" in log and generated_text(log)):
            break
    return r, log


def generated_text(log: str) -> str:
    """The text the tool prints after its timing line (log timestamps removed)."""
    if "total time:" not in log:
        return ""
    tail = log.split("total time:", 1)[1].split("\n", 1)[-1]
    return "\n".join(LOG_PREFIX.sub("", line) for line in tail.splitlines()).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_diffusion_cli_runs_our_q2_k_file(q2k_files, family):
    """Exit 0, every step run and timed, and text out: the generated canvas decodes to words."""
    r, log = run_diffusion_cli(q2k_files[family], family)
    assert r.returncode == 0, log[-3000:]
    assert re.search(rf"steps\s+u32\s+=\s+{STEPS}\b", log) and re.search(rf"max_length\s+u32\s+=\s+{CANVAS}\b", log)
    steps_seen = [int(m) for m in re.findall(rf"diffusion step: (\d+)/{STEPS}", log)]
    assert steps_seen and max(steps_seen) == STEPS - 1  # the callback runs before each of the STEPS forwards
    per_step = re.search(r"time per step: ([0-9.]+)ms", log)
    assert per_step and float(per_step.group(1)) > 0
    text = generated_text(log)
    assert len(text) >= 10 and re.search(r"[A-Za-z]{2,}", text), log[-3000:]
    assert "Error: diffusion generation failed" not in log
