"""Sans-IO link impairment model: datagrams and a clock in, due times out.

No sockets and no clock of its own: every call takes ``now`` (seconds, any
monotonic base such as ``trio.current_time()``), so tests drive it with
explicit times and the proxy with Trio's clock (MockClock included). All
randomness comes from seeded :class:`random.Random` instances, one per
direction, so a run is reproducible from its seed and the order in which
datagrams arrive.

Per direction, a datagram goes through, in order:

1. outage check (at arrival; :class:`LinkModel` only) -> ``dropped_outage``
2. duplication: with probability ``duplicate`` a second copy follows the
   original through the rest of the path (it uses link capacity, like a
   link-layer retransmission would)
3. in-flight bound (memory guard for the delay line) -> ``dropped_overflow``
4. bottleneck: a virtual drop-tail queue serialised at ``rate_bps``;
   a datagram that would push the backlog over the limit -> ``dropped_queue``
   (a datagram arriving at an empty queue is always accepted)
5. loss (on the air, after using capacity) -> ``dropped_loss``
6. corruption: one random byte XORed with a non-zero value
7. delay + jitter -> due time (FIFO unless ``reorder``)

Then, when the due time comes, :meth:`LinkModel.deliver` drops the datagram
if an outage is on by then (it was in flight when the link went down) and
otherwise counts it as forwarded, in the counters and the 100-ms histogram.

Invariant, per direction: ``datagrams_in + duplicated == datagrams_forwarded
+ dropped + in_flight_datagrams``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .profiles import DirectionParams, Profile

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, Direction] = ("up", "down")
BIN_S = 0.1
"""Histogram bin width (seconds)."""

Delivery = tuple[float, bytes]
HistogramKey = Literal["up", "down", "up_in", "down_in"]
HISTOGRAM_KEYS: tuple[HistogramKey, ...] = ("up", "down", "up_in", "down_in")


@dataclass
class DirectionStats:
    """Counters for one direction (datagrams unless named ``*bytes*``).

    ``bytes_*`` count UDP payload; ``wire_bytes_*`` what the link carries: payload
    plus the per-datagram IP+UDP headers and link overhead the model was given.
    """

    datagrams_in: int = 0
    bytes_in: int = 0
    wire_bytes_in: int = 0
    datagrams_forwarded: int = 0
    bytes_forwarded: int = 0
    wire_bytes_forwarded: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_outage: int = 0
    dropped_overflow: int = 0
    duplicated: int = 0
    corrupted: int = 0
    in_flight_datagrams: int = 0
    in_flight_bytes: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_loss + self.dropped_queue + self.dropped_outage + self.dropped_overflow

    def to_dict(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d["dropped"] = self.dropped
        return d


class DirectionModel:
    """One direction: bottleneck queue, loss, corruption, duplication, delay, jitter.

    :meth:`submit` returns the deliveries ``(due, data)`` for one arriving
    datagram (none if dropped, two if duplicated). Every returned delivery
    stays "in flight" until :meth:`release` is called for it (the
    :class:`LinkModel` does that in :meth:`LinkModel.deliver`).
    """

    def __init__(
        self,
        params: DirectionParams,
        rng: random.Random,
        *,
        overhead_bytes: int = 0,
        stats: DirectionStats | None = None,
    ) -> None:
        self.params = params
        self.rng = rng
        self.overhead_bytes = overhead_bytes
        self.stats = stats if stats is not None else DirectionStats()
        # seconds per byte on the bottleneck; 0 = unlimited
        self._byte_time = 8.0 / params.rate_bps if params.rate_bps else 0.0
        self._queue_limit = params.queue_limit
        self._busy_until = -math.inf
        self._last_due = -math.inf

    def backlog_bytes(self, now: float) -> float:
        """Bytes (with overhead) waiting in or being serialised by the bottleneck at ``now``."""
        if not self._byte_time or self._busy_until <= now:
            return 0.0
        return (self._busy_until - now) / self._byte_time

    def submit(self, data: bytes, now: float) -> list[Delivery]:
        st = self.stats
        st.datagrams_in += 1
        st.bytes_in += len(data)
        st.wire_bytes_in += len(data) + self.overhead_bytes
        p = self.params
        copies = 1
        if p.duplicate and self.rng.random() < p.duplicate:
            copies = 2
            st.duplicated += 1
        out: list[Delivery] = []
        for _ in range(copies):
            delivery = self._transmit(data, now)
            if delivery is not None:
                out.append(delivery)
        return out

    def release(self, size: int) -> None:
        """A delivery of ``size`` payload bytes left the delay line (sent or dropped)."""
        self.stats.in_flight_datagrams -= 1
        self.stats.in_flight_bytes -= size

    def _transmit(self, data: bytes, now: float) -> Delivery | None:
        p, st, rng = self.params, self.stats, self.rng
        if st.in_flight_bytes + len(data) > p.max_in_flight_bytes:
            st.dropped_overflow += 1
            return None
        if self._byte_time:
            start = now if self._busy_until <= now else self._busy_until
            backlog = (start - now) / self._byte_time
            size = len(data) + self.overhead_bytes
            limit = self._queue_limit
            if backlog > 1e-6 and limit is not None and backlog + size > limit + 1e-6:
                st.dropped_queue += 1
                return None
            depart = start + size * self._byte_time
            self._busy_until = depart
        else:
            depart = now
        if p.loss and rng.random() < p.loss:
            st.dropped_loss += 1
            return None
        if p.corrupt and data and rng.random() < p.corrupt:
            buf = bytearray(data)
            buf[rng.randrange(len(buf))] ^= rng.randrange(1, 256)
            data = bytes(buf)
            st.corrupted += 1
        due = depart + p.delay_s
        if p.jitter_s:
            if p.jitter_dist == "normal":
                j = min(3 * p.jitter_s, max(-3 * p.jitter_s, rng.gauss(0.0, p.jitter_s)))
            else:
                j = rng.uniform(-p.jitter_s, p.jitter_s)
            due = max(depart, due + j)
        if not p.reorder:
            if due < self._last_due:
                due = self._last_due
            self._last_due = due
        st.in_flight_datagrams += 1
        st.in_flight_bytes += len(data)
        return due, data


class LinkModel:
    """Both directions, outages (scheduled and manual), counters and histogram.

    ``start`` is the time origin for the outage schedule and the histogram.
    ``outages`` are ``(start_s, duration_s)`` relative to ``start``.
    ``seed=None`` picks a random seed (kept in :attr:`seed` for replay).
    ``header_bytes`` are the IP+UDP headers of every datagram (28 IPv4, 48 IPv6;
    the proxy sets them from its socket's family, the sans-IO default is 0):
    with the profile's ``overhead_bytes`` they are counted per datagram in the
    bottleneck, the ``wire_bytes_*`` counters and the histogram.
    ``trace=True`` keeps every datagram's fate in :attr:`events` as
    ``(t, direction, event, size)``, ``t`` relative to ``start``, event one of
    ``in`` / ``drop`` / ``out`` (for tests that count, rather than time, what
    happened around an outage).
    """

    def __init__(
        self,
        profile: Profile,
        *,
        seed: int | None = 0,
        start: float = 0.0,
        outages: Iterable[tuple[float, float]] = (),
        header_bytes: int = 0,
        trace: bool = False,
    ) -> None:
        if header_bytes < 0:
            raise ValueError("header_bytes must be >= 0")
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        self.profile = profile
        self.seed = seed
        self.start = start
        self.outages = sorted((float(s), float(d)) for s, d in outages)
        for s, d in self.outages:
            if s < 0 or d < 0:
                raise ValueError(f"outage start and duration must be >= 0, got {(s, d)}")
        self.header_bytes = header_bytes
        per_datagram = header_bytes + profile.overhead_bytes
        self.up = DirectionModel(profile.up, random.Random(f"quelay-linksim/{seed}/up"),
                                 overhead_bytes=per_datagram)
        self.down = DirectionModel(profile.down, random.Random(f"quelay-linksim/{seed}/down"),
                                   overhead_bytes=per_datagram)
        self.events: list[tuple[float, Direction, str, int]] | None = [] if trace else None
        self.manual_outage = False
        self.toggles: list[tuple[float, bool]] = []
        # bin index -> [up forwarded, down forwarded, up in, down in] (bytes incl. overhead)
        self._bins: dict[int, list[int]] = {}

    def direction(self, direction: Direction) -> DirectionModel:
        return self.up if direction == "up" else self.down

    # --- outages ------------------------------------------------------------

    def scheduled_outage(self, now: float) -> bool:
        t = now - self.start
        return any(s <= t < s + d for s, d in self.outages)

    def outage_active(self, now: float) -> bool:
        return self.manual_outage or (bool(self.outages) and self.scheduled_outage(now))

    def set_outage(self, on: bool, now: float) -> None:
        """Turn the manual outage on/off (scheduled outages apply regardless)."""
        if on != self.manual_outage:
            self.manual_outage = on
            self.toggles.append((now - self.start, on))

    # --- datagrams ----------------------------------------------------------

    def _bin(self, now: float) -> list[int]:
        i = max(0, int((now - self.start) / BIN_S))
        b = self._bins.get(i)
        if b is None:
            b = self._bins[i] = [0, 0, 0, 0]
        return b

    def submit(self, direction: Direction, data: bytes, now: float) -> list[Delivery]:
        """A datagram arrives; returns ``(due, data)`` deliveries (empty if dropped)."""
        dm = self.up if direction == "up" else self.down
        self._bin(now)[2 if direction == "up" else 3] += len(data) + dm.overhead_bytes
        if self.events is not None:
            self.events.append((now - self.start, direction, "in", len(data)))
        if self.outage_active(now):
            st = dm.stats
            st.datagrams_in += 1
            st.bytes_in += len(data)
            st.wire_bytes_in += len(data) + dm.overhead_bytes
            st.dropped_outage += 1
            if self.events is not None:
                self.events.append((now - self.start, direction, "drop", len(data)))
            return []
        return dm.submit(data, now)

    def deliver(self, direction: Direction, size: int, now: float) -> bool:
        """A delivery of ``size`` payload bytes is due at ``now``; False = drop it (outage)."""
        dm = self.up if direction == "up" else self.down
        dm.release(size)
        st = dm.stats
        if self.outage_active(now):
            st.dropped_outage += 1
            if self.events is not None:
                self.events.append((now - self.start, direction, "drop", size))
            return False
        st.datagrams_forwarded += 1
        st.bytes_forwarded += size
        st.wire_bytes_forwarded += size + dm.overhead_bytes
        self._bin(now)[0 if direction == "up" else 1] += size + dm.overhead_bytes
        if self.events is not None:
            self.events.append((now - self.start, direction, "out", size))
        return True

    def discard(self, direction: Direction, size: int) -> None:
        """A delivery was abandoned (e.g. its mapping closed): count it as overflow."""
        dm = self.direction(direction)
        dm.release(size)
        dm.stats.dropped_overflow += 1

    # --- export -------------------------------------------------------------

    def histogram(self) -> list[dict[str, Any]]:
        """Bytes per 100-ms bin since ``start``, gaps filled with zeros.

        ``up`` / ``down``: bytes forwarded (delivered out of the proxy);
        ``up_in`` / ``down_in``: bytes received from the sender. Sizes are
        what the link carries: payload plus ``header_bytes`` and the profile's
        ``overhead_bytes`` per datagram.
        """
        if not self._bins:
            return []
        out = []
        for i in range(max(self._bins) + 1):
            row: dict[str, Any] = {"t": round(i * BIN_S, 3)}
            row.update(zip(HISTOGRAM_KEYS, self._bins.get(i, (0, 0, 0, 0)), strict=True))
            out.append(row)
        return out

    def histogram_json(self) -> str:
        return json.dumps(self.histogram())

    def peak_bytes(self, key: HistogramKey, window_s: float = 1.0) -> int:
        """Most bytes of histogram column ``key`` in any window of whole bins.

        Windows are aligned to the 100-ms bins, so the true peak over
        arbitrary windows of ``window_s`` lies between this and the value for
        ``window_s + BIN_S``. To check a sender's rate cap use ``up_in`` /
        ``down_in`` (what it put on the wire); ``up`` / ``down`` are shaped by
        the simulated link.
        """
        col = HISTOGRAM_KEYS.index(key)
        n = max(1, round(window_s / BIN_S))
        if not self._bins:
            return 0
        values = [self._bins.get(i, (0, 0, 0, 0))[col] for i in range(max(self._bins) + 1)]
        total = best = sum(values[:n])
        for i in range(n, len(values)):
            total += values[i] - values[i - n]
            best = max(best, total)
        return best

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything worth keeping after a run, JSON-serialisable."""
        return {
            "profile": self.profile.name,
            "params": {"up": dataclasses.asdict(self.profile.up),
                       "down": dataclasses.asdict(self.profile.down),
                       "overhead_bytes": self.profile.overhead_bytes,
                       "header_bytes": self.header_bytes},
            "seed": self.seed,
            "elapsed_s": round(now - self.start, 6),
            "outage": self.outage_active(now),
            "outage_schedule": [list(o) for o in self.outages],
            "outage_toggles": [{"t": round(t, 6), "on": on} for t, on in self.toggles],
            "up": self.up.stats.to_dict(),
            "down": self.down.stats.to_dict(),
            "bin_s": BIN_S,
            "histogram": self.histogram(),
        }
