"""The operator's rate cap, enforced where bytes meet the wire (sans-IO).

:class:`WireGate` decides whether the next UDP datagram may leave now. It
counts *every* datagram the agent sends — stream data, retransmissions,
ACK-only packets, PINGs, handshakes — because they all pass through the
driver's transmit. Two rules, both must hold:

* a token bucket at the cap with a small burst (smooth sending, so the
  shared link's queue is not hit with bursts), and
* a sliding one-second window: the bytes sent in any second never exceed
  the cap's allotment for a second, whatever the bucket would allow.

A rate of 0 means uncapped: every datagram passes, and the gate only
measures. Time is always the caller's ``now`` (``trio.current_time()``), so
tests drive it with explicit numbers or Trio's MockClock.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 1.0
BURST_SECONDS = 0.01  # the bucket holds at most 10 ms at the cap (>= 2 datagrams)
EPSILON = 1e-6  # bytes of float slack


def tick_interval(rate_bps: int, max_datagram: int = 1350) -> float:
    """How often the scheduler ticks: ~2 datagrams at the cap, clamped to 5–100 ms."""
    if rate_bps <= 0:
        return 0.005
    return min(0.1, max(0.005, 2 * max_datagram * 8 / rate_bps))


class WireGate:
    def __init__(self, rate_bps: int, now: float, max_datagram: int = 1350) -> None:
        self.max_datagram = max_datagram
        self._sent: deque[tuple[float, int]] = deque()
        self._window_bytes = 0
        self.total_bytes = 0
        self.held = 0  # datagrams that had to wait for the gate
        self.set_rate(rate_bps, now)

    # -- configuration -------------------------------------------------------------

    def set_rate(self, rate_bps: int, now: float) -> None:
        if rate_bps < 0:
            raise ValueError("rate must be >= 0 (0 = uncapped)")
        if 0 < rate_bps < 8 * self.max_datagram:
            raise ValueError(
                f"a cap of {rate_bps} bit/s is below one {self.max_datagram}-byte datagram per"
                f" second; the minimum is {8 * self.max_datagram} bit/s"
            )
        self.rate_bps = rate_bps
        self.bytes_per_second = rate_bps / 8
        self.burst = max(2 * self.max_datagram, self.bytes_per_second * BURST_SECONDS)
        # A new cap starts with an empty bucket: a lowered cap takes effect at once.
        self._tokens = 0.0
        self._last = now

    @property
    def capped(self) -> bool:
        return self.rate_bps > 0

    # -- accounting --------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if now > self._last:
            refill = (now - self._last) * self.bytes_per_second
            self._tokens = min(self.burst, self._tokens + refill)
            self._last = now

    def _expire(self, now: float) -> None:
        sent = self._sent
        horizon = now - WINDOW
        while sent and sent[0][0] <= horizon:
            self._window_bytes -= sent.popleft()[1]

    def window_bytes(self, now: float) -> int:
        """Bytes sent in the last second (the measured wire rate, in bytes/s)."""
        self._expire(now)
        return self._window_bytes

    def _record(self, nbytes: int, now: float) -> None:
        self._sent.append((now, nbytes))
        self._window_bytes += nbytes
        self.total_bytes += nbytes

    def try_send(self, nbytes: int, now: float) -> bool:
        """Consume allowance for one datagram of ``nbytes``; ``False`` if it must wait."""
        if not self.capped:
            self._record(nbytes, now)
            return True
        self._refill(now)
        self._expire(now)
        if self._tokens + EPSILON < nbytes or self._window_bytes + nbytes > self.bytes_per_second:
            self.held += 1
            return False
        self._tokens -= nbytes
        self._record(nbytes, now)
        return True

    def ready_at(self, nbytes: int, now: float) -> float:
        """The earliest time ``try_send(nbytes)`` can succeed (``now`` if it can now)."""
        if not self.capped:
            return now
        self._refill(now)
        self._expire(now)
        at = now
        if self._tokens < nbytes:
            at = now + (nbytes - self._tokens) / self.bytes_per_second
        excess = self._window_bytes + nbytes - self.bytes_per_second
        if excess > 0:
            freed = 0
            for when, size in self._sent:
                freed += size
                if freed >= excess:
                    at = max(at, when + WINDOW)
                    break
            else:
                at = math.inf  # a datagram larger than one second's allotment
        return at if at == now else at + 1e-9  # float slack: at `at`, try_send succeeds
