"""The feed at 100 kbit/s on Trio's mock clock: shares, first-grant latency, parking.

Everything asserted is counted (bytes granted, ticker wake-ups, mock-clock
times of grants), never measured wall-clock time.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable

import pytest
import trio
import trio.testing

from quelay.core.feed import Feed, base_quantum, feed_budget, weight
from quelay.scheduler import LINK_POLL, FeedScheduler
from quelay.transport.pacing import tick_interval

MDS = 1350
RATE = 100_000  # bit/s: the BLOS uplink
CHUNK = 64 * 1024


def test_core_feed_imports_no_trio_and_no_socket() -> None:
    code = ("import sys, quelay.core.feed; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'socket')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantum_follows_the_cap() -> None:
    assert base_quantum(100_000, MDS) == MDS  # 20 ms would be 250 B: one datagram at least
    assert base_quantum(2_000_000, MDS) == 5000  # 20 ms at 2 Mbit/s
    assert base_quantum(50_000_000, MDS) == 125_000
    assert base_quantum(0, MDS) == 16 * 1024  # uncapped
    assert base_quantum(100_000, MDS, lightest=5) == 270  # 5 × 270 = one datagram
    assert base_quantum(100_000, MDS, lightest=16) == 85  # ceil: 16 × 85 >= 1350
    feed = FeedScheduler()
    key = feed.add(4)
    assert feed.drr.quantum(key) == 16 * 1024 * weight(4)
    feed.rate_bps = RATE
    assert feed.drr.quantum(key) == MDS * 5
    # With data, the lightest transfer's quantum is the unit: here, one datagram.
    assert feed.take(key, 1000, 100_000) == 0
    assert feed.drr.quantum(key) == MDS
    heavy = feed.add(15)
    assert feed.take(heavy, 1000, 100_000) == 0
    assert (feed.drr.quantum(key), feed.drr.quantum(heavy)) == (MDS, 16 * 270)
    light = feed.add(0)
    assert feed.take(light, 1000, 100_000) == 0
    assert [feed.drr.quantum(k) for k in (light, key, heavy)] == [MDS, 5 * MDS, 16 * MDS]
    feed.idle(light)
    assert feed.drr.quantum(key) == MDS
    feed.rate_bps = 10_000_000
    assert feed.drr.quantum(key) == 25_000  # 20 ms at 10 Mbit/s
    feed.max_datagram = 1200
    feed.rate_bps = RATE
    assert feed.drr.quantum(key) == 1200
    feed.set_priority(key, 0)
    assert (feed.drr.quantum(key), feed.drr.quantum(heavy)) == (1200, 16 * 1200)


def test_weight_rule() -> None:
    assert [weight(p) for p in (0, 4, 15)] == [1, 5, 16]


def test_budget_keeps_two_datagrams_or_two_ticks() -> None:
    interval = tick_interval(RATE, MDS)
    assert feed_budget(RATE, interval, 0, 0, 1 << 23, MDS) == 2 * MDS
    assert feed_budget(RATE, interval, 2 * MDS, 0, 1 << 23, MDS) == 0
    big = 20_000_000
    assert feed_budget(big, tick_interval(big), 0, 0, 1 << 23) == int(big / 8 * 0.005 * 2)
    assert feed_budget(0, 0.005, 100, 50, 1000) == 850  # uncapped: a large fixed target


class FakeQuic:
    """Bytes handed to QUIC drain at the cap (payload rate of full datagrams)."""

    def __init__(self, rate: int) -> None:
        self.unsent = 0
        self.per_second = rate / 8 * MDS / (MDS + 28)
        self.link = True

    def read(self) -> int | None:
        return self.unsent if self.link else None

    async def drain(self) -> None:
        step = 0.01
        while True:
            await trio.sleep(step)
            self.unsent = max(0, self.unsent - int(self.per_second * step))


class Pump:
    """A file pump as the session runs it: acquire, hand to QUIC, until the end."""

    def __init__(self, feed: FeedScheduler, quic: FakeQuic, priority: int, size: int) -> None:
        self.feed, self.quic, self.size = feed, quic, size
        self.key = feed.add(priority)
        self.sent = 0
        self.grants: list[tuple[float, int]] = []

    async def run(self) -> None:
        while self.sent < self.size:
            remaining = self.size - self.sent
            n = await self.feed.acquire(self.key, min(CHUNK, remaining), remaining)
            self.grants.append((trio.current_time(), n))
            self.sent += n
            self.quic.unsent += n

    def bytes_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in self.grants if t0 <= t < t1)


async def test_four_equal_streams_share_within_5_percent(
        autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    feed.rate_bps = RATE
    quic = FakeQuic(RATE)
    pumps = [Pump(feed, quic, 4, 1 << 40) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, quic.read)
        nursery.start_soon(quic.drain)
        for p in pumps:
            nursery.start_soon(p.run)
        await trio.sleep(17.0)
        nursery.cancel_scope.cancel()
    shares = [p.bytes_between(2.0, 17.0) for p in pumps]  # 15 s after a 2 s warm-up
    mean = sum(shares) / 4
    assert all(abs(s - mean) <= 0.05 * mean for s in shares), shares
    # Together they track the cap: granted ≈ what the link drains, not more.
    assert sum(shares) <= quic.per_second * 15.0 * 1.03


async def test_priorities_weight_bandwidth_and_nothing_starves(
        autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    feed.rate_bps = RATE
    quic = FakeQuic(RATE)
    pumps = {p: Pump(feed, quic, p, 1 << 40) for p in (0, 4, 15)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, quic.read)
        nursery.start_soon(quic.drain)
        for p in pumps.values():
            nursery.start_soon(p.run)
        await trio.sleep(62.0)
        nursery.cancel_scope.cancel()
    got = {prio: p.bytes_between(2.0, 62.0) for prio, p in pumps.items()}
    total = sum(got.values())
    weights = sum(weight(prio) for prio in got)
    for prio, n in got.items():
        expected = total * weight(prio) / weights
        assert abs(n - expected) <= 0.10 * expected, (prio, n, expected)
    assert got[0] > 0  # the lowest priority is not starved by the highest


@pytest.mark.parametrize(("bulk_prio", "small_prio"), [(4, 4), (4, 8), (15, 0)])
async def test_new_transfer_first_grant_at_the_next_tick(
        autojump_clock: trio.testing.MockClock, bulk_prio: int, small_prio: int) -> None:
    feed = FeedScheduler()
    feed.rate_bps = RATE
    quic = FakeQuic(RATE)
    bulk = Pump(feed, quic, bulk_prio, 1 << 40)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, quic.read)
        nursery.start_soon(quic.drain)
        nursery.start_soon(bulk.run)
        await trio.sleep(10.0)  # bulk is deep into a visit: the link is full
        small = Pump(feed, quic, small_prio, 5 * 1024)
        start = trio.current_time()
        nursery.start_soon(small.run)
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    assert small.sent == 5 * 1024
    first = small.grants[0][0] - start
    assert first <= tick_interval(RATE, MDS) + 1e-9, first
    done = small.grants[-1][0] - start
    # From the first tick on the small transfer gets its weighted share: all of it is in
    # QUIC within its size at that share, plus one round of the quanta.
    share = weight(small_prio) / (weight(small_prio) + weight(bulk_prio))
    lightest = min(weight(small_prio), weight(bulk_prio))
    round_bytes = MDS * (weight(small_prio) + weight(bulk_prio)) / lightest
    limit = (5 * 1024 / share + round_bytes) / quic.per_second
    assert done <= limit, (done, limit)
    if small_prio >= bulk_prio:
        assert done <= 1.0, done  # 5 KB is ~0.4 s of the whole link


async def test_ticker_parks_without_demand(autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    feed.rate_bps = RATE
    quic = FakeQuic(RATE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, quic.read)
        nursery.start_soon(quic.drain)
        await trio.sleep(60.0)
        assert (feed.wakeups, feed.ticks) == (0, 0)  # nothing to feed: no tick at all
        stream = feed.add(4)
        feed.idle(stream)  # an open stream with nothing written
        await trio.sleep(60.0)
        assert (feed.wakeups, feed.ticks) == (0, 0)
        # Demand appears: the parked ticker grants at once, not after a timer.
        small = Pump(feed, quic, 4, 5 * 1024)
        start = trio.current_time()
        nursery.start_soon(small.run)
        await trio.sleep(5.0)
        assert small.sent == 5 * 1024
        assert small.grants[0][0] == start
        busy = feed.wakeups
        assert busy > 0
        # Everything granted and taken: the ticker parks again.
        await trio.sleep(60.0)
        assert feed.wakeups == busy
        nursery.cancel_scope.cancel()


async def test_ticker_polls_slowly_with_demand_but_no_link(
        autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    feed.rate_bps = 2_000_000  # 10.8-ms ticks while the link is up
    quic = FakeQuic(2_000_000)
    quic.link = False
    bulk = Pump(feed, quic, 4, 1 << 40)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, quic.read)
        nursery.start_soon(bulk.run)
        await trio.sleep(30.0)
        assert feed.wakeups <= 30.0 / LINK_POLL + 2
        assert bulk.sent == 0
        quic.link = True
        nursery.start_soon(quic.drain)
        feed.wake()  # what the agent does when a session comes up
        await trio.sleep(0.1)
        assert bulk.sent > 0
        nursery.cancel_scope.cancel()


def test_sans_io_feed_without_a_driver() -> None:
    """The core alone: budgets in, grants out, demand and grant hooks called."""
    calls: list[str] = []

    class Probe(Feed):
        def granted(self, keys: Iterable[int]) -> None:
            calls.append("granted")

        def demand(self) -> None:
            calls.append("demand")

    feed = Probe()
    feed.rate_bps = RATE
    a, b = feed.add(4), feed.add(4)
    assert not feed.has_demand()
    assert feed.tick(0) == [] and feed.ticks == 1
    assert feed.take(a, 1000, 10_000) == 0 and calls == ["demand"]
    assert feed.has_demand()
    assert feed.tick(None) == [] and feed.ticks == 1  # no link: no tick
    assert feed.tick(0) == [(a, 2 * MDS)]
    assert calls[-1] == "granted" and feed.outstanding == 2 * MDS
    assert feed.take(a, 1000) == 1000 and feed.outstanding == 2 * MDS - 1000
    assert feed.take(b, 500, 500) == 0
    feed.remove(a)
    assert feed.outstanding == 0 and a not in feed
    assert feed.tick(0) == [(b, 500)]
    assert not feed.has_demand()
