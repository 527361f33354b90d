"""The rate cap and the DRR feed, on explicit time and Trio's mock clock."""

from __future__ import annotations

import random

import trio

from quelay.scheduler import FeedScheduler, feed_budget
from quelay.transport.pacing import tick_interval

MDS = 1350
DRAIN_STEP = 0.002  # seconds between the fake QUIC's drains


def test_budget_never_exceeded_per_tick() -> None:
    feed = FeedScheduler()
    rng = random.Random(1)
    keys = [feed.add(rng.randint(0, 15)) for _ in range(20)]
    for _ in range(500):
        for key in keys:
            feed.take(key, 0, rng.randint(0, 100_000))
        budget = rng.randint(0, 50_000)
        grants = feed.allocate(budget)
        assert sum(n for _, n in grants) <= budget
        assert feed.has_demand() == (feed.drr.active_count() > 0)  # the mirror holds
        for key in keys:  # pumps use what they were granted
            while feed.take(key, 1 << 30):
                pass


def test_feed_budget_targets_a_small_backlog() -> None:
    interval = tick_interval(2_000_000)
    full = feed_budget(2_000_000, interval, 0, 0, 1 << 23)
    assert full == max(2 * MDS, int(2_000_000 / 8 * interval * 2))
    assert feed_budget(2_000_000, interval, full, 0, 1 << 23) == 0  # QUIC still holds it
    assert feed_budget(0, 0.005, 100, 50, 1000) == 850  # uncapped: same path, bigger target


async def drive(feed: FeedScheduler, demands: dict[int, float], seconds: float,
                rate: int, active: dict[int, bool] | None = None) -> dict[int, int]:
    """Pumps that always have data, and a fake QUIC draining at the cap."""
    sent = dict.fromkeys(demands, 0)
    unsent = {"bytes": 0}
    feed.rate_bps = rate

    async def pump(key: int) -> None:
        while True:
            if active is not None and not active[key]:
                feed.idle(key)
                await trio.sleep(0.01)
                continue
            n = await feed.acquire(key, 16 * 1024, 1 << 30)
            sent[key] += n
            unsent["bytes"] += n

    async def drain() -> None:  # in 2 ms steps: finer than the scheduler's ticks (>= 5 ms)
        per_step = rate / 8 * DRAIN_STEP
        while True:
            await trio.sleep(DRAIN_STEP)
            unsent["bytes"] = max(0, unsent["bytes"] - int(per_step))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, lambda: unsent["bytes"])
        nursery.start_soon(drain)
        for key in demands:
            nursery.start_soon(pump, key)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return sent


async def test_equal_priorities_share_equally(autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    keys = [feed.add(4) for _ in range(4)]
    sent = await drive(feed, dict.fromkeys(keys, 1.0), 20.0, 2_000_000)
    mean = sum(sent.values()) / 4
    assert all(abs(v - mean) <= 0.05 * mean for v in sent.values()), sent
    # And the feed as a whole tracks the cap (fed ≈ drained, not more).
    assert sum(sent.values()) <= 2_000_000 / 8 * 20.0 * 1.02


async def test_priorities_give_weighted_shares(autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    priorities = {feed.add(p): p for p in (0, 1, 3, 7)}
    sent = await drive(feed, dict.fromkeys(priorities, 1.0), 30.0, 4_000_000)
    total = sum(sent.values())
    weights = sum(p + 1 for p in priorities.values())
    for key, p in priorities.items():
        expected = total * (p + 1) / weights
        assert abs(sent[key] - expected) <= 0.10 * expected, (p, sent[key], expected)


async def test_idle_stream_does_not_bank_credit(autojump_clock: trio.testing.MockClock) -> None:
    feed = FeedScheduler()
    a, b = feed.add(4), feed.add(4)
    active = {a: True, b: False}
    await drive(feed, {a: 1.0, b: 1.0}, 5.0, 1_000_000, active)
    assert feed.drr.deficit(b) == 0
    active[b] = True
    sent = await drive(feed, {a: 1.0, b: 1.0}, 5.0, 1_000_000, active)
    # Having been idle for 5 s gives b no more than its equal share afterwards.
    assert sent[b] <= sent[a] * 1.05 + feed.drr.quantum(b)
