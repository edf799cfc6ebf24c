"""How many threads the grid fits use on a CPU.

A fit is thousands of medium-sized tensor ops (candidate scales, nearest codes, weighted errors). PyTorch runs
each op on all its intra-op threads and waits at the end of each for the last one; when other processes keep the
cores busy, a waiting thread is descheduled for a time slice and every op pays for it. Measured on a 2-core machine
at a load of 3-10 (docs/benchmarks.md, "RTN onto stock grids"): the fits ran 10x slower on 2 threads than on 1.
Their results do not depend on the thread count (rows are independent and every reduction runs inside a row: the
same bytes at 1 and 2 threads, tested), so the fits take torch's threads less the cores that other processes are
using right now, at least one. ``OMP_NUM_THREADS`` set by the user is left alone.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_busy = {"others": 0.0}  # smoothed count of other processes' runnable threads


def _runnable_others() -> float | None:
    """Runnable threads of other processes now: the kernel's count (``/proc/loadavg``, fourth field) less ours."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        ours = 0
        for task in Path("/proc/self/task").iterdir():
            stat = (task / "stat").read_text()
            ours += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return float(max(0, total - ours))


def fit_threads() -> int:
    """Threads for the next fit: ``torch.get_num_threads()`` less the cores other processes use (smoothed over
    the last fits), at least 1; unchanged where ``OMP_NUM_THREADS`` is set or nothing can be read."""
    n = torch.get_num_threads()
    if n <= 1 or "OMP_NUM_THREADS" in os.environ:
        return n
    now = _runnable_others()
    if now is None:
        return n
    _busy["others"] = 0.5 * _busy["others"] + 0.5 * now
    return max(1, min(n, (os.cpu_count() or n) - round(_busy["others"])))


def on_free_cores(fn: F) -> F:
    """Runs ``fn(W, ...)`` (a fit of the weight ``W``) with :func:`fit_threads` threads when ``W`` is on the CPU."""

    @functools.wraps(fn)
    def run(W: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n = torch.get_num_threads()
        want = fit_threads() if W.device.type == "cpu" else n
        if want == n:
            return fn(W, *args, **kwargs)
        torch.set_num_threads(want)
        try:
            return fn(W, *args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return run  # type: ignore[return-value]
