"""Outages and reconnects: every transfer resumes from the last delivered byte, exactly once."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import trio

from quelay.client import ClientError, open_client
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.framing import encode_frame
from quelay.transport.connection import Liveness
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, start_memory_pair, start_pair, wait_for

MiB = 1024 * 1024


def test_liveness_detector_on_explicit_time() -> None:
    live = Liveness(dead_after=3.0)
    live.heard(10.0)
    assert not live.is_dead(12.9, rtt=None)
    assert live.is_dead(13.1, rtt=None)
    # On a long path, the bound grows with the RTT (4 RTTs).
    assert not live.is_dead(13.1, rtt=0.9)
    assert live.is_dead(13.7, rtt=0.9)
    live.heard(13.7)
    assert not live.is_dead(14.0, rtt=0.9)


async def test_outage_longer_than_the_spool(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """On the in-memory network (mock time): the dead-link wait costs no wall time."""
    spool = 128 * 1024
    net = MemoryNetwork(delay=0.005)
    a, b = await start_memory_pair(nursery, tmp_path, net, spool_size=spool)
    payload = random.Random(5).randbytes(1 * MiB)  # eight spools
    got = hashlib.sha256()
    count = {"n": 0}

    async def reader() -> None:
        async with open_client(a.config.control) as client:
            incoming = await client.accept_incoming(name="long")
            async for chunk in incoming:
                got.update(chunk)
                count["n"] += len(chunk)

    async with trio.open_nursery() as inner:
        inner.start_soon(reader)
        async with open_client(b.config.control) as client:
            out = await client.open_stream(name="long")
            t_out = b.transfers[out.id]
            await out.send_all(payload[: MiB // 2])
            await wait_for(lambda: count["n"] >= MiB // 4)
            net.down = True
            writer_done = trio.Event()

            async def write_rest() -> None:
                for i in range(MiB // 2, len(payload), 64 * 1024):
                    await out.send_all(payload[i : i + 64 * 1024])
                writer_done.set()

            inner.start_soon(write_rest)
            await wait_for(lambda: b.link_state == "down"
                           and b.book.runtime(t_out).out.spool.free == 0)
            # The writer is held back: the agent holds at most one spool of unacked bytes.
            assert b.book.runtime(t_out).out.accepted - t_out.delivered <= spool
            assert not writer_done.is_set()
            net.down = False
            await writer_done.wait()
            final = await out.finish()
    assert final["state"] == "done"
    assert count["n"] == len(payload)
    assert got.digest() == hashlib.sha256(payload).digest()


async def test_overlap_is_trimmed_and_gap_fails(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A forged peer replays with overlap (trimmed), then with a gap (the transfer fails)."""
    pair = await start_pair(nursery, tmp_path)
    a, b = pair.a.agent, pair.b.agent
    results: dict[str, Any] = {}

    async def forged_transfer(name: str, second_offset: int, tail: bytes) -> None:
        tid = wire.new_transfer_id()
        assert a.session is not None
        # B owns the transfer (so reconciliation keeps it alive) but has no pump for it:
        # the test writes its data streams by hand.
        t_b = Transfer(tid, "out", "stream", name, None, 4, opened=True, sent_high=16)
        t_b.move_to(State.ACTIVE)
        b.book.table.add(t_b)
        a.session.perform(a.session.protocol.receive(wire.Open(tid, "stream", None, 4, name, {})))
        received = bytearray()

        async def reader() -> None:
            async with open_client(a.config.control) as client:
                incoming = await client.accept_incoming(name=name)
                try:
                    async for chunk in incoming:
                        received.extend(chunk)
                except ClientError as exc:
                    results[name + ".error"] = exc.code
                results[name + ".final"] = await client.wait(tid)

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            # Session 1: bytes 0..10 on a data stream that never ends.
            assert b.session is not None
            conn = b.session.conn
            sid = conn.open_stream()
            header = encode_frame(wire.encode_message(wire.DataHeader(tid, 0)))
            conn.send_nowait(sid, header + b"0123456789")
            await wait_for(lambda: a.transfers[tid].delivered == 10)
            # The link breaks; the dialler comes back with a new connection.
            old_session = a.session
            conn.abandon("test: connection lost")
            await wait_for(lambda: a.session is not None and a.session is not old_session
                           and b.session is not None and b.link_state == "up")
            conn = b.session.conn
            sid = conn.open_stream()
            header = encode_frame(wire.encode_message(wire.DataHeader(tid, second_offset)))
            conn.send_nowait(sid, header + tail, end_stream=True)
            whole = b"0123456789ABCDEF"
            b.session.send(wire.Finish(tid, len(whole), hashlib.sha256(whole).digest()))
        results[name + ".bytes"] = bytes(received)

    await forged_transfer("overlap", 5, b"56789ABCDEF")
    assert results["overlap.final"]["state"] == "done"
    assert results["overlap.bytes"] == b"0123456789ABCDEF"

    await forged_transfer("gap", 12, b"CDEF")
    final = results["gap.final"]
    assert final["state"] == "failed"
    assert final["error"]["code"] == "protocol_error" and "gap" in final["error"]["message"]
    assert results["gap.bytes"] == b"0123456789"  # nothing past the gap reached the reader
    assert results.get("gap.error") == "stream_failed"  # an error, not a silent EOF


async def test_malformed_control_frame_from_peer_ends_only_the_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    import logging

    pair = await start_pair(nursery, tmp_path)
    a, b = pair.a.agent, pair.b.agent
    src = make_file(tmp_path / "after.bin", 100_000)
    assert b.session is not None and b.session.control_sid is not None
    old = a.session
    # A forged peer: a frame announcing 10 MB on the control stream.
    b.session.conn.send_nowait(b.session.control_sid, b"\x00\x98\x96\x80garbage")
    await wait_for(lambda: a.session is not None and a.session is not old
                   and b.link_state == "up")
    # The agent survived, reconnected, and still moves data.
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        assert (await client.wait(info["id"]))["state"] == "done"
    assert logging.getLogger("quelay").isEnabledFor(logging.WARNING)
