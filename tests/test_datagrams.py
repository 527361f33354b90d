"""Best-effort datagrams (QUIC DATAGRAM frames): the sans-IO queue, bucket and inboxes on
explicit time, then two agents on the in-memory network (mock clock), the control
protocol and client on loopback, and the command line.

Every assertion is a counted fact: messages and bytes counted by the agents, by the
wire gate, or by the test itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from quelay.agent import Agent, AgentConfig
from quelay.agent.metrics import registry_for
from quelay.client import BlockingClient, ClientError, open_client
from quelay.core import datagrams as dg
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.transport.memory import MemoryNetwork

from .conftest import Pair, make_file, wait_for
from .test_cli import cli, ctl
from .test_memory_link import start_memory_pair

# -- wire format ------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    frame = dg.encode_datagram("pos/üav-1", b"\x00\xffpayload", 1_700_000_000.123456)
    assert len(frame) == dg.HEADER_BYTES + len("pos/üav-1".encode()) + 9
    got = dg.decode_datagram_untrusted(frame)
    assert got.name == "pos/üav-1" and got.payload == b"\x00\xffpayload"
    assert got.sent_at == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert dg.decode_datagram_untrusted(dg.encode_datagram("x", b"", 0.0)).payload == b""


@pytest.mark.parametrize("frame, why", [
    (b"", "shorter than its header"),
    (b"\x01" + b"\x00" * 8, "shorter than its header"),
    (b"\x02" + b"\x00" * 8 + b"\x01x", "unknown datagram version 2"),
    (b"\x01" + b"\x00" * 8 + b"\x05abc", "runs past its end"),
    (b"\x01" + b"\x00" * 8 + b"\x02\xff\xfe", "not UTF-8"),
    (b"\x01" + b"\x00" * 8 + b"\x00data", "must be 1..64"),
    (b"\x01" + b"\x00" * 8 + b"\x01\n", "non-printable"),
])
def test_malformed_frames_raise_only_the_protocol_error(frame: bytes, why: str) -> None:
    with pytest.raises(dg.MalformedDatagram, match=why):
        dg.decode_datagram_untrusted(frame)


def test_name_rules() -> None:
    assert dg.name_problem("telemetry.pos") is None
    assert dg.name_problem("x" * 64) is None
    assert "1..64" in (dg.name_problem("x" * 65) or "")
    assert "1..64" in (dg.name_problem("") or "")
    assert "non-printable" in (dg.name_problem("a\tb") or "")
    assert dg.name_problem(b"bytes") == "must be a string"
    assert dg.name_problem("\ud800") == "is not valid Unicode"


# -- the send queue on explicit time ------------------------------------------------------


def _msg(name: str, size: int, deadline: float) -> dg.Outgoing:
    frame = dg.encode_datagram(name, b"p" * size, 0.0)
    return dg.Outgoing(name, frame, size, deadline)


def test_max_age_drops_on_explicit_time() -> None:
    counters = dg.Counters()
    q = dg.SendQueue(counters, share=1.0)
    for i, deadline in enumerate((1.0, 0.5, 2.0)):
        assert q.offer(_msg(f"m{i}", 10, deadline), 0.0, capacity=1000) is None
    assert q.ready_at(0.0) == 0.0  # uncapped: the head may go now
    assert q.expire(0.49) == 0 and len(q) == 3
    # At 0.5 s the second message is late: dropped, never handed out.
    assert q.expire(0.5) == 1 and len(q) == 2
    first = q.take(0.9)
    assert first is not None and first.name == "m0"
    assert q.take(2.0) is None  # m2 expired exactly at its deadline
    assert counters.total["dropped_late"] == 2
    assert counters.names["m1"]["dropped_late"] == 1 and counters.names["m2"]["dropped_late"] == 1
    q.sent(first)
    assert counters.total["sent"] == 1 and counters.total["sent_bytes"] == 10
    assert q.ready_at(2.0) == math.inf and q.queued_bytes == 0


def test_refusals_are_counted_with_their_reason() -> None:
    counters = dg.Counters()
    q = dg.SendQueue(counters, share=1.0, max_messages=2)
    refusal = q.offer(_msg("a", 10, 1.0), 0.0, capacity=None)
    assert refusal is not None and refusal.reason == "link_down"
    refusal = q.offer(_msg("a", 100, 1.0), 0.0, capacity=100)
    assert refusal is not None and refusal.reason == "too_big"
    assert "at most 89 payload bytes" in refusal.message  # 100 - 10 header - 1 name byte
    refusal = q.offer(_msg("a", 1, 1.0), 0.0, capacity=0)
    assert refusal is not None and "accepts no datagrams" in refusal.message
    assert q.offer(_msg("a", 89, 1.0), 0.0, capacity=100) is None  # exactly fits
    assert q.offer(_msg("a", 1, 1.0), 0.0, capacity=100) is None
    refusal = q.offer(_msg("a", 1, 1.0), 0.0, capacity=100)
    assert refusal is not None and refusal.reason == "queue_full"
    assert q.drop_all("link_down") == 2
    assert counters.total == {**dict.fromkeys(dg.COUNTERS, 0), "dropped_link_down": 3,
                              "dropped_too_big": 2, "dropped_queue_full": 1}


def test_share_limits_datagrams_under_a_saturated_cap() -> None:
    """Offered far above the share for 10 s: what goes never exceeds share × cap (plus
    one burst), the share is used fully, and the rest is dropped as late."""
    counters = dg.Counters()
    cap = 50_000.0  # bytes/s at the wire
    overhead, largest = 87, 1300
    q = dg.SendQueue(counters, share=0.25)
    q.set_cap(cap, 0.0, overhead=overhead, largest=largest)
    charged = offered = 0
    steps = 10_000  # 1 ms each: a 1000-byte message offered every step (1 MB/s)
    for step in range(steps):
        now = step / 1000
        if q.offer(_msg("flood", 1000 - dg.HEADER_BYTES - 5, now + 0.2), now, largest) is None:
            offered += 1
        while (msg := q.take(now)) is not None:
            charged += len(msg.frame) + overhead
            q.sent(msg)
    burst = max(2 * (largest + overhead), 0.25 * cap * dg.SHARE_BURST_SECONDS)
    allowed = 0.25 * cap * steps / 1000
    assert charged <= allowed + burst
    assert charged >= allowed - (1000 + overhead)  # used to the last whole datagram
    sent = counters.total["sent"]
    assert sent == charged // (1000 + overhead)
    assert offered == sent + counters.total["dropped_late"] + len(q)
    # Uncapped (a cap of 0): no share limit at all.
    q.set_cap(0, 10.0, overhead=overhead, largest=largest)
    q.expire(10.0)
    waiting = len(q)
    for _ in range(500):
        assert q.offer(_msg("flood", 10, 11.0), 10.0, largest) is None
    assert sum(1 for _ in iter(lambda: q.take(10.0), None)) == waiting + 500
    assert len(q) == 0


def test_share_bucket_waits_then_releases() -> None:
    q = dg.SendQueue(dg.Counters(), share=0.5)
    q.set_cap(2000.0, 0.0, overhead=0, largest=500)  # 1000 B/s for datagrams, burst 1000
    assert q.offer(_msg("a", 489, 10.0), 0.0, 1000) is None  # a 500-byte frame
    assert q.offer(_msg("a", 489, 10.0), 0.0, 1000) is None
    assert q.offer(_msg("a", 739, 10.0), 0.0, 1000) is None  # 750 bytes
    assert q.take(0.0) is not None and q.take(0.0) is not None  # the burst
    assert q.take(0.0) is None
    assert q.ready_at(0.0) == pytest.approx(0.75, abs=2e-6)  # 750 bytes at 1000 B/s
    assert q.take(0.749) is None
    assert q.take(q.ready_at(0.749)) is not None


# -- inboxes and counters -------------------------------------------------------------------


def _rx(name: str, payload: bytes) -> dg.Received:
    return dg.Received(name, payload, 0.0, 0.0)


def test_inboxes_drop_the_oldest_and_count_it() -> None:
    counters = dg.Counters()
    boxes = dg.Inboxes(counters, max_messages=3, max_bytes=100, max_names=2)
    for i in range(5):
        boxes.put(_rx("a", bytes([i]) * 10))
    assert boxes.available("a") == 3 and counters.names["a"]["dropped_unread"] == 2
    assert [m.payload[0] for m in boxes.take("a", 10)] == [2, 3, 4]
    assert boxes.put(_rx("b", b"x" * 60)) and boxes.put(_rx("c", b"y" * 30))
    assert not boxes.put(_rx("d", b"z"))  # a third name gets no inbox
    assert boxes.put(_rx("c", b"w" * 30))  # 120 bytes in all: c's oldest goes
    assert boxes.available("c") == 1 and boxes.queued_bytes == 90
    assert counters.total["delivered"] == 9 and counters.total["dropped_unread"] == 4
    assert counters.total["delivered_bytes"] == 50 + 60 + 30 + 1 + 30
    # A reply holds at most max_bytes of payload, but always one message.
    assert len(boxes.take("b", 5, max_bytes=10)) == 1
    boxes.put(_rx("b", b"1" * 8))
    boxes.put(_rx("b", b"2" * 8))
    assert len(boxes.take("b", 5, max_bytes=10)) == 1 and boxes.available("b") == 1


def test_counters_per_name_are_bounded() -> None:
    counters = dg.Counters(max_names=2)
    for name in ("a", "b", "c"):
        counters.add(name, "sent")
    assert set(counters.names) == {"a", "b"} and counters.total["sent"] == 3


def test_config_bounds() -> None:
    root = Path("/nonexistent")
    with pytest.raises(ValueError, match="datagram_share"):
        AgentConfig(state_dir=root, inbox=root, control=root, listen=("h", 1), datagram_share=0)
    with pytest.raises(ValueError, match="datagram_max_age"):
        AgentConfig(state_dir=root, inbox=root, control=root, listen=("h", 1),
                    datagram_max_age=0)


# -- the service against a QUIC that builds no packet (explicit time) -----------------------


class _HeldQuic:
    """What the service uses of a QUIC connection whose packets are all held back (a full
    congestion window): datagrams handed over stay in its queue until withdrawn."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.withdrawals = 0

    def datagram_capacity(self) -> int:
        return 1308

    def datagram_overhead(self) -> int:
        return 42

    def datagrams_pending(self) -> int:
        return len(self.pending)

    def send_datagram_frame(self, data: bytes) -> None:
        self.pending.append(data)

    def withdraw_datagrams(self) -> int:
        self.withdrawals += 1
        n, self.pending = len(self.pending), []
        return n


