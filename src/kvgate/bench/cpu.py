"""CPU time of another process, for benchmarks that charge work to the process that did it."""

from __future__ import annotations

from pathlib import Path


def process_cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used, all its threads, from the scheduler's statistics
    (nanoseconds, not clock ticks: a few milliseconds of work show). Linux only."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9
