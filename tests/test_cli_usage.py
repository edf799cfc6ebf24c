"""Issue 8, items 1-2: Ctrl-C exits 130 with one line; command-line mistakes print a usage line and exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qdllm_export", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before the signal: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("the command never started writing")
        time.sleep(0.05)


@pytest.mark.parametrize("verb", ["quantize", "gguf"])
def test_ctrl_c_exits_130_with_one_line_and_no_output(tmp_path, verb):
    out = tmp_path / ("q" if verb == "quantize" else "m.gguf")
    proc = _spawn(verb, "tiny-llada", out, "--calib-samples", "64", "--seq-len", "128")
    # a temporary entry appears beside OUT once the work has begun (checks passed, model loading)
    _wait_for(lambda: any(tmp_path.iterdir()), 300, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_ctrl_c_inside_an_import_arrives_after_the_import(tmp_path, monkeypatch):
    """A signal during an import (torch's runs Python inside C++, where an exception aborts the process) is
    delivered again once the import has finished, as the verb's Interrupted."""
    from qdllm_export import cli

    (tmp_path / "interrupted_mod.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\nfinished = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    old = signal.signal(signal.SIGINT, cli._raise_interrupted)
    try:
        with pytest.raises(cli.Interrupted) as e:
            import interrupted_mod  # noqa: F401
            time.sleep(5)
        finished = getattr(sys.modules.get("interrupted_mod"), "finished", False)
    finally:
        signal.signal(signal.SIGINT, old)
        sys.modules.pop("interrupted_mod", None)
    assert e.value.signum == signal.SIGINT
    assert finished  # the module's code ran to its end: the signal did not interrupt the import


def test_sigterm_exits_143(tmp_path):
    proc = _spawn("quantize", "tiny-dream", tmp_path / "q", "--calib-samples", "64", "--seq-len", "128")
    _wait_for(lambda: any(tmp_path.iterdir()), 300, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err and err.strip().splitlines()[-1] == "terminated"
    assert list(tmp_path.iterdir()) == []


def test_interrupt_then_and_chain_stops(tmp_path):
    """``quantize ... && gguf ...``: the shell's && sees the interrupt's non-zero status."""
    marker = tmp_path / "second-ran"
    script = (f"{sys.executable} -m qdllm_export quantize tiny-llada {tmp_path / 'q'} --calib-samples 64 & "
              f"pid=$!; while [ -z \"$(ls -A {tmp_path} | grep -v second)\" ]; do sleep 0.05; done; "
              f"sleep 0.3; kill -INT $pid; wait $pid && touch {marker}; echo rc=$?")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "rc=130" in r.stdout and not marker.exists(), r.stderr


USAGE_CASES = [
    (["nosuchverb"], "No such command"),
    (["inspect", "--nope", "tiny-llada"], "--nope"),
    (["inspect"], "Missing argument"),
    (["generate", "tiny-llada", "--steps", "x"], "--steps"),
    (["gguf", "tiny-llada"], "Missing argument"),
    (["verify", "tiny-llada"], "Missing argument"),
]


@pytest.mark.parametrize("args,needle", USAGE_CASES)
def test_usage_errors_exit_2_with_usage_line(cli, args, needle):
    code, out, err = cli(*args)
    assert code == 2, err
    assert "Traceback" not in err and needle in err
    assert err.lstrip().startswith("Usage: qdllm-export")
    assert len(err.strip().splitlines()) <= 5


def test_bare_command_shows_help_not_a_traceback(cli):
    code, out, err = cli()
    assert code in (0, 2) and "Traceback" not in out + err and "Usage" in out + err and "quantize" in out + err


def test_version(cli):
    from qdllm_export import __version__

    code, out, err = cli("--version")
    assert code == 0 and out.strip() == f"qdllm-export {__version__}" and err == ""


def test_usage_errors_in_a_real_process():
    """Through the console entry point: the same usage line, exit 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "qdllm_export", "inspect", "--nope", "x"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 2 and r.stderr.startswith("Usage: qdllm-export inspect") and "Traceback" not in r.stderr
