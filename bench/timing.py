"""Timing helpers shared by the benchmark scripts: interleaved medians (every side sees the same
machine load) and notes on load from other processes (these machines are shared and noisy)."""

from __future__ import annotations

import os
import statistics
import time


def timed(call) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result



def interleaved_median_ms(calls: dict, repeats: int) -> dict:
    """Median ms of each call, the calls alternating so that all see the same machine load."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call)[0])
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}



def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, of this process) so far; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system



def other_load_note(start: tuple[float, float] | None, seconds: float) -> str:
    """How many cores other processes kept busy since `start`: load that the 1-minute average misses."""
    end = cpu_seconds()
    if start is None or end is None:
        return ""
    others = max((end[0] - start[0]) - (end[1] - start[1]), 0.0) / seconds
    note = f"other processes kept {others:.2f} of {os.cpu_count()} cores busy during the timed calls"
    return f"warning: {note}: the timings are skewed (torch's most)" if others > 0.25 else note



def warn_if_loaded(when: str) -> None:
    load, cores = os.getloadavg()[0], os.cpu_count()
    note = f"load average {load:.2f} on {cores} cores {when}"
    if load > 0.5 * cores:
        note = (f"warning: {note}: other processes skew the timings (PyTorch's thread pool suffers most: "
                "with fewer free cores than torch threads, try --threads 1)")
    print(note, flush=True)
