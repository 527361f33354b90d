"""The stream data path through both agents, in large pieces (issue 12).

A stream's bytes cross the writer's Unix socket, the spool, QUIC, the
receiver's sink and the reader's socket. Each hop costs a wake-up and some
Python per piece whatever the piece's size, so each hop moves large pieces:
these tests count the pieces and check that every byte still arrives once,
in order (SHA-256), and that larger pieces loosen no bound (QUIC's high-water
mark per stream).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio

from quelay import client as client_module
from quelay.agent import pipes as pipes_module
from quelay.agent import session as session_module
from quelay.agent.pipes import OutboundPipe
from quelay.client import IncomingStream, open_client
from quelay.control import server as server_module
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.transport.connection import QuicConn
from quelay.transport.memory import MemoryNetwork

from .conftest import attach_reader, start_memory_pair, wait_for

SIZE = 3 * 1024 * 1024 + 12_345  # not a multiple of any piece size


async def test_stream_moves_in_large_pieces_and_arrives_byte_exact(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the control sockets of two agents on the memory network: the server takes
    the writer's bytes in gulps of more than 64 KiB, the pump hands QUIC more than 64 KiB
    per call but never more than SPOOL_CHUNK, and the reader gets every byte once."""
    pipe_writes: list[int] = []
    quic_sends: list[int] = []
    genuine_write = pipes_module.OutboundPipe.write
    genuine_send = QuicConn.send

    async def write(self: pipes_module.OutboundPipe, data: memoryview) -> int:
        taken = await genuine_write(self, data)
        pipe_writes.append(taken)
        return taken

    async def send(self: QuicConn, stream_id: int, data: bytes, end_stream: bool = False
                   ) -> None:
        if data:  # (control frames and the data header go by send_nowait)
            quic_sends.append(len(data))
        await genuine_send(self, stream_id, data, end_stream)

    monkeypatch.setattr(pipes_module.OutboundPipe, "write", write)
    monkeypatch.setattr(QuicConn, "send", send)
    payload = random.Random(7).randbytes(SIZE)
    net = MemoryNetwork(delay=0.01)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    got = hashlib.sha256()
    received = 0
    async with open_client(a.config.control) as ca, open_client(b.config.control) as cb:

        async def reader() -> None:
            nonlocal received
            incoming = await ca.accept_incoming(name="big")
            async for chunk in incoming:
                got.update(chunk)
                received += len(chunk)

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            out = await cb.open_stream(name="big", spool=1024 * 1024)
            view = memoryview(payload)
            while view:  # 1 MiB per send_all: the socket holds what its buffer allows
                await out.send_all(view[:1024 * 1024])
                view = view[1024 * 1024:]
            final = await out.finish()
    assert final["state"] == State.DONE.value
    assert received == SIZE
    assert got.digest() == hashlib.sha256(payload).digest()
    assert sum(pipe_writes) == SIZE and sum(quic_sends) == SIZE
    assert max(pipe_writes) > server_module.READ_CHUNK  # gulps, not 64-KiB reads
    assert max(pipe_writes) <= server_module.RAW_READ_CHUNK
    assert max(quic_sends) > session_module.CHUNK  # the pump's pieces are larger...
    assert max(quic_sends) <= session_module.SPOOL_CHUNK  # ...and bounded


