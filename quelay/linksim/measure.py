"""Measuring from outside: the most bytes any window of time carried, and what a
reader got when (the benchmarks' shared instruments)."""

from __future__ import annotations

import bisect
from collections.abc import Callable


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
