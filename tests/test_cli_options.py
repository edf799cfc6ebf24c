"""Issue 8, item 5: options that used to be accepted silently are refused, naming the flag, before any model
loads. The cases run in one subprocess where ``import torch`` fails (a check that came after a PyTorch load
would surface as an ImportError instead of the expected message), except ``quantize``'s, whose checks are
its configs' own (they import the quantizer, hence torch) and run before the checkpoint is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import contextlib, io, json, sys
if sys.argv[2] == "block":
    sys.modules["torch"] = None  # the checks must not need PyTorch (nor load a model)
from qdllm_export.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # a traceback would be a failure
            code = repr(e)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""

LLADA, DREAM = "tiny-llada", "tiny-dream"

# (arguments, text the one-line message must contain)
CASES = [
    (["generate", LLADA, "--steps", "0"], "--steps"),
    (["generate", LLADA, "--gen-length", "0"], "--gen-length"),
    (["generate", LLADA, "--prompt", "Hi", "--prompt-ids", "1,2"], "--prompt and --prompt-ids"),
    (["generate", LLADA, "--alg", "origin"], "--alg: is a Dream option"),
    (["generate", LLADA, "--top-k", "5", "--top-p", "0.9"], "--top-p, --top-k: are Dream options"),
    (["generate", DREAM, "--remasking", "random"], "--remasking: is a LLaDA option"),
    (["generate", DREAM, "--block-length", "8"], "--block-length"),
    (["generate", DREAM, "--cfg-scale", "1"], "--cfg-scale"),
    (["generate", LLADA, "--gen-length", "1024"], "use --gen-length 511 or less"),
    (["generate", LLADA, "--gen-length", "64", "--block-length", "24"], "--block-length 24"),
    (["generate", LLADA, "--gen-length", "64", "--steps", "3"], "--steps 3"),
    (["generate", DREAM, "--top-p", "0"], "--top-p"),
    (["generate", LLADA, "--remasking", "lowest"], "--remasking"),
    (["generate", LLADA, "--device", "gpu"], "--device"),
    (["generate", LLADA, "--temperature", "-1"], "--temperature"),
    (["generate", LLADA, "--prompt-ids", ""], "the prompt is empty"),
    (["eval", LLADA, "--data", "{tmp}"], "--data"),
    (["eval", LLADA, "--mc", "0"], "--mc"),
    (["eval", LLADA, "--seq-len", "4096"], "--seq-len"),
    (["eval", LLADA, "--batch-size", "0"], "--batch-size"),
    (["verify", LLADA, LLADA, "--mask-ratios", "1.5"], "--mask-ratios"),
    (["verify", LLADA, LLADA, "--mask-ratios", "a,b"], "--mask-ratios"),
    (["verify", LLADA, LLADA, "--gen-length", "1024"], "--gen-length"),
    (["verify", LLADA, LLADA, "--min-agree", "2"], "--min-agree"),
    (["verify", LLADA, DREAM], "cannot be compared"),
    (["quantize", LLADA, "{tmp}/q", "--group-size", "12"], "--group-size"),
    (["quantize", LLADA, "{tmp}/q", "--bits", "1.5", "--no-abmp"], "--bits"),
    (["quantize", LLADA, "{tmp}/q", "--method", "rtn", "--bits", "2.5"], "--bits"),
    (["quantize", LLADA, "{tmp}/q", "--prefix-ratio", "1"], "--prefix-ratio"),
    (["quantize", LLADA, "{tmp}/q", "--calib", "{tmp}/missing.txt"], "--calib"),
    (["quantize", LLADA, "{tmp}/q", "--abmp-ratio", "0.9"], "--abmp-ratio"),
    (["quantize", LLADA, "{tmp}/q", "--act-order"], "--act-order is an option of --method gptq"),
    (["quantize", LLADA, "{tmp}/q", "--method", "rtn", "--static-groups"], "--static-groups is an option of --method gptq"),
    (["gguf", LLADA, "{tmp}/m.gguf", "--outtype", "f16", "--method", "rtn"], "--method: not used with --outtype f16"),
    (["gguf", LLADA, "{tmp}/m.gguf", "--embed-type", "q4"], "--embed-type"),
    (["onnx", LLADA, "{tmp}/m.onnx", "--accuracy-level", "4"], "--accuracy-level: not used with --kernel function"),
    (["onnx", LLADA, "{tmp}/m.onnx", "--outtype", "f32", "--kernel", "matmulnbits"], "--kernel: not used"),
    (["onnx", LLADA, "{tmp}/m.onnx", "--accuracy-level", "7", "--kernel", "matmulnbits"], "--accuracy-level"),
    # issue 15: NaN named as such (was "should be <= 16" / the sampler's "top_p ... >= 0.0" after a progress bar)
    (["gguf", LLADA, "{tmp}/m.gguf", "--outtype", "auto", "--bpw", "nan"], "'--bpw': nan is not a finite number"),
    (["generate", DREAM, "--top-p", "nan"], "'--top-p': nan is not a finite number"),
    (["generate", DREAM, "--top-p", "1.5"], "'--top-p': 1.5 is not in (0, 1]"),
    (["onnx", LLADA, "{tmp}/m.onnx", "--outtype", "auto", "--bpw", "1.5"], "nearest reachable budget is --bpw 2.15"),
    (["onnx", LLADA, "{tmp}/m.onnx", "--outtype", "auto", "--bpw", "2.2", "--block-size", "64"],
     "or keep it with --block-size 128"),
    (["onnx", LLADA, "{tmp}/m.onnx", "--outtype", "auto", "--bpw", "9"], "nearest reachable budget is --bpw 8.187"),
]
# checked when PyTorch is about to load the model (they need torch itself to decide)
TORCH_CASES = [
    (["generate", LLADA, "--device", "cuda:7"], "--device cuda:7: no CUDA device"),
]


N_BLOCKED = len(CASES)
CASES += TORCH_CASES


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opts")
    out: list = [None] * len(CASES)
    for block in (True, False):
        idx = [i for i, (args, _) in enumerate(CASES) if (args[0] != "quantize" and i < N_BLOCKED) == block]
        argv = [[a.replace("{tmp}", str(tmp)) for a in CASES[i][0]] for i in idx]
        r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv), "block" if block else "allow"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        for i, res in zip(idx, json.loads(r.stdout.strip().splitlines()[-1])):
            out[i] = res
    assert list(tmp.iterdir()) == []  # nothing was written by any refused command
    return out


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c[0][:1] + c[0][2:]) for c in CASES])
def test_refused_naming_the_flag_before_loading(results, i):
    code, err = results[i]
    needle = CASES[i][1]
    if "cuda" in needle and _cuda():
        pytest.skip("a CUDA device is visible")
    assert code == 2, err
    assert "Traceback" not in err and "ImportError" not in err
    assert needle in err, err
    assert "denoising" not in err and "larger --block-size" not in err  # no bar drawn; no impossible advice
    # one line for our own checks; click's usage errors add the usage line and a hint
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 or (lines[0].startswith("Usage:") and len(lines) <= 4), err


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_eval_text_counts_scored_tokens(cli):
    """Dream never scores a window's first token: the text says so and agrees with the JSON's n_tokens."""
    code, out, _ = cli("eval", DREAM, "--max-windows", "2", "--mc", "1", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["n_tokens"] == 2 * (rep["seq_len"] - 1)
    code, out, _ = cli("eval", DREAM, "--max-windows", "2", "--mc", "1")
    assert code == 0 and f"({rep['n_tokens']} scored" in out


def test_verify_says_which_tolerance_broke():
    from qdllm_export.cli.verify import failures
    from qdllm_export.verify import FileReport, GenCheck, LogitCheck

    rep = FileReport("m.gguf", "gguf", "ref", logits=[LogitCheck(0.5, 0.2, 3e-3, 0.97)],
                     generation=[GenCheck("llada/random", False, 5, [1], [2]), GenCheck("llada/low_confidence", True, None, [1], [1])])
    assert failures(rep, rtol=1e-4, min_agree=0.99) == ["rel err 3.00e-03 > --rtol 0.0001",
                                                       "argmax agree 0.9700 < --min-agree 0.99",
                                                       "llada/random differs at token 5"]
    assert failures(rep, rtol=1e-2, min_agree=0.9)[:1] == ["llada/random differs at token 5"]


def _float_options() -> list[tuple[str, str]]:
    """(verb, --flag) of every float-typed option of every verb, read from the verbs' signatures."""
    import typing

    import typer

    from qdllm_export.cli import app

    cmd = typer.main.get_command(app)
    out = []
    for info in app.registered_commands:
        verb = info.name or info.callback.__name__
        hints = typing.get_type_hints(info.callback)
        floats = {n for n, t in hints.items() if t in (float, typing.Optional[float])}
        out += [(verb, p.opts[0]) for p in cmd.commands[verb].params if p.name in floats]
    return out


