"""The agent-to-agent session over one authenticated QUIC connection.

After TLS has proven both identities, the dialling agent opens the control
stream (bidirectional) and both sides exchange ``Hello``. Control messages
(open, ack, finish, cancel, error) travel as frames on that stream; each
transfer's bytes travel on a unidirectional stream of their own that starts
with a ``DataHeader`` frame. Anything malformed from the peer is a
:class:`RemoteProtocolError`: it fails the transfer it concerns, or ends the
session when it concerns the control stream itself — never the agent.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from . import wire
from .errors import RemoteProtocolError
from .framing import FrameDecoder, encode_frame
from .inbox import UnsafeNameError, safe_name_untrusted
from .transfers import State, Transfer, hash_file
from .transport.connection import ConnectionClosed, InboundStream, QuicConn, StreamReset

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("quelay.session")

CHUNK = 64 * 1024
HELLO_TIMEOUT = 10.0
OPEN_WAIT = 30.0
FSYNC_EVERY = 4 * 1024 * 1024
READER_GRACE = 30.0  # seconds a reader may take to finish a write once the session ended
ACK_EVERY = 64 * 1024


class SessionEnded(Exception):
    pass


class Session:
    def __init__(self, agent: Agent, conn: QuicConn, *, dialer: bool) -> None:
        self.agent = agent
        self.conn = conn
        self.dialer = dialer
        self.peer_hello: wire.Hello | None = None
        self.control_sid: int | None = None
        self._nursery: trio.Nursery | None = None
        self._shields: set[trio.CancelScope] = set()

    # -- sending ---------------------------------------------------------------

    def send(self, msg: wire.Message) -> None:
        """Queue a control message; control frames never wait behind bulk data."""
        assert self.control_sid is not None
        try:
            frame = encode_frame(wire.encode_message(msg), wire.MAX_WIRE_FRAME)
            self.conn.send_nowait(self.control_sid, frame)
        except ConnectionClosed:
            log.debug("not sending %s: connection closed", type(msg).__name__)

    # -- life --------------------------------------------------------------------

    async def run(self) -> None:
        """Hello exchange, then serve until the connection or control stream ends."""
        control = await self._open_control()
        decoder = FrameDecoder(wire.MAX_WIRE_FRAME)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                # On a reconnect the dialler starts at once: TLS has proven the listener,
                # which accepted us before and checks us again before it reads a byte.
                # Resuming a round trip before its hello can arrive is what makes
                # recovery fast on a long link. First contact waits for the hello.
                early = self.dialer and self.agent.peer_epoch is not None
                if early:
                    nursery.start_soon(self._accept_data_streams)
                    self.agent.session_up(self)
                self.peer_hello = await self._read_hello(control, decoder)
                self.agent.peer_identified(self)
                if not early:
                    nursery.start_soon(self._accept_data_streams)
                    self.agent.session_up(self)
                await self._control_loop(control, decoder)
            finally:
                for shield in self._shields:
                    shield.deadline = trio.current_time() + READER_GRACE
                nursery.cancel_scope.cancel()

    async def _read_hello(self, control: InboundStream, decoder: FrameDecoder) -> wire.Hello:
        with trio.fail_after(HELLO_TIMEOUT):
            hello = await self._read_message(control, decoder)
        if not isinstance(hello, wire.Hello):
            raise RemoteProtocolError(f"expected hello, got {type(hello).__name__}")
        if hello.version != wire.PROTOCOL_VERSION:
            self.send(wire.Error(None, "version", f"unsupported version {hello.version}"))
            raise RemoteProtocolError(f"peer speaks protocol version {hello.version}")
        if hello.agent != self.conn.peer_fingerprint:
            raise RemoteProtocolError("hello names an identity other than the TLS certificate")
        return hello

    async def _open_control(self) -> InboundStream:
        if self.dialer:
            sid, control = self.conn.open_bidi()
            self.control_sid = sid
            self._send_hello()
            return control
        with trio.fail_after(HELLO_TIMEOUT):
            control = await self.conn.accept_stream()
        if control.stream_id & 0x2:
            raise RemoteProtocolError("the first stream must be the bidirectional control stream")
        self.control_sid = control.stream_id
        self._send_hello()
        return control

    def _send_hello(self) -> None:
        ident = self.agent.identity
        self.send(wire.Hello(wire.PROTOCOL_VERSION, ident.fingerprint, self.agent.epoch,
                             self.agent.config.name))

    async def _read_message(self, stream: InboundStream, decoder: FrameDecoder) -> wire.Message:
        while True:
            body = decoder.next_frame_untrusted()
            if body is not None:
                return wire.decode_message_untrusted(body)
            data = await stream.receive_some(CHUNK)
            if not data:
                raise SessionEnded("peer closed the control stream")
            decoder.feed(data)

    async def _control_loop(self, control: InboundStream, decoder: FrameDecoder) -> None:
        while True:
            msg = await self._read_message(control, decoder)
            self._dispatch(msg)

    def start_outbound(self, transfer: Transfer) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._pump_out, transfer)

    # -- control messages from the peer -----------------------------------------

    def _dispatch(self, msg: wire.Message) -> None:
        agent = self.agent
        if isinstance(msg, wire.Open):
            self._on_open(msg)
        elif isinstance(msg, wire.Ack):
            t = agent.transfers.get(msg.id)
            if t is None or t.direction != "out":
                return  # late ack for a transfer we forgot: harmless
            self._on_ack(t, msg)
        elif isinstance(msg, wire.Resume):
            # The receiver confirms it knows the transfer and where it stands; we already
            # replay from our last ack (it trims any overlap), so this is informational.
            log.debug("transfer %s: receiver resumes at %d", msg.id, msg.offset)
        elif isinstance(msg, wire.Finish):
            t = agent.transfers.get(msg.id)
            if t is not None and t.direction == "in" and t.finish is None:
                t.finish = msg
                t.finish_seen.set()
        elif isinstance(msg, wire.Cancel):
            t = agent.transfers.get(msg.id)
            if t is not None:
                agent.finish_transfer(t, "canceled", f"canceled by peer: {msg.reason}",
                                      canceled=True)
        elif isinstance(msg, wire.Error):
            if msg.id is None:
                raise SessionEnded(f"peer reported a session error: {msg.code}: {msg.message}")
            t = agent.transfers.get(msg.id)
            if t is not None:
                agent.finish_transfer(t, msg.code, f"peer: {msg.message}")
        elif isinstance(msg, (wire.Hello, wire.DataHeader)):
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} on the control stream")

    def _on_open(self, msg: wire.Open) -> None:
        agent = self.agent
        known = agent.transfers.get(msg.id)
        if msg.resume:
            if known is None or known.direction != "in":
                self.send(wire.Error(msg.id, "unknown_transfer",
                                     "the receiver has no record of this transfer"))
            elif known.terminal:
                self.send(wire.Error(msg.id, "finished", f"the transfer is {known.state.value}"))
            else:
                known.resumes += 1
                known.resumed_from = known.offset
                if known.kind == "file":
                    agent.journal.update(known.id, resumed_from=known.offset)
                self.send(wire.Resume(msg.id, known.offset))
            return
        if known is not None:
            self.send(wire.Error(msg.id, "duplicate", "a transfer with this id exists"))
            return
        t = Transfer(msg.id, "in", msg.kind, msg.name, msg.size, msg.priority, msg.attrs)
        if msg.kind == "file":
            try:
                safe_name_untrusted(msg.name)
            except UnsafeNameError as exc:
                self.send(wire.Error(msg.id, "unsafe_name", str(exc)))
                log.warning("refused incoming file %s: unsafe name: %s", msg.id, exc)
                return
            if msg.size is None:
                self.send(wire.Error(msg.id, "bad_open", "a file transfer must carry its size"))
                return
        if t.kind == "file":
            assert t.size is not None
            agent.journal.record(id=t.id, direction="in", name=t.name, path=None, size=t.size,
                                 priority=t.priority, attrs=t.attrs, state="active")
        agent.add_transfer(t)
        t.move_to(State.ACTIVE)
        agent.publish_transfer("transfer.incoming", t)

    def _on_ack(self, t: Transfer, msg: wire.Ack) -> None:
        if msg.offset > max(t.sent, t.size or 0) or msg.offset < t.offset:
            self.agent.finish_transfer(
                t, "protocol_error", f"peer acked offset {msg.offset} outside {t.offset}..{t.sent}"
            )
            self.send(wire.Error(t.id, "protocol_error", "ack out of range"))
            return
        t.offset = msg.offset
        if t.kind == "file" and not msg.final:
            self.agent.journal_offset(t)
        if t.spool is not None and not t.terminal:
            t.spool.ack(msg.offset)  # within 0..sent, checked above, so within the spool
            t.space.unpark_all()
        if msg.final:
            if t.size is not None and msg.offset == t.size:
                self.agent.complete_transfer(t)
            else:
                self.agent.finish_transfer(t, "protocol_error", "final ack before the end")

    # -- outbound ----------------------------------------------------------------

    async def _pump_out(self, t: Transfer) -> None:
        async with t.busy:  # a pump of an earlier session may still be unwinding
            if not t.terminal:
                await self._pump_out_locked(t)

    async def _pump_out_locked(self, t: Transfer) -> None:
        conn = self.conn
        resume = t.opened
        self.send(wire.Open(t.id, t.kind, t.size if t.kind == "file" else None, t.priority,
                            t.name, t.attrs, resume))
        if not t.opened and t.kind == "file":
            self.agent.journal.update(t.id, opened=1, state="active")
        t.opened = True
        start = 0
        if resume:
            # Replay from the last acknowledged byte without waiting for the receiver's
            # answer: it has delivered at least that much (acks name delivered bytes), so
            # the worst case is a little overlap, which it trims. Saves a round trip.
            start = t.offset
            t.resumes += 1
            t.resumed_from = start
            log.info("transfer %s resumes at byte %d (%d sent before)", t.id, start, t.sent)
            t.sent = start
            if t.spool is not None:
                t.spool.rewind()
        sid = conn.open_stream()
        t.data_stream = sid
        conn.send_nowait(sid, encode_frame(wire.encode_message(wire.DataHeader(t.id, start))))
        try:
            if t.kind == "file":
                await self._pump_file(t, sid)
            else:
                await self._pump_spool(t, sid)
        except (ConnectionClosed, trio.ClosedResourceError):
            return  # the session ended or the transfer left the scheduler
        except OSError as exc:
            self.agent.finish_transfer(t, "io_error", f"reading {t.path}: {exc}")
            self.send(wire.Cancel(t.id, "sender could not read its source"))
            conn.reset_stream(sid)
            return
        if t.terminal:
            conn.reset_stream(sid)
            return
        t.size = t.sent
        if t.kind == "file":
            assert t.path is not None
            # The sender's digest is of the whole file, independent of resumes.
            t.sha256 = (await trio.to_thread.run_sync(hash_file, t.path)).hexdigest()
        else:
            t.sha256 = t.hasher.hexdigest()  # fed by the writer, in order, once per byte
        self.send(wire.Finish(t.id, t.sent, bytes.fromhex(t.sha256)))

    async def _pump_file(self, t: Transfer, sid: int) -> None:
        assert t.path is not None and t.size is not None and t.sched_key is not None
        feed = self.agent.feed
        with open(t.path, "rb") as source:
            source.seek(t.sent)
            while not t.terminal and t.sent < t.size:
                remaining = t.size - t.sent
                allowed = await feed.acquire(t.sched_key, min(CHUNK, remaining), remaining)
                chunk = source.read(allowed)
                if not chunk:
                    raise OSError(f"file shrank while sending ({t.sent} of {t.size} bytes)")
                await self.conn.send(sid, chunk)
                t.sent += len(chunk)
            if not t.terminal and source.read(1):
                raise OSError(f"file grew while sending (more than {t.size} bytes)")
        if not t.terminal:
            await self.conn.send(sid, b"", end_stream=True)

    async def _pump_spool(self, t: Transfer, sid: int) -> None:
        assert t.sched_key is not None
        spool = t.spool
        feed = self.agent.feed
        while not t.terminal:
            if spool.pending:
                allowed = await feed.acquire(t.sched_key, min(spool.pending, CHUNK),
                                             spool.pending)
                chunk = spool.read(allowed)
                await self.conn.send(sid, chunk)
                t.sent += len(chunk)
                t.space.unpark_all()
            elif spool.eof:
                await self.conn.send(sid, b"", end_stream=True)
                return
            else:
                feed.idle(t.sched_key)
                await t.space.park()

    def unsent_bulk(self) -> int:
        """Bytes the pumps handed to QUIC that have not been put in a packet yet."""
        quic = self.conn.quic
        return sum(
            quic.stream_unsent(t.data_stream)
            for t in self.agent.transfers.values()
            if t.direction == "out" and t.data_stream is not None and not t.terminal
        )

    # -- inbound -----------------------------------------------------------------

    async def _accept_data_streams(self) -> None:
        assert self._nursery is not None
        while True:
            stream = await self.conn.accept_stream()
            if not stream.stream_id & 0x2:
                raise RemoteProtocolError("peer opened an extra bidirectional stream")
            self._nursery.start_soon(self._serve_data_stream, stream)

    async def _serve_data_stream(self, stream: InboundStream) -> None:
        decoder = FrameDecoder(wire.MAX_WIRE_FRAME)
        t: Transfer | None = None
        try:
            header = await self._read_message(stream, decoder)
            if not isinstance(header, wire.DataHeader):
                raise RemoteProtocolError("a data stream must start with a data header")
            t = await self._wait_for_open(header.id)
            async with t.busy:  # the sink of an earlier session may still be unwinding
                if t.terminal:
                    return
                if header.offset > t.offset:
                    raise RemoteProtocolError(
                        f"gap: data resumes at byte {header.offset}, "
                        f"only {t.offset} were delivered")
                leftover = await self._skip(stream, decoder.take_rest(), t.offset - header.offset)
                if t.kind == "file":
                    await self._sink_file(t, stream, leftover)
                else:
                    await self._sink_stream(t, stream, leftover)
        except (RemoteProtocolError, SessionEnded) as exc:
            log.warning("data stream %d: %s", stream.stream_id, exc)
            if t is not None:
                self.agent.finish_transfer(t, "protocol_error", str(exc))
                self.send(wire.Error(t.id, "protocol_error", str(exc)))
        except StreamReset as exc:
            if t is not None:
                self.agent.finish_transfer(t, "reset", str(exc))
        except ConnectionClosed:
            return
        finally:
            self.conn.discard_stream(stream.stream_id)

    async def _skip(self, stream: InboundStream, first: bytes, overlap: int) -> bytes:
        """Discard replayed bytes the reader already has (a resume may overlap)."""
        data = first
        while overlap > 0:
            if not data:
                data = await stream.receive_some(min(overlap, 256 * 1024))
                if not data:
                    raise RemoteProtocolError("data stream ended inside the replayed overlap")
            cut = min(overlap, len(data))
            data, overlap = data[cut:], overlap - cut
        return data

    async def _wait_for_open(self, transfer_id: str) -> Transfer:
        with trio.move_on_after(OPEN_WAIT):
            while True:
                t = self.agent.transfers.get(transfer_id)
                if t is not None and t.direction == "in":
                    if t.terminal:
                        raise RemoteProtocolError(f"data for finished transfer {transfer_id}")
                    return t
                await self.agent.transfer_added.park()
        raise RemoteProtocolError(f"data for unknown transfer {transfer_id}")

    def _ack(self, t: Transfer, final: bool = False) -> None:
        self.send(wire.Ack(t.id, t.offset, final))

    async def _take(self, stream: InboundStream, leftover: list[bytes]) -> bytes:
        if leftover:
            return leftover.pop()
        return await stream.receive_some(256 * 1024)

    async def _sink_file(self, t: Transfer, stream: InboundStream, first: bytes) -> None:
        inbox = self.agent.inbox
        partial = inbox.partial_path(t.id)
        assert t.size is not None
        pending = [first] if first else []
        synced = t.offset
        try:
            with open(partial, "r+b" if t.offset else "wb") as out:
                out.truncate(t.offset)
                out.seek(t.offset)
                while True:
                    chunk = await self._take(stream, pending)
                    if not chunk:
                        break
                    if t.offset + len(chunk) > t.size:
                        raise RemoteProtocolError("file data beyond its announced size")
                    out.write(chunk)
                    t.hasher.update(chunk)
                    t.offset += len(chunk)
                    if t.offset - synced >= FSYNC_EVERY or stream.buffered == 0:
                        out.flush()
                        await trio.to_thread.run_sync(os.fsync, out.fileno())
                        synced = t.offset
                        self.agent.journal_offset(t)  # durable on disk, then in the journal,
                        self._ack(t)  # then acknowledged
                out.flush()
                await trio.to_thread.run_sync(os.fsync, out.fileno())
            await self._verify(t)
            final = inbox.finalize(partial, t.name)
        except (RemoteProtocolError, StreamReset, OSError):
            inbox.discard(partial)  # the transfer fails: its partial file is garbage
            raise
        t.path = str(final)
        self.agent.complete_transfer(t)
        self._ack(t, final=True)

    async def _sink_stream(self, t: Transfer, stream: InboundStream, first: bytes) -> None:
        await t.reader_ready.wait()
        reader = t.reader
        pending = [first] if first else []
        acked = t.offset
        try:
            while True:
                chunk = await self._take(stream, pending)
                if not chunk:
                    break
                # Shielded: a write cut in half by the session ending would leave us not
                # knowing how much the reader got, and the resume would duplicate it.
                # When the session ends, the shield gets a grace deadline (see run()).
                with trio.CancelScope(shield=True) as shield:
                    self._shields.add(shield)
                    try:
                        await reader.send_all(chunk)
                    finally:
                        self._shields.discard(shield)
                if shield.cancelled_caught:
                    raise trio.TooSlowError
                t.hasher.update(chunk)
                t.offset += len(chunk)
                if t.offset - acked >= ACK_EVERY or stream.buffered == 0:
                    acked = t.offset
                    self._ack(t)
        except trio.TooSlowError as exc:
            self.agent.finish_transfer(t, "reader_stalled", "the local reader stopped reading")
            self.send(wire.Cancel(t.id, "the receiving reader stalled"))
            raise ConnectionClosed("reader stalled") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.agent.finish_transfer(t, "reader_gone", "the local reader disconnected")
            self.send(wire.Cancel(t.id, "the receiving reader disconnected"))
            raise ConnectionClosed("reader gone") from exc
        await self._verify(t)
        self.agent.complete_transfer(t)
        self._ack(t, final=True)

    async def _verify(self, t: Transfer) -> None:
        with trio.move_on_after(OPEN_WAIT):
            await t.finish_seen.wait()
        finish = t.finish
        if not isinstance(finish, wire.Finish):
            raise RemoteProtocolError("the data stream ended but no finish message came")
        if finish.total != t.offset:
            raise RemoteProtocolError(f"peer sent {finish.total} bytes, we received {t.offset}")
        if finish.sha256 != t.hasher.digest():
            raise RemoteProtocolError("SHA-256 mismatch: the received bytes differ from the sent")
        t.size = finish.total
        t.sha256 = finish.sha256.hex()


