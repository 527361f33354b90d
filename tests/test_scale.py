"""Thousands of transfers: a thousand concurrent streams, ten thousand queued ones.

The streams run between two real agents on the in-memory datagram network on
Trio's mock clock (no UDP, no wall-clock waits), so what is asserted is
counted: every stream's SHA-256 at the far side, how many were active at once
and had made progress together, the bytes their spools held in memory.
"""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.core import Metric

from quelay.agent import Agent
from quelay.agent import session as session_module
from quelay.agent.metrics import AgentCollector
from quelay.agent.pipes import OutboundPipe
from quelay.agent.session import HEADER_READ
from quelay.client import open_client
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.native import SPOOL_MIN_RING
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, sha256_file, site_config, wait_for
from .test_memory_link import start_memory_pair

STREAMS = 1000


def _gauge(agent: Agent, name: str) -> float:
    families: list[Metric] = list(AgentCollector(agent).collect())
    for family in families:
        if family.name == name:
            return float(family.samples[0].value)
    raise AssertionError(f"no metric {name}")


async def _read_all(a: Agent, tid: str, size: int, digests: dict[str, str]) -> None:
    """Attach a reader to incoming stream ``tid`` once it arrives and hash what it gets."""
    while tid not in a.transfers:
        await a.book.added.park()
    t_in = a.transfers[tid]
    t_in.claimed = t_in.attached = True
    reader, agent_side = trio.testing.memory_stream_pair()
    inp = a.book.runtime(t_in).inp
    assert inp is not None
    inp.attach(agent_side)
    got, n = hashlib.sha256(), 0
    while n < size:
        chunk = await reader.receive_some(65536)
        assert chunk, f"{tid}: the reader saw EOF after {n} of {size} bytes"
        got.update(chunk)
        n += len(chunk)
    await a.book.wait_finished(t_in)
    digests[tid] = got.hexdigest()