def test_every_float_option_refuses_nan_and_inf(tmp_path):
    """Issue 15: Python's float() takes nan and inf, and every comparison with NaN is False, so range checks let
    NaN through (or answered it with a range message). Every float option of every verb refuses nan, inf and
    -inf by name, before any model loads (PyTorch blocked)."""
    required = {"quantize": [LLADA, f"{tmp_path}/q"], "gguf": [LLADA, f"{tmp_path}/m.gguf"],
                "onnx": [LLADA, f"{tmp_path}/m.onnx"], "verify": [LLADA, LLADA], "generate": [LLADA]}
    opts = _float_options()
    assert {f for _, f in opts} >= {"--bpw", "--bits", "--top-p", "--temperature", "--rtol", "--min-agree",
                                    "--prefix-ratio", "--abmp-ratio", "--cfg-scale", "--alg-temp"}
    argv = [[verb, *required[verb], f"{flag}={value}"] for verb, flag in opts for value in ("nan", "inf", "-inf")]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv), "block"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for args, (code, err) in zip(argv, json.loads(r.stdout.strip().splitlines()[-1])):
        flag, value = args[-1].split("=")
        assert code == 2 and f"'{flag}': {value} is not a finite number" in err, (args, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb,low,high", [("gguf", "2.31", "8.5"), ("onnx", "2.15", "8.19")])
def test_bpw_help_gives_the_reachable_range(cli, verb, low, high):
    """`--bpw`'s help showed [1, 16]; only about 2.31-8.5 (gguf) or 2.15-8.19 (onnx, block 128) can be reached."""
    code, out, _ = cli(verb, "--help")
    assert code == 0 and low in out and high in out and "16.0" not in out, out
