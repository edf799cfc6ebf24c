"""Checks of command-line values, run before any model loads. Every message names the flag and the fix.

Two kinds:

* per-option values go into the Typer option itself (``min=``/``max=`` ranges, ``callback=one_of(...)``
  for choices), so click reports them as usage errors (usage line, exit 2) naming the flag;
* checks that need several options or the model's header (family, context length) are functions here
  that raise ``QdllmError`` (one line, exit 2).

A verb (or an option added later) composes these; none of them imports torch.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import typer

from formats.errors import QdllmError
from formats.families import HParams
from formats.outputs import check_output_file, check_output_folder

# Options that only one family's sampler reads (``generate``); the other family would ignore them silently.
LLADA_ONLY = ("--block-length", "--remasking", "--cfg-scale")
DREAM_ONLY = ("--alg", "--alg-temp", "--top-p", "--top-k")
TORCH_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------- per option
def one_of(*choices: str) -> Callable[[Optional[str]], Optional[str]]:
    """A Typer option callback accepting only ``choices`` (None passes: the option was not given)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def finite(value: Optional[float]) -> Optional[float]:
    """A Typer option callback refusing NaN and +-inf (Python's ``float()`` accepts ``nan`` and ``inf``, and every
    comparison with NaN is False, so a range check alone lets it through). Every float option runs it, alone or
    inside :func:`between`; ranges go into ``between``, not Typer's ``min=``/``max=`` (checked before any callback,
    those would answer NaN with a range message)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def between(low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> Callable[[Optional[float]], Optional[float]]:
    """A Typer option callback for a finite number in ``[low, high]`` (an end excluded with ``low_open``/``high_open``;
    ``high`` left out: no upper end)."""

    def check(value: Optional[float]) -> Optional[float]:
        if finite(value) is None:
            return value
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            if math.isinf(high):
                raise typer.BadParameter(f"{value:g} is not {'>' if low_open else '>='} {low:g}")
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise typer.BadParameter(f"{value:g} is not in {span}")
        return value

    return check


def device_option(value: Optional[str]) -> Optional[str]:
    """``--device`` callback: cpu, cuda or cuda:N."""
    if value is None or value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise typer.BadParameter(f"{value!r} is not cpu, cuda or cuda:N")


def float_list(flag: str, text: str, lo: float, hi: float) -> list[float]:
    """Comma-separated numbers, each in ``[lo, hi]``: ``--mask-ratios 0.15,0.5``."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise QdllmError(f"{flag} {text!r}: expected comma-separated numbers like 0.15,0.5,0.9") from None
    if not values:
        raise QdllmError(f"{flag} is empty; give at least one number")
    if not all(math.isfinite(v) for v in values):
        raise QdllmError(f"{flag} {text!r}: {next(v for v in values if not math.isfinite(v))} is not a finite number")
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise QdllmError(f"{flag} {text!r}: {bad[0]:g} is outside [{lo:g}, {hi:g}]")
    return values


# ----------------------------------------------------------------------------------------- combinations
def flag_names(message: str, names: Iterable[str]) -> str:
    """``message`` with each Python parameter name in ``names`` written as its flag (``group_size`` ->
    ``--group-size``), for errors raised by library code that validates CLI values."""
    import re

    names = sorted(names, key=len, reverse=True)
    return re.sub(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)


def not_both(a: str, a_value: Any, b: str, b_value: Any) -> None:
    """Refuse two options that exclude each other (one would be dropped silently)."""
    if a_value is not None and b_value is not None:
        raise QdllmError(f"{a} and {b} were both given; give one of them")


def family_options(hp: HParams, source: str, given: Mapping[str, Any]) -> None:
    """Refuse sampler options of the other family. ``given``: flag -> value (None: not given)."""
    other = DREAM_ONLY if hp.spec.sampler_kind == "llada" else LLADA_ONLY
    wrong = [f for f in other if given.get(f) is not None]
    if wrong:
        fam, its = ("LLaDA", "Dream") if hp.spec.sampler_kind == "llada" else ("Dream", "LLaDA")
        own = LLADA_ONLY if hp.spec.sampler_kind == "llada" else DREAM_ONLY
        raise QdllmError(f"{', '.join(wrong)}: {'is a' if len(wrong) == 1 else 'are'} {its} option"
                         f"{'' if len(wrong) == 1 else 's'}, but {source} is a {fam} model (its options: {', '.join(own)})")


def fits_context(hp: HParams, source: str, flag: str, n_tokens: int, detail: str = "", most: Optional[int] = None) -> None:
    """Refuse a sequence longer than the model's context (it would run for minutes and produce noise).

    ``detail`` says what the ``n_tokens`` are; ``most`` is the largest value of ``flag`` that fits."""
    if n_tokens > hp.context_length:
        fix = f"use {flag} {most} or less" if most is not None and most >= 1 else f"lower {flag}"
        raise QdllmError(f"{flag}: {detail or f'{n_tokens} tokens'} exceed the {hp.context_length}-token context of "
                         f"{source}; {fix}")