async def test_spool_pump_sends_a_full_spool_in_spool_chunks(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool that is full before the pump starts drains in SPOOL_CHUNK pieces (four
    calls per MiB, not sixteen), in order: the receiver's digest is the writer's."""
    sizes: list[int] = []
    genuine_send = QuicConn.send

    async def send(self: QuicConn, stream_id: int, data: bytes, end_stream: bool = False
                   ) -> None:
        if data:
            sizes.append(len(data))
        await genuine_send(self, stream_id, data, end_stream)

    monkeypatch.setattr(QuicConn, "send", send)
    net = MemoryNetwork(delay=0.01)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    payload = random.Random(3).randbytes(1024 * 1024)
    pipe = OutboundPipe(1024 * 1024)
    assert await pipe.write(memoryview(payload)) == len(payload)  # full before the pump
    pipe.end()
    t = Transfer(wire.new_transfer_id(), "out", "stream", "full", None, 4)
    b.book.submit(t, pipe)
    t_in, reader = await attach_reader(a, t.id)
    got = bytearray()
    with trio.fail_after(60):
        while chunk := await reader.receive_some(1 << 20):
            got += chunk
            if len(got) == len(payload):
                break
        await b.book.wait_finished(t)
    assert t.state is State.DONE and t_in.state is State.DONE
    assert bytes(got) == payload
    assert sizes == [session_module.SPOOL_CHUNK] * 4


async def test_spool_pump_overshoots_the_send_high_water_mark_by_a_chunk_at_most(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Larger pieces must not loosen QUIC's per-stream bound: with the receiver's window
    closed (no reader yet), what QUIC holds stays within send_high_water + CHUNK."""
    high_water = 300 * 1024
    held: list[int] = []
    genuine_send = QuicConn.send

    async def send(self: QuicConn, stream_id: int, data: bytes, end_stream: bool = False
                   ) -> None:
        await genuine_send(self, stream_id, data, end_stream)
        held.append(self.stream_buffered(stream_id))

    monkeypatch.setattr(QuicConn, "send", send)
    net = MemoryNetwork(delay=0.01)
    a, b = await start_memory_pair(nursery, tmp_path, net, send_high_water=high_water,
                                   stream_window=128 * 1024)
    payload = random.Random(5).randbytes(1024 * 1024)
    pipe = OutboundPipe(1024 * 1024)
    assert await pipe.write(memoryview(payload)) == len(payload)
    pipe.end()
    t = Transfer(wire.new_transfer_id(), "out", "stream", "held", None, 4)
    b.book.submit(t, pipe)
    # Nobody reads: the pump fills QUIC up to the mark and waits there.
    await wait_for(lambda: b.session is not None and pipe.spool.queued > 0
                   and b.session.conn.stream_buffered(b.session.data_stream_of(t.id) or 0)
                   >= high_water)
    assert max(held) <= high_water + session_module.CHUNK
    assert pipe.spool.queued < len(payload)  # the rest waits in the spool
    t_in, reader = await attach_reader(a, t.id)
    got = bytearray()
    with trio.fail_after(60):
        while len(got) < len(payload) and (chunk := await reader.receive_some(1 << 20)):
            got += chunk
        await b.book.wait_finished(t)
    assert t.state is State.DONE and bytes(got) == payload
    assert max(held) <= high_water + session_module.CHUNK


async def test_iterating_an_incoming_stream_reads_iter_read_at_a_time() -> None:
    """``async for`` asks the socket for ITER_READ bytes per call; ``receive_some``
    keeps its explicit maximum. Chunks come out in order, and the end is clean."""
    asked: list[int] = []
    parts = [b"a" * 300_000, b"b" * 10, b""]

    class Fake:
        async def receive_some(self, max_bytes: int) -> bytes:
            asked.append(max_bytes)
            return parts.pop(0)[:max_bytes]

    incoming = IncomingStream(Fake(), {"id": "x"}, b"first")  # type: ignore[arg-type]
    chunks = [chunk async for chunk in incoming]
    assert chunks == [b"first", b"a" * client_module.ITER_READ, b"b" * 10]
    assert asked == [client_module.ITER_READ] * 3
    assert incoming.received == 5 + client_module.ITER_READ + 10


async def test_writer_is_held_back_where_its_spool_is_full() -> None:
    """The control server reads a writer's socket in gulps up to RAW_READ_CHUNK while the
    spool has room, but once it is full, what it has read and not yet put in the spool
    stays within a READ_CHUNK (the rest waits in the writer's socket: back-pressure)."""
    capacity = 1024 * 1024
    source = random.Random(9).randbytes(4 * capacity)
    asked: list[int] = []

    class Writer:  # the writer's socket, always ready with more
        taken = 0

        async def receive_some(self, max_bytes: int) -> bytes:
            asked.append(max_bytes)
            data = source[self.taken:self.taken + max_bytes]
            self.taken += len(data)
            return data

    sock = Writer()
    conn = object.__new__(server_module.ClientConnection)
    conn.stream = sock  # type: ignore[assignment]
    pipe = OutboundPipe(capacity)
    t = Transfer(wire.new_transfer_id(), "out", "stream", "w", None, 4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._pump_writer, t, pipe, b"")
        await trio.testing.wait_all_tasks_blocked()
        assert pipe.accepted == capacity  # the spool is full; nobody sends from it
        assert sock.taken - pipe.accepted <= server_module.READ_CHUNK
        assert asked[0] == server_module.RAW_READ_CHUNK  # gulps while there is room
        taken = pipe.read(300_000)  # the pump sends some; their space frees on the ack
        pipe.acked(len(taken))
        await trio.testing.wait_all_tasks_blocked()
        assert pipe.accepted == capacity + len(taken)
        assert sock.taken - pipe.accepted <= server_module.READ_CHUNK
        nursery.cancel_scope.cancel()
    assert pipe.spool.read(capacity) == source[len(taken):pipe.accepted]  # in order


class _CountingSpool:
    """A spool that counts the writer's attempts (each one is a wake-up of the writer)."""

    def __init__(self, spool: object) -> None:
        self._spool = spool
        self.writes = 0

    def write(self, data: memoryview) -> int:
        self.writes += 1
        return self._spool.write(data)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._spool, name)


async def test_a_writer_waiting_for_space_wakes_on_acks_not_on_reads() -> None:
    """The pump's reads free no space (an ack does): they must not wake a writer that
    waits on a full spool, and an ack must. The pump, waiting for bytes, wakes on a
    write and on the end. Bytes leave in the order they came."""
    capacity = 64 * 1024
    pipe = OutboundPipe(capacity)
    spool = _CountingSpool(pipe.spool)
    pipe.spool = spool  # type: ignore[assignment]
    payload = random.Random(11).randbytes(3 * capacity)
    sent = bytearray()

    async def writer() -> None:
        view = memoryview(payload)
        while view:
            view = view[await pipe.write(view):]
        pipe.end()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert pipe.accepted == capacity  # full: the writer waits
        attempts = spool.writes
        for _ in range(4):
            sent += pipe.read(capacity // 4)
            await trio.testing.wait_all_tasks_blocked()
        assert spool.writes == attempts  # four reads, no wake-up of the writer
        pipe.acked(len(sent))
        await trio.testing.wait_all_tasks_blocked()
        assert spool.writes > attempts and pipe.accepted == 2 * capacity  # the ack did
        while not pipe.eof:
            if not pipe.pending:
                await pipe.wait_readable()  # woken by the writer's bytes, then its end
                continue
            sent += pipe.read(capacity)
            pipe.acked(len(sent))
    assert bytes(sent) == payload
