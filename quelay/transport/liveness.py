"""Sans-IO dead-link detection: no trio, no sockets, time is the caller's ``now``."""

from __future__ import annotations

import math


class Liveness:
    """Silent for ``dead_after`` seconds (or 4 RTTs, if longer) means the link is dead.

    ``heard(now)`` is called for every datagram received from the peer;
    ``is_dead(now, rtt)`` asks whether the silence has lasted too long. ``rtt``
    is the smoothed RTT (``None`` before the first sample).
    """

    def __init__(self, dead_after: float) -> None:
        if not dead_after > 0:
            raise ValueError(f"dead_after must be > 0, got {dead_after!r}")
        self.dead_after = dead_after
        self.last_heard = -math.inf

    def heard(self, now: float) -> None:
        if now > self.last_heard:
            self.last_heard = now

    def limit(self, rtt: float | None) -> float:
        """The silence that means dead: ``dead_after``, or 4 RTTs on a longer path."""
        return max(self.dead_after, 4 * rtt) if rtt else self.dead_after

    def silence(self, now: float) -> float:
        """Seconds since the peer was last heard (``inf`` if never)."""
        return now - self.last_heard

    def is_dead(self, now: float, rtt: float | None) -> bool:
        return self.silence(now) > self.limit(rtt)

    def dead_at(self, rtt: float | None) -> float:
        """The time at which, if nothing is heard before, the link is dead."""
        return self.last_heard + self.limit(rtt)
