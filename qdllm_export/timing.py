"""Where the streaming pipeline spends its time: exclusive wall seconds per named phase, per block.

Off unless enabled (``QDLLM_PROFILE=path.json`` in the environment, or :func:`enable`); then every
phase boundary synchronises the CUDA device (so GPU work is charged to the phase that queued it) and
the phases of each transformer block are kept in a list, written as JSON at exit::

    {"blocks": [{"pass": "quantize", "block": 0, "wall": 8.1, "phases": {"load": 0.4, "forward": 1.2, ...}}, ...]}

Phases nest: time inside an inner phase is charged to it alone, under the path of the open phases
(``forward/hessian``: the Hessian accumulation inside a calibration forward); :func:`totals` sums them
by their outer phase.
``wall`` runs from the block's start to the next block's start (or the end of the run), so
``wall - sum(phases)`` is what no phase covers (writing the shard, the progress bar).
"""

from __future__ import annotations

import atexit
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

_state: dict[str, Any] | None = None


def enable(path: str | None = None) -> None:
    """Start recording (``path``: where :func:`dump` writes at exit; None keeps it in memory)."""
    global _state
    _state = {"path": path, "blocks": [], "stack": [], "mark": time.perf_counter()}
    if path:
        atexit.register(dump)


def enabled() -> bool:
    return _state is not None


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _charge() -> None:
    """Charge the seconds since the last boundary to the innermost open phase of the current block."""
    now = time.perf_counter()
    if _state["blocks"] and _state["stack"]:
        ph, key = _state["blocks"][-1]["phases"], "/".join(_state["stack"])
        ph[key] = ph.get(key, 0.0) + now - _state["mark"]
    _state["mark"] = now


def start_block(pass_name: str, index: int) -> None:
    """A new block of pass ``pass_name`` (``quantize``, ``sensitivity``) begins now."""
    if _state is None:
        return
    _sync()
    _charge()
    now = time.perf_counter()
    if _state["blocks"]:
        last = _state["blocks"][-1]
        last["wall"] = now - last.pop("_t0")
    _state["blocks"].append({"pass": pass_name, "block": index, "_t0": now, "phases": {}})


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the wall time inside to ``name`` (exclusive of nested phases); no-op when off."""
    if _state is None:
        yield
        return
    _sync()
    _charge()
    _state["stack"].append(name)
    try:
        yield
    finally:
        _sync()
        _charge()
        _state["stack"].pop()


def result() -> dict[str, Any]:
    """The blocks recorded so far (the last one's ``wall`` up to now)."""
    if _state is None:
        return {"blocks": []}
    blocks = []
    for b in _state["blocks"]:
        b = dict(b)
        if "_t0" in b:
            b["wall"] = time.perf_counter() - b.pop("_t0")
        blocks.append(b)
    return {"blocks": blocks}


def totals(phases: dict[str, float], depth: int = 1) -> dict[str, float]:
    """Seconds per phase path cut to its first ``depth`` names (inclusive of the phases inside)."""
    out: dict[str, float] = {}
    for k, v in phases.items():
        key = "/".join(k.split("/")[:depth])
        out[key] = out.get(key, 0.0) + v
    return out


def dump() -> None:
    """Write :func:`result` to the path given to :func:`enable`."""
    if _state is not None and _state["path"]:
        with open(_state["path"], "w") as f:
            json.dump(result(), f, indent=1)


if os.environ.get("QDLLM_PROFILE"):
    enable(os.environ["QDLLM_PROFILE"])