class _HeldConn:
    def __init__(self) -> None:
        self.quic = _HeldQuic()
        self.closed: str | None = None
        self.silent = False
        self.kicks = 0
        self.before_build: Any = None
        self.after_build: Any = None

    def kick(self) -> None:
        self.kicks += 1


async def test_datagrams_held_in_quic_past_their_age_are_taken_back(
        autojump_clock: trio.testing.MockClock) -> None:
    from quelay.agent.datagrams import DatagramService

    conn = _HeldConn()
    service = DatagramService(share=0.25, max_age=1.0, cap=lambda: 0)
    async with trio.open_nursery() as nursery:
        service.attach(conn)  # as the session does when it comes up
        nursery.start_soon(service.serve, conn)
        t0 = trio.current_time()
        assert service.send("a", b"1", max_age=0.5)["accepted"]
        assert service.send("b", b"2", max_age=2.0)["accepted"]
        await trio.sleep(0.01)
        assert conn.kicks >= 1  # the pump asked for a transmit
        conn.before_build(t0 + 0.1)  # transmit: both go to QUIC, which builds nothing
        assert len(conn.quic.pending) == 2 and service.status()["queued"] == 2
        conn.after_build()
        conn.before_build(t0 + 0.5)  # "a" is due: taken back; "b" queues there again
        assert conn.quic.withdrawals == 1 and len(conn.quic.pending) == 1
        assert service.counters.names["a"]["dropped_late"] == 1
        conn.quic.pending.clear()  # now QUIC writes "b" into a packet
        conn.after_build()
        assert service.counters.names["b"]["sent"] == 1
        assert service.counters.total["sent"] == 1 and service.counters.total["dropped_late"] == 1
        assert service.send("c", b"3")["accepted"]
        nursery.cancel_scope.cancel()
    # The session ended with "c" still queued: dropped, link down; the hooks are gone.
    assert service.counters.names["c"]["dropped_link_down"] == 1
    assert conn.before_build is None and service.capacity() is None


