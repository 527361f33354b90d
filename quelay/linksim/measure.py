"""Measuring a send log from outside: the most bytes any window of time carried."""

from __future__ import annotations


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