async def test_a_thousand_concurrent_streams_arrive_byte_exact(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.05)  # 100 ms RTT
    a, b = await start_memory_pair(nursery, tmp_path, net)
    rng = random.Random(1000)
    payloads: dict[str, bytes] = {}
    pipes: dict[str, OutboundPipe] = {}
    sent: list[Transfer] = []
    for i in range(STREAMS):
        t = Transfer(wire.new_transfer_id(), "out", "stream", f"s{i}", None, rng.randint(0, 8))
        pipes[t.id] = pipe = OutboundPipe(1024 * 1024)
        payloads[t.id] = rng.randbytes(rng.randint(300, 4000))
        b.book.submit(t, pipe)
        sent.append(t)
    # An open stream nobody wrote to yet holds no spool memory.
    assert sum(p.spool.allocated for p in pipes.values()) == 0
    assert b.book.table.active_outbound_count() == STREAMS  # all started at once

    digests: dict[str, str] = {}
    async with trio.open_nursery() as inner:
        for t in sent:
            inner.start_soon(_read_all, a, t.id, len(payloads[t.id]), digests)
        # First half of every stream; the writers stay open.
        for t in sent:
            half = payloads[t.id][:len(payloads[t.id]) // 2]
            assert await pipes[t.id].write(memoryview(half)) == len(half)
        # Written, not yet acknowledged: each spool holds one smallest ring.
        assert sum(p.spool.allocated for p in pipes.values()) == STREAMS * SPOOL_MIN_RING
        await wait_for(lambda: all(t.delivered == len(payloads[t.id]) // 2 for t in sent),
                       timeout=600)
        # Every stream was active at the same time and all of them made progress.
        assert a.book.table.live_incoming() == STREAMS
        assert all(a.transfers[t.id].state is State.ACTIVE for t in sent)
        assert b.session is not None and len(b.session._pumps) == STREAMS  # QUIC streams open
        # Acknowledged: the idle open streams hold no spool memory at all.
        assert sum(p.spool.allocated for p in pipes.values()) == 0
        assert _gauge(b, "quelay_spool_allocated_bytes") == 0
        assert _gauge(b, "quelay_spool_bytes") == 0
        for t in sent:
            rest = payloads[t.id][len(payloads[t.id]) // 2:]
            assert await pipes[t.id].write(memoryview(rest)) == len(rest)
            pipes[t.id].end()
        with trio.fail_after(600):
            for t in sent:
                await b.book.wait_finished(t)  # the final acknowledgements
    assert all(t.state is State.DONE for t in sent), [t.error_message for t in sent
                                                       if t.state is not State.DONE][:3]
    assert digests == {tid: hashlib.sha256(p).hexdigest() for tid, p in payloads.items()}
    assert all(p.aborted for p in pipes.values())  # spools released once done
    assert b.book.table.active_outbound_count() == 0 and a.book.table.live_incoming() == 0


async def test_stream_credit_is_granted_again_as_streams_close(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """With room for 16 streams, 200 transfers still all go through: each closed stream
    lets the peer open another (MAX_STREAMS grows as streams finish)."""
    net = MemoryNetwork(delay=0.01)
    a, b = await start_memory_pair(nursery, tmp_path, net, max_streams=16)
    src = make_file(tmp_path / "small.bin", 2000, seed=4)
    files = []
    for i in range(200):
        t = Transfer(wire.new_transfer_id(), "out", "file", f"f{i}.bin", 2000, 4)
        t.path = str(src)
        b.book.submit(t)
        files.append(t)
    with trio.fail_after(600):
        for t in files:
            await b.book.wait_finished(t)
    assert all(t.state is State.DONE for t in files)
    assert len(list((a.config.inbox).glob("f*.bin"))) == 200
    assert a.link_ups == 1  # one connection carried all of them


async def test_unread_streams_hold_no_more_than_the_connection_window(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Streams nobody reads yet: the receiver holds at most the connection window (plus
    one header read per stream), however many there are; the senders' spools keep the
    rest, and every byte arrives once the readers come."""
    window, count, size = 256 * 1024, 50, 100_000
    net = MemoryNetwork(delay=0.01)
    a, b = await start_memory_pair(nursery, tmp_path, net, connection_window=window,
                                   stream_window=64 * 1024)
    rng = random.Random(50)
    sent, payloads, pipes = [], {}, {}
    for i in range(count):
        t = Transfer(wire.new_transfer_id(), "out", "stream", f"u{i}", None, 4)
        pipes[t.id] = pipe = OutboundPipe(1024 * 1024)
        payloads[t.id] = rng.randbytes(size)
        b.book.submit(t, pipe)
        assert await pipe.write(memoryview(payloads[t.id])) == size
        pipe.end()
        sent.append(t)
    await trio.sleep(30)  # (mock time) long enough to use every credit the receiver gave
    assert a.session is not None
    inbound = a.session.conn._inbound
    held = sum(stream.buffered for stream in inbound.values())
    assert len(inbound) == count + 1  # every data stream (and the control stream) is open
    assert window // 2 <= held <= window  # the sender used its credit, and no more
    # Taken out of the data streams (and so credited again): only each one's header read.
    consumed = a.session.conn.quic._consumed
    assert sum(n for sid, n in consumed.items() if sid != a.session.control_sid) \
        <= count * HEADER_READ
    assert all(a.transfers[t.id].delivered == 0 for t in sent)  # nothing was read yet
    # What the receiver never delivered stays in the senders' spools, unacknowledged.
    assert sum(pipes[t.id].spool.unacked for t in sent) == count * size
    digests: dict[str, str] = {}
    async with trio.open_nursery() as inner:
        for t in sent:
            inner.start_soon(_read_all, a, t.id, size, digests)
    with trio.fail_after(600):
        for t in sent:
            await b.book.wait_finished(t)
    assert all(t.state is State.DONE for t in sent)
    assert digests == {tid: hashlib.sha256(p).hexdigest() for tid, p in payloads.items()}


async def test_incoming_files_share_one_memory_budget_while_the_disk_is_stuck(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk takes nothing for a while: ten incoming files do not each pile up a
    batch (up to 4 MiB) in memory; together they hold the session's budget plus at
    most one chunk each, the rest stays uncredited in QUIC and at the sender."""
    count, size, budget, chunk = 10, 512 * 1024, 64 * 1024, 256 * 1024
    gate = threading.Event()
    write_at = session_module._write_at

    def stuck_disk(path: Path, offset: int, chunks: list[bytes], hasher: object = None) -> None:
        if chunks:  # (creating the empty partial file goes through)
            assert gate.wait(60), "the test never opened the gate"
        write_at(path, offset, chunks, hasher)

    peak = [0]
    add = session_module._Batches.add

    def counting_add(self: session_module._Batches, data: bytes) -> None:
        add(self, data)
        peak[0] = max(peak[0], self.held.bytes)

    monkeypatch.setattr(session_module, "_write_at", stuck_disk)
    monkeypatch.setattr(session_module, "SINK_BUDGET", budget)
    monkeypatch.setattr(session_module._Batches, "add", counting_add)
    net = MemoryNetwork(delay=0.01)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    files = []
    for i in range(count):
        src = make_file(tmp_path / f"d{i}.bin", size, seed=100 + i)
        t = Transfer(wire.new_transfer_id(), "out", "file", src.name, size, 4)
        t.path = str(src)
        b.book.submit(t)
        files.append(t)
    try:
        await trio.sleep(60)  # (mock time) everything that can move has moved
        assert a.session is not None
        assert 0 < a.session.sink_held.bytes <= peak[0] <= budget + count * chunk
        assert not any(t.terminal for t in files)
    finally:
        gate.set()
    with trio.fail_after(600):
        for t in files:
            await b.book.wait_finished(t)
    assert all(t.state is State.DONE for t in files)
    for i in range(count):
        assert sha256_file(a.config.inbox / f"d{i}.bin") == sha256_file(tmp_path / f"d{i}.bin")
    assert a.session.sink_held.bytes == 0  # every byte held was written and let go


async def test_ten_thousand_transfers_queue_while_the_link_is_down(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Accepted, listed and queued in order: 5000 files and 5000 streams, nobody to send to."""
    net = MemoryNetwork()
    nursery.start_soon(net.run)
    agent = Agent(site_config(tmp_path / "b", peer=("10.0.0.9", 4433), trust=[]),
                  socket_factory=net.socket)
    await nursery.start(agent.run)
    src = make_file(tmp_path / "q.bin", 100, seed=6)
    ids = []
    async with open_client(agent.config.control) as client:
        for i in range(5000):
            ids.append((await client.send_file(src, name=f"q{i}.bin"))["id"])
            ids.append((await client.request("open_stream", name=f"s{i}"))["id"])
        listed = await client.ls()
        first, last = await client.get(ids[0]), await client.get(ids[-1])
        status = await client.status()
    assert agent.link_state != "up"
    assert len(listed) == 10_000 and {t["id"] for t in listed} == set(ids)
    assert all(t["state"] == "pending" for t in listed)
    assert (first["queue_position"], last["queue_position"]) == (1, 10_000)
    assert agent.book.table.queued() == 10_000
    assert status["transfers"]["pending"] == 10_000
    # Their 5000 spools hold no memory: nothing was written.
    assert _gauge(agent, "quelay_spool_allocated_bytes") == 0