def llada_blocks(gen_length: int, block_length: Optional[int], steps: Optional[int]) -> tuple[int, int]:
    """LLaDA's ``(block_length, steps)`` with defaults filled and their divisibility checked.

    Default block length: 32 when it divides ``--gen-length`` (the official setting), else one block."""
    if block_length is None:
        block_length = 32 if gen_length % 32 == 0 else gen_length
    if gen_length % block_length:
        raise QdllmError(f"--gen-length {gen_length} is not a multiple of --block-length {block_length}")
    n_blocks = gen_length // block_length
    steps = gen_length if steps is None else steps
    if steps % n_blocks:
        raise QdllmError(f"--steps {steps} is not a multiple of the number of blocks, {n_blocks} "
                         f"(--gen-length {gen_length} / --block-length {block_length})")
    return block_length, steps


def torch_only(kind: str, source: str, given: Mapping[str, Any]) -> None:
    """Refuse PyTorch options (``--dtype``, ``--device``) for a file that NumPy or onnxruntime runs."""
    wrong = [f for f, v in given.items() if v is not None]
    if kind in ("gguf", "onnx") and wrong:
        raise QdllmError(f"{', '.join(wrong)}: only for checkpoint folders run in PyTorch; {source} is a .{kind} file")


def unused_with(flags: Mapping[str, bool], reason: str) -> None:
    """Refuse options that the chosen path ignores. ``flags``: flag -> given; ``reason`` ends the message."""
    wrong = [f for f, given in flags.items() if given]
    if wrong:
        raise QdllmError(f"{', '.join(wrong)}: not used {reason}")


def tables_as_stored(model: str, asked: Mapping[str, Optional[str]]) -> None:
    """Refuse ``--embed-type`` / ``--head-type`` other than what a quantized checkpoint MODEL holds: its tables
    were chosen where it was quantized, and every file written from it holds the same (DESIGN section 10)."""
    from formats.checkpoint import QuantizedCheckpoint, is_quantized_checkpoint
    from qdllm_export.backends import resolve

    folder = resolve(model)
    if not any(asked.values()) or not folder.is_dir() or not is_quantized_checkpoint(folder):
        return
    from qdllm_export.grids.registry import fallback_type

    ck = QuantizedCheckpoint(folder)
    flags = {"token_embd.weight": "--embed-type", "output.weight": "--head-type"}
    for name, t in asked.items():
        if t is None:
            continue
        held = ck.stored_type(name)
        n_in = ck.hparams.d_model
        want = t.upper() if t in ("f16", "f32") else fallback_type(t, n_in).upper()
        if want != held and not (held == "BF16" and want == "F16"):
            raise QdllmError(f"{folder}: holds {name.split('.')[0]} as {held}, chosen where it was quantized, and every "
                             f"file written from it holds the same; drop {flags[name]} {t}, or re-quantize the float "
                             f"checkpoint with {flags[name]} {t}")


# ----------------------------------------------------------------------------------------- outputs
def _overlap(out: Path, inputs: Iterable[Optional[Path]]) -> None:
    o = out.resolve()
    for p in inputs:
        if p is None:
            continue
        r = Path(p).resolve()
        if o == r:
            how = "is"
        elif r.is_relative_to(o):
            how = "contains"
        elif o.is_relative_to(r):
            how = "lies inside"
        else:
            continue
        raise QdllmError(f"{out}: the output {how} the input {p}; write it somewhere outside every input "
                         "(refused with or without --force)")


def _writable(folder: Path) -> None:
    """The nearest existing folder at or above ``folder`` accepts a new file (read-only mounts, permissions)."""
    f = folder
    while not f.exists() and f != f.parent:
        f = f.parent
    try:
        with tempfile.TemporaryFile(dir=f):
            pass
    except OSError as e:
        raise QdllmError(f"{f}: cannot write there ({e.strerror}); choose an output in a writable folder") from None


def output_suffix(out: Path, suffix: str, verb: str) -> None:
    """OUT's extension fits what ``verb`` writes (``gguf`` and ``imatrix`` write GGUF, ``onnx`` ONNX): a file's name
    is how users and tools (``inspect``, llama.cpp, onnxruntime) tell the formats apart, and ``--force`` must not
    put ONNX bytes under a ``.gguf`` name. Checked before any model loads."""
    if Path(out).suffix.lower() != suffix:
        raise QdllmError(f"{out}: `qdllm-export {verb}` writes {suffix[1:].upper()}; give the output a {suffix} name "
                         f"(e.g. {Path(out).with_suffix(suffix).name})")


def output_file(out: Path, force: bool, inputs: Iterable[Optional[Path]] = ()) -> Path:
    """OUT of ``gguf`` / ``onnx``: outside every input, a file (not a folder), replaced only when it is one
    qdllm-export wrote and ``--force`` is given, in a writable folder."""
    _overlap(out, inputs)
    check_output_file(out, force)
    _writable(out.parent)
    return out


def output_folder(out: Path, force: bool, inputs: Iterable[Optional[Path]] = ()) -> Path:
    """OUT_DIR of ``quantize``: outside every input, replaced only when it is our own quantized checkpoint
    (its ``qdllm_quant.json``, nothing added) and ``--force`` is given, its parent writable."""
    _overlap(out, inputs)
    check_output_folder(out, force)
    _writable(out.parent)
    return out
