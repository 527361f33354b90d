"""Measuring from outside: the most bytes any window of time carried, what a reader
got when, and one benchmark case run in a process of its own (the benchmarks' shared
instruments)."""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any


def max_window_bytes(sends: list[tuple[float, int]], width: float = 1.0) -> int:
    """Most bytes sent in any window ``(t - width, t]`` of a time-ordered ``(t, bytes)`` log."""
    best = total = j = 0
    for t, n in sends:
        total += n
        while sends[j][0] <= t - width:
            total -= sends[j][1]
            j += 1
        best = max(best, total)
    return best


class Arrivals:
    """Cumulative bytes a reader got, with the time of each chunk (``clock``: the
    benchmark's time source, e.g. ``trio.current_time`` or ``time.monotonic``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.counts: list[int] = []
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        self.times.append(self.clock())
        self.counts.append(self.total)

    def at(self, t: float) -> int:
        """Bytes received by time ``t``."""
        i = bisect.bisect_right(self.times, t)
        return self.counts[i - 1] if i else 0

    def max_gap(self, t0: float, t1: float) -> float:
        return self.gap(t0, t1)[0]

    def gap(self, t0: float, t1: float) -> tuple[float, float]:
        """The longest time without a byte in [t0, t1], and when it began (s after t0)."""
        lo = bisect.bisect_left(self.times, t0)
        hi = bisect.bisect_right(self.times, t1)
        points = [t0, *self.times[lo:hi], t1]
        return max((b - a, a - t0) for a, b in zip(points, points[1:], strict=False))


def run_isolated(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """Run one benchmark case as ``cmd`` in its own process group, so that a stalled
    case, or the driver being stopped, leaves no simulator or agent behind.

    Returns the JSON object of the last line of standard output that starts with
    ``{`` (with ``wall``: the seconds the case took), or ``None`` and why not: a
    timeout, or the exit status with the error lines of its output (its last lines
    if none says "error")."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"timed out after {timeout:.0f} s"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the case left behind
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        text = (err or out).strip().splitlines()
        errors = [ln.strip(" |") for ln in text if "error" in ln.lower()][-2:]
        return None, f"exit {proc.returncode}: " + " / ".join(errors or text[-5:])
    result: dict[str, Any] = json.loads(lines[-1])
    result["wall"] = time.monotonic() - started
    return result, None
