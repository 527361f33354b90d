"""Who may hand how many bytes to QUIC next: DRR by priority, paced by the cap.

The wire gate (:mod:`quelay.transport.pacing`) holds the cap for every byte;
this scheduler decides *whose* bytes those are. Each tick the agent computes a
feed budget — enough to keep a small backlog of unsent bytes in QUIC (two
ticks at the cap, or a large fixed backlog when uncapped) — and the native
DRR table splits it among the outbound transfers that have bytes ready:
quantum ∝ priority + 1, idle transfers lose their deficit, none starves.
Control messages never pass through here: they are sent at once, ahead of
all bulk data.

``FeedScheduler`` is sans-IO (budgets in, grants out); ``acquire`` is the
one awaitable, used by pumps to wait for their grant.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import trio

from .native import DrrTable
from .transport.pacing import tick_interval

BASE_QUANTUM = 16 * 1024
MIN_TARGET = 4 * 1350


def feed_budget(rate_bps: int, interval: float, unsent: int, outstanding: int,
                uncapped_target: int) -> int:
    """Bytes to grant this tick so QUIC holds about the target of unsent data."""
    capped = max(MIN_TARGET, int(rate_bps / 8 * interval * 2))
    target = capped if rate_bps > 0 else uncapped_target
    return max(0, target - unsent - outstanding)


class FeedScheduler:
    def __init__(self, base_quantum: int = BASE_QUANTUM) -> None:
        self.drr = DrrTable(base_quantum)
        self._keys = itertools.count(1)
        self._grants: dict[int, int] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self.rate_bps = 0  # the operator's cap; 0 = uncapped
        self.uncapped_target = 8 * 1024 * 1024
        self.max_datagram = 1350
        self._wake = trio.Event()

    @property
    def outstanding(self) -> int:
        """Granted bytes that pumps have not taken yet."""
        return sum(self._grants.values())

    def add(self, priority: int) -> int:
        key = next(self._keys)
        self.drr.add(key, priority)
        self._grants[key] = 0
        return key

    def remove(self, key: int) -> None:
        if key in self._grants:
            del self._grants[key]
            self.drr.remove(key)
            self._lot.unpark_all()

    def set_priority(self, key: int, priority: int) -> None:
        self.drr.set_priority(key, priority)

    def allocate(self, budget: int) -> list[tuple[int, int]]:
        """Split one tick's budget among transfers with demand (never more than ``budget``)."""
        grants = self.drr.schedule(budget) if budget > 0 else []
        for key, nbytes in grants:
            self._grants[key] += nbytes
        if grants:
            self._lot.unpark_all()
        return grants

    def take(self, key: int, want: int, backlog: int | None = None) -> int:
        """Use up to ``want`` granted bytes; 0 means none yet, and declares ``backlog``."""
        granted = self._grants.get(key, 0)
        if granted == 0:
            self.drr.set_backlog(key, max(want, backlog or 0))
            if self.rate_bps == 0:
                # Uncapped, a waiting transfer need not wait for the next tick; capped,
                # the tick interval is what spreads the budget, so demand waits for it.
                self._wake.set()
            return 0
        nbytes = min(granted, want)
        self._grants[key] = granted - nbytes
        return nbytes

    def idle(self, key: int) -> None:
        """The transfer has nothing ready: it leaves the rotation and banks no credit."""
        if key in self._grants:
            self._grants[key] = 0
            self.drr.set_backlog(key, 0)

    async def acquire(self, key: int, want: int, backlog: int | None = None) -> int:
        """Wait until ``key`` may hand at least one byte to QUIC; return how many (<= want).

        ``backlog`` is everything the transfer has ready (≥ want), so one grant can
        cover many chunks.
        """
        while True:
            if key not in self._grants:
                raise trio.ClosedResourceError("transfer left the scheduler")
            nbytes = self.take(key, want, backlog)
            if nbytes:
                return nbytes
            await self._lot.park()

    def wake(self) -> None:
        """Run the next tick now (the cap changed, or demand appeared uncapped)."""
        self._wake.set()

    async def run(self, unsent: Callable[[], int | None]) -> None:
        """The ticker: every interval, grant the budget; ``unsent`` None = no link."""
        while True:
            interval = tick_interval(self.rate_bps, self.max_datagram)
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            backlog = unsent()
            if backlog is None:
                continue
            self.allocate(feed_budget(self.rate_bps, interval, backlog, self.outstanding,
                                      self.uncapped_target))

    def release(self) -> None:
        self.drr.release()
