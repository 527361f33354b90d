"""The operator's rate cap, enforced where bytes meet the wire (sans-IO).

:class:`WireGate` decides whether the next UDP datagram may leave now. It
counts *every* datagram the agent sends — stream data, retransmissions,
ACK-only packets, PINGs, handshakes — because they all pass through the
driver's transmit, and it counts each one as the link carries it: the UDP
payload plus the IP and UDP headers (28 bytes on IPv4, 48 on IPv6) plus the
operator's ``link_overhead`` (encapsulation the operator knows about: a VPN,
GSE framing; default 0). Two rules, both on those wire bytes, must hold:

* a token bucket at the cap with a small burst (smooth sending, so the
  shared link's queue is not hit with bursts), and
* a sliding one-second window: the bytes sent in any second never exceed
  the cap's allotment for a second, whatever the bucket would allow. A sent
  datagram counts for :data:`GUARD` (5 ms) longer than the second, so that
  an observer whose timestamps differ from ours by that much (the kernel,
  the link, a clock read a moment later) still sees every 1-s window, even a
  closed one, at or below the cap; it costs at most 0.5 % of the rate.

A rate of 0 means uncapped: every datagram passes, and the gate only
measures. A link's gate may have a ``parent`` (a hub's total cap shared by
every link): a datagram leaves only when both allow it, and both count it.
How the total is divided among links is :mod:`quelay.core.share`'s job; the
parent only makes sure that no mix of links ever exceeds it. Time is always
the caller's ``now`` (``trio.current_time()``), so tests drive it with
explicit numbers or Trio's MockClock.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 1.0
GUARD = 0.005  # a datagram stays in the window this much longer than WINDOW
BURST_SECONDS = 0.01  # the bucket holds at most 10 ms at the cap (>= 2 datagrams)
EPSILON = 1e-6  # bytes of float slack
IPV4_UDP_HEADER = 20 + 8
IPV6_UDP_HEADER = 40 + 8


def tick_interval(rate_bps: int, max_datagram: int = 1350) -> float:
    """How often the scheduler ticks while there is demand: ~2 datagrams at the cap,
    clamped to 5–100 ms (with no demand it does not tick at all)."""
    if rate_bps <= 0:
        return 0.005
    return min(0.1, max(0.005, 2 * max_datagram * 8 / rate_bps))


def minimum_rate(max_datagram: int, per_datagram: int) -> int:
    """The lowest cap (bit/s) that lets one full datagram with its headers and link
    overhead through per second; a cap below it could never send anything."""
    return 8 * (max_datagram + per_datagram)


MIN_TILED_DATAGRAM = 1200  # QUIC's smallest max datagram size: never tile below it


def tiled_datagram(rate_bps: int, max_datagram: int, per_datagram: int) -> int:
    """The UDP payload size (at most ``max_datagram``) whose datagrams fill the cap's
    one-second allotment exactly.

    The sliding window admits only whole datagrams: at 100 kbit/s a second holds
    12,500 bytes, nine 1378-byte datagrams (1350 + 28 bytes of headers) and 9 % of a
    tenth that never goes. Ten datagrams of 1250 bytes use all of it (the datagram
    count, which sets the header cost, is the same as the whole-datagram minimum).
    Below :data:`MIN_TILED_DATAGRAM` the configured size is kept.
    """
    if rate_bps <= 0:
        return max_datagram
    allotment = rate_bps / 8
    count = math.ceil(allotment / (max_datagram + per_datagram))
    size = min(max_datagram, int(allotment / count) - per_datagram)
    return size if size >= MIN_TILED_DATAGRAM else max_datagram


def payload_bytes_per_second(rate_bps: int, max_datagram: int, per_datagram: int) -> float:
    """The payload rate full-size datagrams can carry under a wire cap of ``rate_bps``
    (what QUIC's own pacer should aim at, so the gate rarely has to hold anything)."""
    return rate_bps / 8 * max_datagram / (max_datagram + per_datagram)


class WireGate:
    def __init__(self, rate_bps: int, now: float, max_datagram: int = 1350, *,
                 header_bytes: int = IPV4_UDP_HEADER, link_overhead: int = 0,
                 parent: WireGate | None = None) -> None:
        self.max_datagram = max_datagram
        self.parent = parent
        self._sent: deque[tuple[float, int, int]] = deque()  # (time, wire, payload)
        self._window_bytes = 0
        self._window_payload = 0
        self.total_bytes = 0  # wire bytes: payload + headers + link overhead
        self.total_payload = 0  # UDP payload bytes
        self.total_datagrams = 0
        self.held = 0  # datagrams that had to wait for the gate
        self.header_bytes = 0
        self.link_overhead = 0
        self.per_datagram = 0
        self.rate_bps = 0
        self.set_link(header_bytes=header_bytes, link_overhead=link_overhead)
        self.set_rate(rate_bps, now)

    # -- configuration -------------------------------------------------------------

    def set_link(self, *, header_bytes: int | None = None,
                 link_overhead: int | None = None) -> None:
        """What the link adds to every datagram: IP+UDP headers and the operator's
        overhead. Takes effect for the next datagram."""
        header = self.header_bytes if header_bytes is None else header_bytes
        overhead = self.link_overhead if link_overhead is None else link_overhead
        if header < 0 or overhead < 0:
            raise ValueError("header bytes and link_overhead must be >= 0")
        self._check(self.rate_bps, header + overhead)
        self.header_bytes, self.link_overhead = header, overhead
        self.per_datagram = header + overhead
        if self.rate_bps:
            self._set_burst()

    def _set_burst(self) -> None:
        """The bucket's depth: 10 ms at the cap, and at least two full datagrams."""
        self.burst = max(2 * self.wire_size(self.max_datagram),
                         self.bytes_per_second * BURST_SECONDS)

    def _check(self, rate_bps: int, per_datagram: int) -> None:
        minimum = minimum_rate(self.max_datagram, per_datagram)
        if 0 < rate_bps < minimum:
            raise ValueError(
                f"a cap of {rate_bps} bit/s is below one {self.max_datagram}-byte datagram"
                f" (+{per_datagram} bytes of headers and overhead) per second; the minimum"
                f" is {minimum} bit/s")

    def check_rate(self, rate_bps: int) -> None:
        """Raise ``ValueError`` if this gate would refuse ``rate_bps`` (changes nothing)."""
        if rate_bps < 0:
            raise ValueError("rate must be >= 0 (0 = uncapped)")
        self._check(rate_bps, self.per_datagram)

    def set_rate(self, rate_bps: int, now: float) -> None:
        self.check_rate(rate_bps)
        self.rate_bps = rate_bps
        self.bytes_per_second = rate_bps / 8
        self._set_burst()
        # A new cap starts with an empty bucket: a lowered cap takes effect at once.
        self._tokens = 0.0
        self._last = now

    @property
    def capped(self) -> bool:
        """Whether anything may hold a datagram: this gate's cap or its parent's."""
        return self.rate_bps > 0 or (self.parent is not None and self.parent.capped)

    @property
    def datagram_size(self) -> int:
        """The UDP payload size to send at: :func:`tiled_datagram` for this cap."""
        return tiled_datagram(self.rate_bps, self.max_datagram, self.per_datagram)

    @property
    def payload_bytes_per_second(self) -> float:
        """Payload rate of full-size datagrams under the cap (0 = uncapped)."""
        return payload_bytes_per_second(self.rate_bps, self.datagram_size, self.per_datagram)

    def wire_size(self, payload: int, datagrams: int = 1) -> int:
        """Bytes the link carries for ``datagrams`` datagrams of ``payload`` bytes in all."""
        return payload + datagrams * self.per_datagram

    # -- accounting --------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if now > self._last:
            refill = (now - self._last) * self.bytes_per_second
            self._tokens = min(self.burst, self._tokens + refill)
            self._last = now

    def _expire(self, now: float) -> None:
        sent = self._sent
        horizon = now - WINDOW - GUARD
        while sent and sent[0][0] <= horizon:
            _, wire, payload = sent.popleft()
            self._window_bytes -= wire
            self._window_payload -= payload

    def window_bytes(self, now: float) -> int:
        """Wire bytes (headers and overhead included) sent in the last second (and
        GUARD): the measured link rate, in bytes/s."""
        self._expire(now)
        return self._window_bytes

    def window_payload(self, now: float) -> int:
        """UDP payload bytes sent in the last second."""
        self._expire(now)
        return self._window_payload

    def _record(self, wire: int, payload: int, datagrams: int, now: float) -> None:
        self._sent.append((now, wire, payload))
        self._window_bytes += wire
        self._window_payload += payload
        self.total_bytes += wire
        self.total_payload += payload
        self.total_datagrams += datagrams

    def try_send(self, nbytes: int, now: float, datagrams: int = 1) -> bool:
        """Consume allowance for ``datagrams`` datagrams of ``nbytes`` payload bytes in
        all (one, when capped); ``False`` if it must wait."""
        wire = self.wire_size(nbytes, datagrams)
        parent = self.parent
        if not self._allows(wire, now) or (parent is not None
                                           and not parent._allows(wire, now)):
            self.held += 1
            return False
        self._take(wire, nbytes, datagrams, now)
        if parent is not None:
            parent._take(wire, nbytes, datagrams, now)
        return True

    def _allows(self, wire: int, now: float) -> bool:
        """Whether this gate's own cap lets ``wire`` bytes leave now."""
        if self.rate_bps <= 0:
            return True
        self._refill(now)
        self._expire(now)
        return not (self._tokens + EPSILON < wire
                    or self._window_bytes + wire > self.bytes_per_second)

    def _take(self, wire: int, nbytes: int, datagrams: int, now: float) -> None:
        if self.rate_bps > 0:
            self._tokens -= wire
        self._record(wire, nbytes, datagrams, now)

    def ready_at(self, nbytes: int, now: float) -> float:
        """The earliest time ``try_send(nbytes)`` can succeed (``now`` if it can now)."""
        at = self._own_ready_at(self.wire_size(nbytes), now)
        if self.parent is not None:
            at = max(at, self.parent._own_ready_at(self.wire_size(nbytes), now))
        return at

    def _own_ready_at(self, wire: int, now: float) -> float:
        if self.rate_bps <= 0:
            return now
        self._refill(now)
        self._expire(now)
        at = now
        if self._tokens < wire:
            at = now + (wire - self._tokens) / self.bytes_per_second
        excess = self._window_bytes + wire - self.bytes_per_second
        if excess > 0:
            freed = 0
            for when, size, _ in self._sent:
                freed += size
                if freed >= excess:
                    at = max(at, when + WINDOW + GUARD)
                    break
            else:
                at = math.inf  # a datagram larger than one second's allotment
        return at if at == now else at + 1e-9  # float slack: at `at`, try_send succeeds