# -- two agents on the in-memory network (mock clock) ---------------------------------------


async def test_delivery_counters_and_malformed_frames(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    for i in range(20):
        assert b.datagrams.send("pos", f"fix {i}".encode())["accepted"]
    got: list[dg.Received] = []
    while len(got) < 20:
        got += await a.datagrams.recv("pos", count=256)
    assert [m.payload for m in got] == [f"fix {i}".encode() for i in range(20)]
    assert b.datagrams.counters.names["pos"]["sent"] == 20
    assert a.datagrams.counters.names["pos"]["delivered"] == 20
    # Nothing waits for "other"; a timeout returns nothing.
    assert await a.datagrams.recv("other", timeout=0.5) == []
    # The largest message the service announces goes through; one byte more is refused.
    room = b.datagrams.send("big", b"")["max_payload"]
    assert room is not None and room > 1000
    assert b.datagrams.send("big", b"x" * room)["accepted"]
    big = await a.datagrams.recv("big", count=2)
    assert [len(m.payload) for m in big] == [0, room]
    refused = b.datagrams.send("big", b"x" * (room + 1))
    assert refused["reason"] == "too_big" and str(room) in refused["message"]
    # A DATAGRAM frame that is not ours: counted and dropped; the session goes on.
    assert b.session is not None
    b.session.conn.quic.send_datagram_frame(b"\x07not a quelay datagram")
    b.session.conn.kick()
    b.datagrams.send("pos", b"after")
    after = await a.datagrams.recv("pos")
    assert after[0].payload == b"after"
    assert a.datagrams.counters.malformed == 1 and a.link_ups == 1


async def test_datagrams_go_ahead_of_bulk(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """With the cap saturated by a file, each datagram still arrives about one path
    delay after it was sent."""
    net = MemoryNetwork(delay=0.1)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=400_000)
    src = make_file(tmp_path / "bulk.bin", 4 * 1024 * 1024, seed=5)
    t = Transfer(wire.new_transfer_id(), "out", "file", "bulk.bin", src.stat().st_size, 4)
    t.path = str(src)
    b.book.submit(t)
    # (bytes sent, not acknowledged: acks wait for the receiver's fsync in a worker
    # thread, whose real time the mock clock does not follow)
    await wait_for(lambda: t.sent > 200_000, timeout=60)
    latencies: list[float] = []
    for i in range(10):
        sent = trio.current_time()
        assert b.datagrams.send("ack", str(i).encode())["accepted"]
        await a.datagrams.recv("ack")
        latencies.append(trio.current_time() - sent)
        await trio.sleep(0.3)
        assert b.gate is not None  # the cap was saturated all along
        assert b.gate.window_bytes(trio.current_time()) * 8 > 0.9 * 400_000
    assert t.state is State.ACTIVE
    assert max(latencies) < 0.1 + 0.1  # one-way delay + a few packet times at the cap


async def test_share_limit_under_a_saturated_cap(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    rate = 400_000  # bits/s
    net = MemoryNetwork(delay=0.02)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=rate, datagram_share=0.25)
    src = make_file(tmp_path / "bulk.bin", 8 * 1024 * 1024, seed=6)
    t = Transfer(wire.new_transfer_id(), "out", "file", "bulk.bin", src.stat().st_size, 4)
    t.path = str(src)
    b.book.submit(t)
    await wait_for(lambda: t.sent > 100_000, timeout=60)
    assert b.session is not None and b.gate is not None
    payload = b"f" * 990

    async def flood() -> None:  # 200 kB/s offered: eight times the share
        while True:
            b.datagrams.send("flood", payload, max_age=0.5)
            await trio.sleep(0.005)

    def snapshot() -> tuple[int, int, int, int]:
        assert b.gate is not None
        c = b.datagrams.counters.total
        # Bulk on the wire: bytes handed to QUIC less those it has not sent yet (acks
        # would lag behind the receiver's fsyncs in worker threads, in real time).
        bulk = t.sent - b.session.unsent_bulk() if b.session is not None else 0
        return c["sent"], bulk, b.gate.total_bytes, a.datagrams.counters.total["delivered"]

    async with trio.open_nursery() as inner:
        inner.start_soon(flood)
        await trio.sleep(2)  # past the start
        sent0, bulk0, wire0, got0 = snapshot()
        await trio.sleep(10)
        sent1, bulk1, wire1, got1 = snapshot()
        inner.cancel_scope.cancel()
    quic = b.session.conn.quic
    per_msg = len(dg.encode_datagram("flood", payload, 0)) + quic.datagram_overhead() \
        + b.gate.per_datagram
    share = 0.25 * rate / 8 * 10  # bytes the share allows in 10 s
    charged = (sent1 - sent0) * per_msg
    burst = max(2 * (quic.datagram_capacity() + quic.datagram_overhead() + b.gate.per_datagram),
                0.25 * rate / 8 * dg.SHARE_BURST_SECONDS)
    assert share - 2 * per_msg <= charged <= share + burst
    assert got1 - got0 >= (sent1 - sent0) - 2  # what was sent arrived (no loss here)
    assert b.datagrams.counters.total["dropped_late"] > 5 * sent1  # the rest was too late
    assert wire1 - wire0 <= rate / 8 * 10 * 1.01  # the cap holds, datagrams included
    # Bulk keeps the rest of the cap: at least 60 % of it as file bytes.
    assert bulk1 - bulk0 >= 0.6 * rate / 8 * 10


async def test_max_age_drops_behind_a_tiny_share(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """At 20 kbit/s a 1 % share sends a 1 kB datagram every 40 s or so: of ten offered at
    once with max_age 1 s, the two of the bucket's burst go and the rest are dropped, late."""
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=20_000, datagram_share=0.01)
    for i in range(10):
        assert b.datagrams.send("slow", bytes([i]) * 1000, max_age=1.0)["accepted"]
    await trio.sleep(0.99)
    assert b.datagrams.counters.names["slow"]["dropped_late"] == 0
    await trio.sleep(0.5)
    counters = b.datagrams.counters.names["slow"]
    assert counters["sent"] == 2 and counters["dropped_late"] == 8
    got = await a.datagrams.recv("slow", count=10)
    assert [m.payload[0] for m in got] == [0, 1]
    assert len(b.datagrams.queue) == 0


async def test_lost_datagrams_are_not_retransmitted(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    assert b.session is not None
    net.down = True  # a short outage (the session survives it)
    assert b.datagrams.send("lost", b"one")["accepted"]
    await trio.sleep(0.5)
    net.down = False
    assert b.datagrams.send("found", b"two")["accepted"]
    assert (await a.datagrams.recv("found"))[0].payload == b"two"
    await trio.sleep(5)  # loss detection, probes: a retransmission would have arrived
    assert b.datagrams.counters.names["lost"]["sent"] == 1
    assert "lost" not in a.datagrams.counters.names  # never delivered
    assert b.session.conn.path_stats().lost_packets >= 1
    assert a.link_ups == 1 and b.link_ups == 1


async def test_link_down_refuses_and_drops(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=20_000, datagram_share=0.01)
    for _ in range(6):  # two go (the bucket's burst); four wait for the share
        b.datagrams.send("q", b"x" * 1000, max_age=30)
    net.down = True
    await wait_for(lambda: b.link_state == "down", timeout=30)
    counters = b.datagrams.counters.names["q"]
    assert counters["sent"] == 2 and counters["dropped_link_down"] == 4
    refused = b.datagrams.send("q", b"y")
    assert not refused["accepted"] and refused["reason"] == "link_down"
    assert refused["max_payload"] is None
    assert b.datagrams.status()["dropped_link_down"] == 5
    text = "\n".join(line.decode() for line in _metrics(b).splitlines())
    assert 'quelay_datagrams_dropped_total{reason="link_down"} 5.0' in text
    assert "quelay_datagrams_sent_total 2.0" in text
    assert "quelay_datagrams_delivered_total 0.0" in text


def _metrics(agent: Agent) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry_for(agent))


# -- control protocol and client (loopback) -------------------------------------------------


async def test_client_send_recv_and_errors(pair: Pair) -> None:
    async with open_client(pair.b.control) as out, open_client(pair.a.control) as inp:
        result = await out.datagram_send("cmd", "ack 7", max_age="500ms")
        assert result["accepted"] and result["reason"] is None
        msgs = await inp.datagram_recv("cmd", count=10, timeout=10)
        assert [m["data"] for m in msgs] == [b"ack 7"]
        assert msgs[0]["name"] == "cmd" and msgs[0]["received_at"] >= msgs[0]["sent_at"] - 1
        room = result["max_payload"]
        with pytest.raises(ClientError) as err:
            await out.datagram_send("cmd", b"x" * (room + 1))
        assert err.value.code == "too_big" and f"at most {room} payload bytes" in err.value.message
        refused = await out.datagram_send("cmd", b"x" * 70_000, check=False)
        assert refused["reason"] == "too_big"
        for bad in ({"name": "", "data": b"x"}, {"name": "a\nb", "data": b"x"},
                    {"name": "n", "data": 5}, {"name": "n", "data": b"x", "max_age": 0},
                    {"name": "n", "data": b"x", "max_age": 7200},
                    {"name": "n", "data": b"x", "max_age": "soon"}):
            with pytest.raises(ClientError) as err:
                await out.request("datagram_send", **bad)
            assert err.value.code == "invalid_argument", bad
        with pytest.raises(ClientError) as err:
            await inp.datagram_recv("cmd", count=1000)
        assert err.value.code == "invalid_argument"
        assert await inp.datagram_recv("cmd", timeout=0) == []
        for text in ("x", "y"):
            await out.datagram_send("iter", text)
        got = []
        async for msg in inp.datagrams("iter"):
            got.append(msg["data"])
            if len(got) == 2:
                break
        assert got == [b"x", b"y"]
        status = await out.status()
        # (the 70 kB one was refused by the client: it never reached the agent)
        assert status["datagrams"]["sent"] == 3 and status["datagrams"]["dropped_too_big"] == 1
        assert status["datagrams"]["names"]["cmd"]["sent_bytes"] == 5
        assert status["datagrams"]["max_message"] == room + len("cmd")
        assert (await inp.status())["datagrams"]["delivered"] == 3


async def test_blocking_client_datagrams(pair: Pair) -> None:
    def script() -> list[dict[str, Any]]:
        sender, reader = BlockingClient(pair.b.control), BlockingClient(pair.a.control)
        assert sender.datagram_send("beat", b"alive")["accepted"]
        assert not sender.datagram_send("beat", b"x" * 5000, check=False)["accepted"]
        return reader.datagram_recv("beat", count=5, timeout=10)

    msgs = await trio.to_thread.run_sync(script)
    assert [m["data"] for m in msgs] == [b"alive"]


# -- the command line -----------------------------------------------------------------------


async def test_cli_send_and_recv(pair: Pair) -> None:
    sent = await cli("datagram", "send", *ctl(pair.b), "--name", "pos", "lat 48.1")
    assert sent.exit_code == 0, sent.output
    lines = await cli("datagram", "send", *ctl(pair.b), "--name", "pos", "--lines", "--json",
                      input="one\ntwo\r\n\nthree")
    assert lines.exit_code == 0, lines.output
    replies = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(replies) == 4 and all(r["accepted"] for r in replies)
    binary = await cli("datagram", "send", *ctl(pair.b), "--name", "raw", input=b"\xff\x00")
    assert binary.exit_code == 0, binary.output
    got = await cli("datagram", "recv", *ctl(pair.a), "--name", "pos", "--count", "5",
                    "--timeout", "20s")
    assert got.exit_code == 0, got.output
    assert got.stdout == "lat 48.1\none\ntwo\n\nthree\n"
    doc = await cli("datagram", "recv", *ctl(pair.a), "--name", "raw", "--count", "1", "--json")
    assert doc.exit_code == 0, doc.output
    item: dict[str, Any] = json.loads(doc.stdout)
    assert item["name"] == "raw" and item["encoding"] == "base64" and item["payload"] == "/wA="
    assert {"sent_at", "received_at", "age"} <= set(item)
    big = await cli("datagram", "send", *ctl(pair.b), "--name", "pos", "x" * 5000)
    assert big.exit_code == 1 and "datagram refused (too_big)" in big.stderr
    late = await cli("datagram", "recv", *ctl(pair.a), "--name", "none", "--count", "1",
                     "--timeout", "0.2")
    assert late.exit_code == 1 and "0 of 1 datagrams" in late.stderr
    usage = await cli("datagram", "send", *ctl(pair.b), "--name", "pos", "--lines", "x")
    assert usage.exit_code == 2
    status = await cli("status", *ctl(pair.b))
    assert "datagrams sent 6, delivered 0, dropped 1 too_big" in status.stdout
