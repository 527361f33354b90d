"""The pending queue (--max-concurrent), transfers requested while down, cancel in every state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from quelay.client import open_client
from quelay.linksim import CLEAN, open_linksim

from .conftest import make_file, wait_for
from .test_outages import start_via_sim

LINK = CLEAN.with_overrides(name="queue-test", rtt_s=0.01)


async def sim_down_at_start(upstream: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_linksim(upstream=upstream, profile=LINK, seed=1) as sim:
        task_status.started(sim)
        await trio.sleep_forever()


async def test_queue_orders_by_priority_then_fifo(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b, sim = await start_via_sim(nursery, tmp_path, sim_down_at_start, max_concurrent=1)
    # Take the link down and wait until the dialler knows it.
    sim.set_outage(True)
    await wait_for(lambda: b.link_state == "down")
    plan = [("low", 2), ("high-1", 7), ("mid", 4), ("high-2", 7), ("doomed", 4)]
    ids: dict[str, str] = {}
    started: list[str] = []
    queue_events: list[Any] = []

    async def watch() -> None:
        async with open_client(b.config.control) as client:
            await client.subscribe()
            async for event in client.events():
                if event["event"] == "transfer.started":
                    started.append(event["data"]["name"])
                elif event["event"] == "queue.status":
                    queue_events.append(event["data"]["pending"])

    nursery.start_soon(watch)
    async with open_client(b.config.control) as client:
        for name, priority in plan:
            src = make_file(tmp_path / name, 200_000, seed=priority)
            ids[name] = (await client.send_file(src, priority=priority))["id"]
        listing = {t["name"]: t for t in await client.ls() if t["direction"] == "out"}
        assert all(t["state"] == "pending" for t in listing.values())
        positions = {name: listing[name]["queue_position"] for name in ids}
        assert positions == {"high-1": 1, "high-2": 2, "mid": 3, "doomed": 4, "low": 5}
        # Cancel works while pending, and the queue closes up.
        assert (await client.cancel(ids["doomed"]))["state"] == "canceled"
        listing = {t["name"]: t for t in await client.ls() if t["direction"] == "out"}
        assert listing["low"]["queue_position"] == 4
        sim.set_outage(False)
        finals = [await client.wait(ids[name]) for name in ("high-1", "high-2", "mid", "low")]
    assert all(f["state"] == "done" for f in finals)
    # One at a time, in queue order.
    assert started == ["high-1", "high-2", "mid", "low"]
    assert queue_events and queue_events[-1] == []
    assert "doomed" not in {p.name for p in (a.config.inbox).iterdir()}


async def test_cancel_during_outage_reaches_the_peer(nursery: trio.Nursery,
                                                     tmp_path: Path) -> None:
    a, b, sim = await start_via_sim(nursery, tmp_path, sim_down_at_start)
    async with open_client(b.config.control) as client:
        out = await client.open_stream(name="cut")
        await out.send_all(b"z" * 10_000)
        await wait_for(lambda: out.id in a.transfers)
        sim.set_outage(True)
        await wait_for(lambda: b.link_state == "down")
        assert (await client.cancel(out.id))["state"] == "canceled"
        assert a.transfers[out.id].state.value == "active"  # the peer cannot know yet
        sim.set_outage(False)
        await wait_for(lambda: a.transfers[out.id].state.value == "canceled")
    assert a.transfers[out.id].error_code == "canceled"
