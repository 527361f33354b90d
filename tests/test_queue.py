"""The pending queue (--max-concurrent), transfers requested while down, cancel in every state.

Both agents run on the in-memory datagram network on Trio's mock clock: waiting
for the dead-link bound (3 s) costs no wall time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from quelay.client import open_client
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, start_memory_pair, wait_for


async def test_queue_orders_by_priority_then_fifo(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.005)
    a, b = await start_memory_pair(nursery, tmp_path, net, max_concurrent=1)
    # Take the link down and wait until the dialler knows it.
    net.down = True
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
            src = make_file(tmp_path / name, 50_000, seed=priority)
            ids[name] = (await client.send_file(src, priority=priority))["id"]
        listing = {t["name"]: t for t in await client.ls() if t["direction"] == "out"}
        assert all(t["state"] == "pending" for t in listing.values())
        positions = {name: listing[name]["queue_position"] for name in ids}
        assert positions == {"high-1": 1, "high-2": 2, "mid": 3, "doomed": 4, "low": 5}
        # Cancel works while pending, and the queue closes up.
        assert (await client.cancel(ids["doomed"]))["state"] == "canceled"
        listing = {t["name"]: t for t in await client.ls() if t["direction"] == "out"}
        assert listing["low"]["queue_position"] == 4
        net.down = False
        finals = [await client.wait(ids[name]) for name in ("high-1", "high-2", "mid", "low")]
    assert all(f["state"] == "done" for f in finals)
    # One at a time, in queue order.
    assert started == ["high-1", "high-2", "mid", "low"]
    assert queue_events and queue_events[-1] == []
    assert "doomed" not in {p.name for p in (a.config.inbox).iterdir()}


async def test_cancel_during_outage_reaches_the_peer(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.005)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    async with open_client(b.config.control) as client:
        out = await client.open_stream(name="cut")
        await out.send_all(b"z" * 10_000)
        await wait_for(lambda: out.id in a.transfers)
        net.down = True
        await wait_for(lambda: b.link_state == "down")
        assert (await client.cancel(out.id))["state"] == "canceled"
        assert a.transfers[out.id].state.value == "active"  # the peer cannot know yet
        net.down = False
        await wait_for(lambda: a.transfers[out.id].state.value == "canceled")
    assert a.transfers[out.id].error_code == "canceled"
