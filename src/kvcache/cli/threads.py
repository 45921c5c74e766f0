"""How many CPU threads the model may use: ``--threads N``, or by default the cores that are free now.

Why it matters: PyTorch's CPU kernels run on an OpenMP team whose threads wait for each other at
every barrier. When another process keeps one of the cores busy, a team as wide as the machine has
a thread that is descheduled while the others spin at the barrier, and batch-1 decode (hundreds of
small matmuls per token) slows by an order of magnitude. A team no wider than the idle cores does
not have that problem, and decode, which is memory-bound, loses little from fewer threads.

The default therefore counts the cores this process may run on (its affinity mask) and subtracts
the ones other processes keep busy, measured over a short window from /proc/stat: never more
threads than free cores, never fewer than one. OpenMP's waiting threads are also told to sleep
rather than spin (``OMP_WAIT_POLICY=PASSIVE``, unless the user set it), so a neighbour that starts
later costs less. See BENCHMARKS.md for the measurements behind this.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from typing import Callable

SAMPLE_SECONDS = 0.1
SLACK = 0.25  # a core counts as free when at most this much of it is busy with other work


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) jiffies per CPU from /proc/stat, or None where there is no /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    times = {}
    for fields in lines:
        cpu = int(fields[0][3:])
        if cpu in cpus:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            idle = values[3] + values[4]
            times[cpu] = (sum(values) - idle, sum(values))
    return times


def busy_cores(cpus: list[int], seconds: float = SAMPLE_SECONDS, during: Callable[[], object] | None = None) -> float:
    """How many of ``cpus`` other processes keep busy, averaged over at least ``seconds`` (0.0
    without /proc). ``during`` runs inside the window (the CLI imports torch there, so the sample
    costs no extra wall time); this process's own CPU time in the window is not counted as busy."""
    before, own_before, start = _cpu_times(cpus), time.process_time(), time.monotonic()
    if during is not None:
        during()
    time.sleep(max(0.0, seconds - (time.monotonic() - start)))
    after, own, wall = _cpu_times(cpus), time.process_time() - own_before, time.monotonic() - start
    if not before or not after:
        return 0.0
    busy = 0.0
    for cpu, (b0, t0) in before.items():
        b1, t1 = after.get(cpu, (b0, t0))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return max(0.0, busy - own / wall)


def default_threads(during: Callable[[], object] | None = None) -> int:
    """The cores that are free now: allowed cores minus busy ones, at least 1 (see the module doc)."""
    cpus = allowed_cpus()
    free = len(cpus) - busy_cores(cpus, during=during)
    return max(1, min(len(cpus), math.floor(free + SLACK)))


def apply_threads(requested: int | None) -> int:
    """Set the thread count (and a sleeping OpenMP wait policy) before torch starts its thread pool.
    Without ``requested``, the free cores are sampled while torch is being imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = requested or default_threads(during=lambda: importlib.import_module("torch"))
    import torch
    torch.set_num_threads(threads)
    return threads
