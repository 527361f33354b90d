"""Who may hand how many bytes to QUIC next: DRR by priority, paced by the cap (sans-IO).

The wire gate (:mod:`quelay.transport.pacing`) holds the cap for every byte
the link carries; the feed decides *whose* bytes those are. Each tick the
driver (:mod:`quelay.scheduler`, the Trio side) asks :meth:`Feed.tick` for a
feed budget — enough to keep a small backlog of unsent bytes in QUIC (two
ticks at the cap but at least two datagrams, or a large fixed backlog when
uncapped) — and the native DRR table splits it among the outbound transfers
that have bytes ready. Control messages never pass through here: they are
sent at once, ahead of all bulk data.

The rules (docs/performance.md, "Latency under load"):

* **Weights.** A transfer of priority ``p`` (0–15) has weight ``p + 1``: while
  several transfers have data, each gets bandwidth in proportion to its
  weight (priority 15 gets 16× the share of priority 0). None starves: every
  transfer with data gets its quantum every round.
* **Quantum follows the cap.** The quantum of the lightest transfer with
  data is the bytes the cap carries in :data:`QUANTUM_SECONDS` (20 ms),
  never less than one datagram; every other transfer's quantum is that ×
  its weight ÷ the lightest weight (so the ratios are exactly the weights).
  At 100 kbit/s four equal transfers take one datagram each per round;
  at 2 Mbit/s, 5000 bytes (20 ms) each. Uncapped, the unit is 16 KiB.
* **A new transfer is served next.** Its first activation joins the DRR ring
  at the front (the visit it interrupts keeps its credit), so its first grant
  comes from the next tick; later activations join at the tail.
* **No demand, no ticks.** :meth:`Feed.has_demand` says whether any transfer
  has bytes waiting for a grant; the driver parks its ticker while it is
  false.

No trio, no sockets: time never enters here (the driver owns the clock), and
the two things the driver must react to are the hooks :meth:`Feed.granted`
(wake the pumps) and :meth:`Feed.demand` (wake the ticker).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable

from ..native import DrrTable
from ..transport.pacing import tick_interval

UNCAPPED_QUANTUM = 16 * 1024
BASE_QUANTUM = UNCAPPED_QUANTUM  # the base before a cap is known (compatibility name)
QUANTUM_SECONDS = 0.020  # link time at the cap that one unit of weight buys per round
MIN_TARGET_DATAGRAMS = 2
DEFAULT_MAX_DATAGRAM = 1350


def weight(priority: int) -> int:
    """Bandwidth weight of a priority: shares are proportional to ``priority + 1``."""
    return priority + 1


def base_quantum(rate_bps: int, max_datagram: int = DEFAULT_MAX_DATAGRAM,
                 lightest: int = 1) -> int:
    """DRR base quantum (a transfer's quantum is base × weight) for a cap, when the
    lightest transfer with data has weight ``lightest``: that transfer's quantum is
    :data:`QUANTUM_SECONDS` of link time at the cap and at least one datagram."""
    unit = UNCAPPED_QUANTUM if rate_bps <= 0 else max(max_datagram,
                                                        int(rate_bps / 8 * QUANTUM_SECONDS))
    return -(-unit // lightest)  # ceil: the lightest quantum is never below the unit


def feed_budget(rate_bps: int, interval: float, unsent: int, outstanding: int,
                uncapped_target: int, max_datagram: int = DEFAULT_MAX_DATAGRAM) -> int:
    """Bytes to grant this tick so QUIC holds about the target of unsent data."""
    capped = max(MIN_TARGET_DATAGRAMS * max_datagram, int(rate_bps / 8 * interval * 2))
    target = capped if rate_bps > 0 else uncapped_target
    return max(0, target - unsent - outstanding)


class Feed:
    """DRR grants for outbound transfers; budgets in, grants out."""

    def __init__(self, base: int | None = None) -> None:
        self._rate_bps = 0  # the operator's cap; 0 = uncapped
        self._max_datagram = DEFAULT_MAX_DATAGRAM
        self._fixed_base = base  # tests may pin the base quantum
        self.drr = DrrTable(base if base is not None else base_quantum(0))
        self._keys = itertools.count(1)
        self._grants: dict[int, int] = {}
        self._priority: dict[int, int] = {}
        # Mirror of the DRR ring (transfers whose declared backlog is not granted yet)
        # and the weights in it: the lightest one sets the base quantum.
        self._active: set[int] = set()
        self._active_weights: Counter[int] = Counter()
        self._lightest = 1
        self._outstanding = 0
        self.uncapped_target = 8 * 1024 * 1024
        self.ticks = 0  # ticks that computed a budget (counted, for tests and status)

    # -- configuration -----------------------------------------------------------------

    @property
    def rate_bps(self) -> int:
        return self._rate_bps

    @rate_bps.setter
    def rate_bps(self, rate_bps: int) -> None:
        self._rate_bps = rate_bps
        self._requantize()

    @property
    def max_datagram(self) -> int:
        return self._max_datagram

    @max_datagram.setter
    def max_datagram(self, size: int) -> None:
        self._max_datagram = size
        self._requantize()

    def _requantize(self) -> None:
        if self._fixed_base is None:
            self.drr.set_base_quantum(base_quantum(self._rate_bps, self._max_datagram,
                                                   self._lightest))

    def _activity(self, key: int, active: bool) -> None:
        """Keep the mirror of the ring; rebase the quanta when the lightest weight changes."""
        if active == (key in self._active):
            return
        w = weight(self._priority[key])
        if active:
            self._active.add(key)
            self._active_weights[w] += 1
        else:
            self._active.discard(key)
            self._active_weights[w] -= 1
            if not self._active_weights[w]:
                del self._active_weights[w]
        lightest = min(self._active_weights, default=self._lightest)
        if lightest != self._lightest:
            self._lightest = lightest
            self._requantize()

    def interval(self) -> float:
        """Seconds between ticks while there is demand."""
        return tick_interval(self._rate_bps, self._max_datagram)

    # -- transfers -----------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Granted bytes that pumps have not taken yet."""
        return self._outstanding

    def add(self, priority: int) -> int:
        key = next(self._keys)
        self.drr.add(key, priority)
        self._grants[key] = 0
        self._priority[key] = priority
        return key

    def remove(self, key: int) -> None:
        if key in self._grants:
            self._activity(key, False)
            self._outstanding -= self._grants.pop(key)
            del self._priority[key]
            self.drr.remove(key)
            self.granted((key,))

    def __contains__(self, key: object) -> bool:
        return key in self._grants

    def set_priority(self, key: int, priority: int) -> None:
        self.drr.set_priority(key, priority)
        active = key in self._active
        self._activity(key, False)
        self._priority[key] = priority
        self._activity(key, active)

    def has_demand(self) -> bool:
        """Some transfer has bytes ready and is waiting for a grant."""
        return bool(self._active)

    # -- the two halves of a grant -------------------------------------------------------

    def allocate(self, budget: int) -> list[tuple[int, int]]:
        """Split one tick's budget among transfers with demand (never more than ``budget``)."""
        grants = self.drr.schedule(budget) if budget > 0 else []
        for key, nbytes in grants:
            self._grants[key] += nbytes
            self._outstanding += nbytes
            if not self.drr.backlog(key):
                self._activity(key, False)  # all it declared is granted: out of the ring
        if grants:
            self.granted([key for key, _ in grants])
        return grants

    def tick(self, unsent: int | None) -> list[tuple[int, int]]:
        """One tick: ``unsent`` is the bulk QUIC still holds (None: no link, no grants)."""
        if unsent is None:
            return []
        self.ticks += 1
        return self.allocate(feed_budget(self._rate_bps, self.interval(), unsent,
                                         self._outstanding, self.uncapped_target,
                                         self._max_datagram))

    def take(self, key: int, want: int, backlog: int | None = None) -> int:
        """Use up to ``want`` granted bytes; 0 means none yet, and declares ``backlog``."""
        granted = self._grants.get(key, 0)
        if granted == 0:
            ready = max(want, backlog or 0)
            self.drr.set_backlog(key, ready)
            self._activity(key, ready > 0)
            if ready:
                self.demand()
            return 0
        nbytes = min(granted, want)
        self._grants[key] = granted - nbytes
        self._outstanding -= nbytes
        return nbytes

    def idle(self, key: int) -> None:
        """The transfer has nothing ready: it leaves the rotation and banks no credit."""
        if key in self._grants:
            self._outstanding -= self._grants[key]
            self._grants[key] = 0
            self.drr.set_backlog(key, 0)
            self._activity(key, False)

    # -- hooks for the driver --------------------------------------------------------------

    def granted(self, keys: Iterable[int]) -> None:
        """Grants changed for ``keys`` (new bytes granted, or the transfer left): wake
        their pumps (only theirs: a tick among a thousand streams wakes a few)."""

    def demand(self) -> None:
        """A transfer is waiting for a grant: the ticker must not stay parked."""

    def release(self) -> None:
        self.drr.release()
