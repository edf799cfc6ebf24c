"""The README's "Typical use" lines, run as written (default flags) on both bundled models and on a random
LLaDA whose width 256 does not divide (the tables' and the stock types' fallbacks). Every ``verify`` line must
exit 0, and ``eval`` of the quantized checkpoint must report the model as shipped (its tables included)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from formats.checkpoint import QuantizedCheckpoint
from tests.tiny import make_checkpoint, tiny_hparams

README = Path(__file__).resolve().parents[1] / "README.md"
FLOAT = "path/to/LLaDA-8B-Base"


def typical_use() -> list[list[str]]:
    """The command lines of the README's "Typical use" block, comments dropped."""
    text = README.read_text()
    block = re.search(r"## Typical use\s+```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]


def localised(argv: list[str], model: str, tmp: Path, data: Path) -> list[str]:
    """A README line made to run here: the float checkpoint is ``model``, outputs go to ``tmp``, no CUDA."""
    out = []
    skip = False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--device":
            skip = True
            continue
        if a == FLOAT:
            out.append(model)
        elif a == "my_text.txt":
            out.append(str(data))
        elif a.endswith((".gguf", ".onnx")) or a.rstrip("/") == "q8b":
            out.append(str(tmp / a.rstrip("/")))
        else:
            out.append(a)
    return out


def test_the_readme_lists_the_sequence():
    lines = [" ".join(a[1:3]) for a in typical_use()]
    assert lines[:4] == ["quantize path/to/LLaDA-8B-Base", "gguf q8b/", "onnx q8b/", "verify q8b/"]
    assert any(a[1] == "verify" and a[2] == FLOAT for a in typical_use())  # the stock files are verified too


@pytest.fixture(scope="module")
def wide_llada(tmp_path_factory) -> str:
    """A random LLaDA of d_model 384 (256 does not divide it): Q4_K / Q6_K / q2_k fall back."""
    hp = tiny_hparams("llada", d_model=384, n_layers=1, n_heads=6)
    folder, _, _ = make_checkpoint(tmp_path_factory.mktemp("wide") / "llada384", "llada", hp=hp, seed=3)
    return str(folder)


@pytest.mark.parametrize("model", ["tiny-llada", "tiny-dream", "wide"])
def test_typical_use_passes_with_default_flags(model, wide_llada, cli, tmp_path):
    model = wide_llada if model == "wide" else model
    data = tmp_path / "text.txt"
    data.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 40)
    refused: set[str] = set()
    for argv in typical_use():
        args = [a for a in localised(argv, model, tmp_path, data) if a not in refused]
        code, out, err = cli(*args)
        if model == wide_llada and "--bpw" in args:  # every 2-3 bit ggml type falls back to iq4_nl at d=384
            assert code == 2 and "cannot be met" in err and "--bpw 4.257" in err
            refused.add(args[2])
            continue
        assert code == 0, f"{' '.join(args)} exited {code}: {err[-2000:]}{out[-2000:]}"
        if args[0] == "verify":
            assert "FAIL" not in out and out.count("PASS") == len(args) - 2
        if args[0] == "eval":
            nll = json.loads(out)
            q = QuantizedCheckpoint(tmp_path / "q8b")
            assert {n: q.stored_type(n) for n in ("token_embd.weight", "output.weight")} == \
                ({"token_embd.weight": "Q4_K", "output.weight": "Q6_K"} if model != wide_llada else
                 {"token_embd.weight": "Q5_0", "output.weight": "Q8_0"})
            assert nll["model"] == str(tmp_path / "q8b") and nll["nll"] > 0
