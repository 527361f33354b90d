"""A paused reader slows the writer; memory stays bounded on both agents."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import trio

from quelay.client import open_client

from .conftest import start_pair, wait_for

KiB = 1024
SPOOL = 256 * KiB
WINDOW = 256 * KiB
HIGH_WATER = 128 * KiB
TOTAL = 8 * 1024 * KiB


async def test_paused_reader_blocks_writer(nursery: trio.Nursery, tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path, spool_size=SPOOL, stream_window=WINDOW,
                            connection_window=4 * WINDOW, send_high_water=HIGH_WATER)
    rng = random.Random(3)
    payload = rng.randbytes(TOTAL)
    written = {"n": 0}
    result: dict = {}

    async def writer() -> None:
        async with open_client(pair.b.control) as client:
            async with await client.open_stream(name="slow") as out:
                for i in range(0, TOTAL, 32 * KiB):
                    await out.send_all(payload[i : i + 32 * KiB])
                    written["n"] = i + 32 * KiB
            result["out"] = out.result

    nursery.start_soon(writer)
    sender = pair.b.agent
    receiver = pair.a.agent
    await wait_for(lambda: any(t.direction == "out" for t in sender.transfers.values()))
    t_out = next(t for t in sender.transfers.values() if t.direction == "out")
    assert receiver.session is not None and sender.session is not None

    # Steady state with nobody reading: flow control has stopped the sender and the
    # spool is full, so the agent stops reading its client.
    await wait_for(lambda: receiver.session.conn.inbound_buffered() > 0
                   and sender.book.runtime(t_out).out.spool.free == 0)
    t_in = receiver.transfers[t_out.id]
    assert receiver.session.conn.inbound_buffered() <= WINDOW  # credit follows consumption
    assert t_in.delivered == 0 and t_out.delivered == 0  # nothing delivered, nothing acked
    # the agent took exactly one spool of the writer's bytes
    assert sender.book.runtime(t_out).out.accepted == SPOOL
    data_stream = sender.session.data_stream_of(t_out.id)
    assert sender.session.conn.stream_buffered(data_stream) <= HIGH_WATER + 64 * KiB
    assert written["n"] < TOTAL  # the writer is blocked

    got = hashlib.sha256()
    async with open_client(pair.a.control) as client:
        incoming = await client.accept_incoming(name="slow")
        async for chunk in incoming:
            got.update(chunk)
    await wait_for(lambda: "out" in result)
    assert got.digest() == hashlib.sha256(payload).digest()
    assert result["out"]["state"] == "done" and result["out"]["bytes"] == TOTAL
