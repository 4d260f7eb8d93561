"""CPU use of processes from /proc, for the demo's live view and the benchmark."""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (threads included), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after the command name start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuMeter:
    """CPU percent of one process between successive calls to ``sample``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._last = (time.monotonic(), cpu_seconds(pid) or 0.0)
        self.total = 0.0

    def sample(self) -> float:
        now, cpu = time.monotonic(), cpu_seconds(self.pid)
        if cpu is None:
            return 0.0
        then, before = self._last
        self._last = (now, cpu)
        self.total = cpu
        return 100.0 * (cpu - before) / (now - then) if now > then else 0.0
