"""Per-transfer statistics (rate, bytes in flight, bytes retransmitted) in ``get`` and
progress events, on the in-memory network and the mock clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, sha256_file
from .test_memory_link import start_memory_pair

SIZE = 600_000
RATE = 2_000_000  # bit/s at the wire


@pytest.mark.parametrize("loss", [0.0, 0.05])
async def test_get_reports_rate_in_flight_and_retransmitted(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock,
        loss: float) -> None:
    net = MemoryNetwork(delay=0.1, loss=loss, seed=7)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=RATE)
    src = make_file(tmp_path / "f.bin", SIZE, seed=5)
    t = Transfer(wire.new_transfer_id(), "out", "file", "f.bin", SIZE, 4)
    t.path = str(src)
    b.book.submit(t)
    samples = []
    with trio.fail_after(120):
        while not t.terminal:
            await trio.sleep(0.25)
            samples.append(t.info())
    assert t.state is State.DONE
    incoming = a.transfers[t.id]
    assert sha256_file(Path(incoming.path or "")) == sha256_file(src)
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
    src = make_file(tmp_path / "f.bin", SIZE, seed=6)
    t = Transfer(wire.new_transfer_id(), "out", "file", "f.bin", SIZE, 4)
    t.path = str(src)
    b.book.submit(t)
    with trio.fail_after(120):
        while t.retransmitted == 0 or t.delivered < SIZE // 3:
            await trio.sleep(0.25)
    before = t.retransmitted
    assert b.session is not None
    ups = b.link_ups
    b.session.conn.close("test: reconnect")
    with trio.fail_after(120):
        while b.link_ups == ups:
            await trio.sleep(0.05)
        assert t.retransmitted >= before  # folded into the transfer's total, not lost
        while not t.terminal:
            await trio.sleep(0.25)
    assert t.state is State.DONE
    assert t.retransmitted >= before
    assert t.in_flight >= 0
