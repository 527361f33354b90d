"""The Trio side of the feed: the ticker task and the pumps' wait for a grant.

All decisions (weights, quanta, budgets, who is next) are in the sans-IO
:class:`quelay.core.feed.Feed`; this wrapper adds only the waiting:

* :meth:`FeedScheduler.acquire` parks a pump until its transfer is granted
  bytes;
* :meth:`FeedScheduler.run` is the ticker. While some transfer has bytes
  ready it ticks every :func:`~quelay.transport.pacing.tick_interval`; with
  no demand it **parks** (no timer at all) until a pump declares bytes, and
  then ticks at once, so a new transfer's first grant does not wait for a
  timer. With demand but no link it polls at most every
  :data:`LINK_POLL` seconds (a pump of the next session wakes it sooner).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from .core.feed import BASE_QUANTUM, Feed, base_quantum, feed_budget, weight

__all__ = ["BASE_QUANTUM", "FeedScheduler", "LINK_POLL", "base_quantum", "feed_budget",
           "weight"]

LINK_POLL = 1.0  # with demand but no link: look again this often (no faster than keepalive)


class FeedScheduler(Feed):
    def __init__(self, base_quantum: int | None = None) -> None:
        super().__init__(base_quantum)
        self._waiting: dict[int, trio.Event] = {}  # key -> its parked pump's wake-up
        self._wake = trio.Event()
        self._parked = False
        self.wakeups = 0  # times the ticker woke up (counted, for tests and status)
        # Told when a transfer waits for a grant (a hub re-divides its total cap when a
        # link that was idle has bytes again).
        self.on_demand: Callable[[], None] | None = None

    # -- hooks from the sans-IO feed --------------------------------------------------------

    def granted(self, keys: Iterable[int]) -> None:
        for key in keys:
            event = self._waiting.pop(key, None)
            if event is not None:
                event.set()

    def demand(self) -> None:
        # Capped and ticking, demand waits for the next tick (the tick interval is what
        # spreads the budget); parked or uncapped, it need not wait at all.
        if self._parked or self.rate_bps == 0:
            self._wake.set()
        if self.on_demand is not None:
            self.on_demand()

    # -- the Trio API ------------------------------------------------------------------------

    async def acquire(self, key: int, want: int, backlog: int | None = None) -> int:
        """Wait until ``key`` may hand at least one byte to QUIC; return how many (<= want).

        ``backlog`` is everything the transfer has ready (≥ want), so one grant can
        cover many chunks.
        """
        while True:
            if key not in self:
                raise trio.ClosedResourceError("transfer left the scheduler")
            nbytes = self.take(key, want, backlog)
            if nbytes:
                return nbytes
            event = self._waiting.get(key)
            if event is None:
                event = self._waiting[key] = trio.Event()
            await event.wait()

    def wake(self) -> None:
        """Run the next tick now (the cap changed, a link came up, or demand appeared)."""
        self._wake.set()

    async def run(self, unsent: Callable[[], int | None]) -> None:
        """The ticker: grant the budget every interval while there is demand; ``unsent``
        returns the bulk bytes QUIC holds, None = no link."""
        no_link = False
        while True:
            if not self.has_demand():
                self._parked = True
                try:
                    await self._wake.wait()
                finally:
                    self._parked = False
            else:
                with trio.move_on_after(LINK_POLL if no_link else self.interval()):
                    self._parked = no_link
                    try:
                        await self._wake.wait()
                    finally:
                        self._parked = False
            self._wake = trio.Event()
            self.wakeups += 1
            backlog = unsent()
            no_link = backlog is None
            self.tick(backlog)
