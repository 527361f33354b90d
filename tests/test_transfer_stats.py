"""Per-transfer statistics (rate, bytes in flight, bytes retransmitted) in ``get`` and
progress events, on the in-memory network and the mock clock.

Streams, not files: a file's receiver makes its bytes durable in worker threads, and
while a thread works the autojump clock races ahead (seconds of mock time in
milliseconds), which would distort a rate measured in mock time."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from quelay.agent import Agent
from quelay.agent.pipes import OutboundPipe
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.transport.memory import MemoryNetwork

from .conftest import attach_reader, start_memory_pair

SIZE = 600_000
RATE = 2_000_000  # bit/s at the wire


async def _stream(nursery: trio.Nursery, a: Agent, b: Agent, size: int,
                  seed: int) -> tuple[Transfer, dict[str, str], bytes]:
    """An outbound stream of ``size`` random bytes from B, read at A."""
    data = random.Random(seed).randbytes(size)
    pipe = OutboundPipe(256 * 1024)
    t = Transfer(wire.new_transfer_id(), "out", "stream", "s", None, 4)
    b.book.submit(t, pipe)
    got: dict[str, str] = {}

    async def write() -> None:
        view = memoryview(data)
        while view:
            view = view[await pipe.write(view):]
        pipe.end()

    async def read() -> None:
        _, reader_side = await attach_reader(a, t.id, poll=0.05)
        digest = hashlib.sha256()
        n = 0
        while n < size:
            chunk = await reader_side.receive_some(65536)
            if not chunk:
                break
            digest.update(chunk)
            n += len(chunk)
        got["digest"] = digest.hexdigest()

    nursery.start_soon(write)
    nursery.start_soon(read)
    return t, got, data


@pytest.mark.parametrize("loss", [0.0, 0.05])
async def test_get_reports_rate_in_flight_and_retransmitted(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock,
        loss: float) -> None:
    net = MemoryNetwork(delay=0.1, loss=loss, seed=7)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=RATE)
    t, got, data = await _stream(nursery, a, b, SIZE, seed=5)
    samples = []
    with trio.fail_after(600):
        while not t.terminal:
            await trio.sleep(0.25)
            samples.append(t.info())
        while "digest" not in got:
            await trio.sleep(0.05)
    assert t.state is State.DONE
    assert got["digest"] == hashlib.sha256(data).hexdigest()
    incoming = a.transfers[t.id]
    active = [s for s in samples if s["state"] == "active"]
    assert active
    rates = [s["rate"] for s in active]
    # Bytes/s of payload: never above the cap, and well above nothing mid-transfer.
    assert 0 < max(rates) <= RATE / 8
    assert max(rates) > RATE / 8 / 4
    assert max(s["in_flight"] for s in active) > 0
    info = t.info()
    if loss:
        assert info["retransmitted"] > 0  # about 5 % of the bytes were sent again
        assert info["retransmitted"] < SIZE // 2
    else:
        # Nothing lost: what was sent again are tail protection's copies at the end.
        assert b.session is not None
        path = b.session.conn.path_stats()
        assert path.lost_packets == 0
        assert info["retransmitted"] <= path.tail_copy_bytes
    # The receiver reports its rate; in-flight and retransmissions are the sender's.
    assert incoming.info()["in_flight"] is None and incoming.info()["retransmitted"] is None


async def test_retransmissions_survive_a_reconnect(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Bytes sent again on a connection that ended still count for the transfer."""
    net = MemoryNetwork(delay=0.1, loss=0.05, seed=11)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=RATE)
    t, got, data = await _stream(nursery, a, b, SIZE, seed=6)
    with trio.fail_after(600):
        while t.retransmitted == 0 or t.delivered < SIZE // 3:
            await trio.sleep(0.25)
    before = t.retransmitted
    assert b.session is not None
    ups = b.link_ups
    b.session.conn.close("test: reconnect")
    with trio.fail_after(600):
        while b.link_ups == ups:
            await trio.sleep(0.05)
        assert t.retransmitted >= before  # folded into the transfer's total, not lost
        while not t.terminal or "digest" not in got:
            await trio.sleep(0.25)
    assert t.state is State.DONE
    assert got["digest"] == hashlib.sha256(data).hexdigest()
    assert t.retransmitted >= before
