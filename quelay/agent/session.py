"""The Trio driver of one session: performs what the peer protocol decides.

After TLS has proven both identities, the dialling agent opens the control
stream (bidirectional) and both sides exchange ``Hello``. From then on every
decision about transfers is made by the sans-IO
:class:`~quelay.core.peer.PeerProtocol`; this module only moves bytes and
performs its actions: frames onto the control stream, one pump task per
outbound transfer (file or spool → QUIC), one sink task per incoming data
stream (QUIC → fsynced partial file, or → the attached reader), journal
writes and inbox renames. Anything malformed from the peer costs the
transfer it names; only a control-stream violation naming no transfer ends
the session — never the agent.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import trio

from ..core import messages as m
from ..core import peer as pp
from ..core.codes import Failure, StallReason
from ..core.transfer import PeerTable, Transfer
from ..errors import QuelayError, RemoteProtocolError
from ..framing import FrameDecoder, encode_frame
from ..transport.connection import ConnectionClosed, InboundStream, QuicConn, StreamReset
from .book import Runtime, TransferBook, source_stat
from .datagrams import DatagramService
from .exports import ExportError, Exports
from .filehash import hash_file
from .inbox import InboxError, UnsafeNameError
from .pipes import PipeAborted

log = logging.getLogger("quelay.session")

CHUNK = 64 * 1024
#: The most a stream's pump hands QUIC in one call. Larger than CHUNK: the spool already
#: holds the bytes, and each call costs a grant, a copy out of the ring, a send and a
#: transmit wake-up whatever its size (a 1 MiB spool drains in 4 calls, not 16). Near
#: the send high-water mark the piece shrinks, so the mark is overshot by a CHUNK at most.
SPOOL_CHUNK = 256 * 1024
HELLO_TIMEOUT = 10.0
OPEN_WAIT = 30.0
FSYNC_EVERY = 4 * 1024 * 1024
#: Bytes all incoming files of a session may hold waiting for the disk: past it, each
#: sink takes one chunk at a time (so a thousand files never hold 4 MiB batches each).
SINK_BUDGET = 32 * 1024 * 1024
READER_GRACE = 30.0  # seconds a reader may take to finish a write once the session ended
ACK_EVERY = 64 * 1024
# A stream's delivered bytes are acknowledged every ACK_EVERY bytes, and within this
# long once its buffer runs dry: not at every chunk that empties the buffer (with a
# thousand streams that was nearly every chunk), and with no timer per chunk (one
# session task acknowledges every such stream at once).
ACK_LINGER = 0.05
#: A data stream's header is read this much at a time: the bytes behind it stay in QUIC,
#: unconsumed and uncredited, until the transfer's sink takes them (a stream that waits
#: for its open or its reader holds no more than this).
HEADER_READ = 512
JOURNAL_SENT_EVERY = 8 * 1024 * 1024
STALL_CHECK = 1.0  # how often a stalled incoming file looks for space again

#: errno values that mean "the inbox's disk is full": back-pressure, not failure.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
#: errno values after which an incoming file waits for the operator instead of failing.
_STALL_ERRNOS = _NO_SPACE | {errno.ENOENT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO}


class SessionEnded(QuelayError):
    """The peer closed the control stream or reported a session-level error."""


class UntrustedPeer(RemoteProtocolError):
    """A resumed connection's peer did not prove the identity its ticket stands for."""


class AgentPort(Protocol):
    """What a session needs from its agent (and nothing more)."""

    @property
    def label(self) -> str: ...

    def hello(self, conn: QuicConn) -> m.Hello: ...
    def check_proof(self, conn: QuicConn, hello: m.Hello) -> str | None: ...
    def session_up(self, session: Session) -> None: ...
    def peer_identified(self, session: Session) -> None: ...


class FeedPort(Protocol):
    async def acquire(self, key: int, want: int, backlog: int | None = None) -> int: ...
    def idle(self, key: int) -> None: ...


@dataclass(frozen=True)
class IncomingPolicy:
    """How incoming files treat a full or missing inbox (see docs/operations.md)."""

    min_free: int = 64 * 1024 * 1024  # bytes that must stay free under the inbox
    stall_timeout: float = 3600.0  # a stall longer than this fails the transfer
    max_incoming: int = 16384  # live incoming transfers; more are answered "busy"


class Session:
    def __init__(self, agent: AgentPort, book: TransferBook, feed: FeedPort, conn: QuicConn, *,
                 dialer: bool, early: bool, policy: IncomingPolicy | None = None,
                 free_bytes: Callable[[Path], int] | None = None,
                 exports: Exports | None = None,
                 datagrams: DatagramService | None = None,
                 peer: str = "", shared: bool = False) -> None:
        """``peer`` names the link (its transfers carry it); ``shared``: the book holds
        other links' transfers too (a hub), so this session sees only its own."""
        self.agent = agent
        self.book = book
        self.feed = feed
        self.conn = conn
        self.dialer = dialer
        self.early = early  # a reconnect: start before the peer's hello arrives
        self.policy = policy or IncomingPolicy()
        self.peer = peer
        self.table = PeerTable(book.table, peer) if shared else book.table
        self.protocol = pp.PeerProtocol(self.table, max_incoming=self.policy.max_incoming)
        self.peer_hello: m.Hello | None = None
        self.control_sid: int | None = None
        self._sent_on: dict[str, list[int]] = {}  # outbound transfer -> its data streams
        self._free_bytes = free_bytes or _free_bytes
        self._nursery: trio.Nursery | None = None
        self._shields: set[trio.CancelScope] = set()
        self._pumps: dict[str, tuple[trio.CancelScope, int]] = {}  # id -> (scope, stream)
        self.sink_held = _Held()  # bytes incoming files hold in memory (SINK_BUDGET)
        self.exports = exports
        self.datagrams = datagrams  # best-effort datagrams: sent while this session is up
        self._listings: dict[int, tuple[trio.Event, list[m.Exports]]] = {}
        self._rids = itertools.count(1)
        self._acked: dict[str, int] = {}  # incoming stream -> the offset last acknowledged
        self._ack_due: dict[str, Transfer] = {}  # streams whose ack waits for ACK_LINGER
        self._ack_wake = trio.Event()

    # -- sending -------------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        """Queue a control message; control frames never wait behind bulk data."""
        assert self.control_sid is not None
        try:
            frame = encode_frame(m.encode_message(msg), m.MAX_WIRE_FRAME)
            self.conn.send_nowait(self.control_sid, frame)
        except ConnectionClosed:
            log.debug("not sending %s: connection closed", type(msg).__name__)

    def perform(self, actions: list[pp.Action]) -> None:
        """Carry out the protocol's actions, in order."""
        book = self.book
        for action in actions:
            if isinstance(action, pp.Send):
                self.send(action.message)
            elif isinstance(action, pp.StartSending):
                self._start_pump(action.transfer, action.offset)
            elif isinstance(action, pp.StopSending):
                self._stop_pump(action.transfer)
            elif isinstance(action, pp.Created):
                book.add_incoming(action.transfer)
            elif isinstance(action, pp.Persist):
                self._persist([action])
            elif isinstance(action, pp.Acked):
                self._on_acked(action.transfer)
            elif isinstance(action, pp.Finalize):
                assert self._nursery is not None
                self._nursery.start_soon(self._finalize, action.transfer)
            elif isinstance(action, pp.Completed):
                book.completed(action.transfer)
            elif isinstance(action, pp.Ended):
                book.ended(action.transfer)
            elif isinstance(action, pp.Requeue):
                book.requeue(action.transfer, action.delay)
            elif isinstance(action, pp.ServeFetch):
                self._serve_fetch(action.request)
            elif isinstance(action, pp.ServeListing):
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_listing, action.request)
            elif isinstance(action, pp.ListingArrived):
                waiter = self._listings.get(action.reply.rid)
                if waiter is not None:
                    waiter[1].append(action.reply)
                    waiter[0].set()

    # -- LinkPort (called by the book) --------------------------------------------------

    @property
    def ready(self) -> bool:
        """New transfers start here unless the connection is held through an outage."""
        return not self.conn.silent

    def transfer_started(self, t: Transfer) -> None:
        self.perform(self.protocol.announce(t))

    def transfer_ended(self, t: Transfer) -> None:
        self._stop_pump(t)
        self.perform(self.protocol.flush_notices())

    def fetch_requested(self, t: Transfer) -> None:
        self.perform(self.protocol.request_fetch(t))

    async def list_remote(self, timeout: float = 30.0) -> list[dict[str, object]]:
        """Every file the peer exports (page by page); raises ``ExportError`` on refusal."""
        entries: list[dict[str, object]] = []
        cursor: int | None = 0
        with trio.fail_after(timeout):
            while cursor is not None:
                rid = next(self._rids)
                done = trio.Event()
                replies: list[m.Exports] = []
                self._listings[rid] = (done, replies)
                try:
                    self.send(m.ListExports(rid, cursor))
                    await done.wait()
                finally:
                    del self._listings[rid]
                reply = replies[0]
                if reply.error is not None:
                    raise ExportError("refused", reply.error)
                entries.extend(reply.entries)
                cursor = reply.next
        return entries

    # -- serving the peer's pulls -------------------------------------------------------

    def _serve_fetch(self, request: m.Fetch) -> None:
        """Resolve a fetched name inside our exports and send it like any file."""
        try:
            if self.exports is None or not self.exports.roots:
                raise ExportError("refused", "this agent exports nothing")
            found = self.exports.resolve_untrusted(request.export, request.name)
        except ExportError as exc:
            log.warning("%s: refused fetch of %r: %s", self.agent.label, request.name, exc)
            self.send(m.Error(request.id, exc.code, exc.message))
            return
        if request.id in self.table:  # (any link's: ids are unique in the book)
            self.send(m.Error(request.id, Failure.DUPLICATE.value,
                              "a transfer with this id exists"))
            return
        t = Transfer(request.id, "out", "file", PurePosixPath(request.name).name, found.size,
                     request.priority, peer=self.peer)
        t.path = str(found.path)
        t.source = (found.size, found.mtime_ns, found.inode)
        log.info("%s: the peer fetches %s", self.agent.label, found.path)
        self.book.submit(t)

    async def _serve_listing(self, request: m.ListExports) -> None:
        if self.exports is None or not self.exports.roots:
            self.send(m.Exports(request.rid, [], None, "this agent exports nothing"))
            return
        entries = await trio.to_thread.run_sync(self.exports.listing)
        page = entries[request.cursor:request.cursor + m.MAX_EXPORT_ENTRIES]
        following = request.cursor + len(page)
        self.send(m.Exports(request.rid, page,
                            following if following < len(entries) else None))

    # -- life ------------------------------------------------------------------------

    async def run(self) -> None:
        """Hello exchange, then serve until the connection or control stream ends."""
        control = await self._open_control()
        decoder = FrameDecoder(m.MAX_WIRE_FRAME)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                # On a reconnect the dialler starts at once: TLS has proven the listener,
                # which accepted us before and checks us again before it reads a byte.
                # Resuming a round trip before its hello can arrive is what makes
                # recovery fast on a long link. First contact waits for the hello.
                if self.early:
                    self._go(nursery)
                self.peer_hello = await self._read_hello(control, decoder)
                self.agent.peer_identified(self)
                if not self.early:
                    self._go(nursery)
                await self._control_loop(control, decoder)
            finally:
                for shield in self._shields:
                    shield.deadline = trio.current_time() + READER_GRACE
                nursery.cancel_scope.cancel()

    def _go(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._accept_data_streams)
        nursery.start_soon(self._acknowledge_streams)
        if self.datagrams is not None:  # attached at once: a client may send right away
            self.datagrams.attach(self.conn)
            nursery.start_soon(self.datagrams.serve, self.conn)
        self.agent.session_up(self)  # the book's link is now this session
        self.perform(self.protocol.start())
        self.book.fill()

    async def _read_hello(self, control: InboundStream, decoder: FrameDecoder) -> m.Hello:
        with trio.fail_after(HELLO_TIMEOUT):
            hello = await self._read_message(control, decoder)
        if not isinstance(hello, m.Hello):
            raise RemoteProtocolError(f"expected hello, got {type(hello).__name__}")
        if hello.version != m.PROTOCOL_VERSION:
            self.send(m.Error(None, Failure.VERSION.value,
                              f"unsupported version {hello.version}"))
            raise RemoteProtocolError(f"peer speaks protocol version {hello.version}")
        if self.conn.resumed:  # first: a failed proof is an untrusted peer, whatever it claims
            problem = self.agent.check_proof(self.conn, hello)
            if problem is not None:
                raise UntrustedPeer(problem)
        if hello.agent != self.conn.peer_fingerprint:
            raise RemoteProtocolError("hello names an identity other than the TLS certificate")
        return hello

    async def _open_control(self) -> InboundStream:
        if self.dialer:
            sid, control = self.conn.open_bidi()
            self.control_sid = sid
            self.conn.quic.urgent_streams.add(sid)
            self.send(self.agent.hello(self.conn))
            return control
        with trio.fail_after(HELLO_TIMEOUT):
            control = await self.conn.accept_stream()
        if control.stream_id & 0x2:
            raise RemoteProtocolError("the first stream must be the bidirectional control stream")
        self.control_sid = control.stream_id
        self.conn.quic.urgent_streams.add(control.stream_id)
        self.send(self.agent.hello(self.conn))
        return control

    async def _read_message(self, stream: InboundStream, decoder: FrameDecoder,
                            chunk: int = CHUNK) -> m.Message:
        while True:
            body = decoder.next_frame_untrusted()
            if body is not None:
                return m.decode_message_untrusted(body)
            data = await stream.receive_some(chunk)
            if not data:
                raise SessionEnded("peer closed the control stream")
            decoder.feed(data)

    async def _control_loop(self, control: InboundStream, decoder: FrameDecoder) -> None:
        while True:
            try:
                msg = await self._read_message(control, decoder)
            except m.TransferProtocolError as exc:
                self.book.stats.peer_refused("invalid_message")
                log.warning("%s: invalid message for transfer %s: %s", self.agent.label,
                            exc.transfer_id, exc)
                self.perform(self.protocol.refused(exc.transfer_id, str(exc)))
                continue
            if isinstance(msg, (m.Hello, m.DataHeader)):
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} on the control stream")
            self.perform(self.protocol.receive(msg))

    # -- outbound --------------------------------------------------------------------

    def _start_pump(self, t: Transfer, start: int) -> None:
        assert self._nursery is not None
        self._stop_pump(t)
        self._nursery.start_soon(self._pump, t, start)

    def _stop_pump(self, t: Transfer) -> None:
        entry = self._pumps.pop(t.id, None)
        if entry is not None:
            scope, sid = entry
            scope.cancel()
            self.conn.reset_stream(sid)

    def _on_acked(self, t: Transfer) -> None:
        rt = self.book.runtime(t)
        if rt.out is not None:
            rt.out.acked(t.delivered)
        elif t.journaled and t.delivered - rt.journaled >= JOURNAL_SENT_EVERY:
            # The sender's journal only saves replay after its own restart (the
            # receiver's offset is the truth then): no need to write every ack.
            rt.journaled = t.delivered
            self.book.journal.update(t.id, offset=t.delivered)

    async def _pump(self, t: Transfer, start: int) -> None:
        rt = self.book.runtime(t)
        async with rt.lock:  # a pump of an earlier session may still be unwinding
            if t.terminal or rt.feed_key is None:
                return
            # Only now: an unwinding pump of the previous session may have moved it.
            t.sent = start
            digest: bytes | None = None
            with trio.CancelScope() as scope:  # cancelled by StopSending
                sid = self.conn.open_stream()
                self._pumps[t.id] = (scope, sid)
                self._sent_on.setdefault(t.id, []).append(sid)
                try:
                    digest = await self._pump_bytes(t, rt, sid, start)
                except (ConnectionClosed, trio.ClosedResourceError, PipeAborted):
                    return  # the session ended or the transfer left the scheduler
                except _SourceChanged as exc:
                    self.book.fail(t, Failure.SOURCE_CHANGED, str(exc))
                    return
                except OSError as exc:
                    self.book.fail(t, Failure.IO_ERROR, f"reading {t.path}: {exc}")
                    return
                except Exception as exc:  # a bug here costs this transfer, not the session
                    log.exception("transfer %s: sending failed", t.id)
                    self.book.fail(t, Failure.INTERNAL, f"internal error while sending: {exc!r}")
                    return
                finally:
                    if self._pumps.get(t.id, (None, None))[0] is scope:
                        del self._pumps[t.id]
            if digest is not None and not t.terminal:
                self.perform(self.protocol.sent_all(t, t.sent, digest))

    async def _pump_bytes(self, t: Transfer, rt: Runtime, sid: int, start: int) -> bytes | None:
        if start:
            log.info("transfer %s resumes at byte %d", t.id, start)
        self.conn.send_nowait(sid, encode_frame(m.encode_message(m.DataHeader(t.id, start))))
        if t.kind == "file":
            digest = await self._pump_file(t, rt, sid)
            _check_source(t)
            return digest
        assert rt.out is not None
        if start or t.resumes:
            rt.out.rewind()
        await self._pump_spool(t, rt, sid)
        return rt.out.digest()

    async def _pump_file(self, t: Transfer, rt: Runtime, sid: int) -> bytes:
        """Send the file from ``t.sent``; return the SHA-256 of the whole file.

        The digest is of the whole file, independent of resumes: the bytes are
        hashed as they are read (one pass over the file, not a second one at
        the end), after the part sent before a resume, hashed first.
        """
        assert t.path is not None and t.size is not None and rt.feed_key is not None
        _check_source(t)
        hasher = hashlib.sha256()
        if t.sent:
            await trio.to_thread.run_sync(hash_file, t.path, hasher, t.sent)
        with open(t.path, "rb") as source:
            source.seek(t.sent)
            while t.sent < t.size:
                remaining = t.size - t.sent
                allowed = await self.feed.acquire(rt.feed_key, min(CHUNK, remaining), remaining)
                chunk = source.read(allowed)
                if not chunk:
                    raise _SourceChanged(f"{t.path} shrank while sending "
                                         f"({t.sent} of {t.size} bytes)")
                hasher.update(chunk)
                await self.conn.send(sid, chunk)
                t.sent += len(chunk)
                t.sent_high = max(t.sent_high, t.sent)
            if source.read(1):
                raise _SourceChanged(f"{t.path} grew while sending (more than {t.size} bytes)")
        await self.conn.send(sid, b"", end_stream=True)
        return hasher.digest()

    async def _pump_spool(self, t: Transfer, rt: Runtime, sid: int) -> None:
        assert rt.feed_key is not None and rt.out is not None
        pipe = rt.out
        while True:
            if pipe.pending:
                # Up to SPOOL_CHUNK, but no further past QUIC's high-water mark than a
                # CHUNK (conn.send waits below the mark, then takes the whole piece).
                room = self.conn.send_high_water - self.conn.stream_buffered(sid)
                want = min(pipe.pending, max(CHUNK, min(SPOOL_CHUNK, room)))
                allowed = await self.feed.acquire(rt.feed_key, want, pipe.pending)
                chunk = pipe.read(allowed)
                await self.conn.send(sid, chunk)
                t.sent += len(chunk)
                t.sent_high = max(t.sent_high, t.sent)
            elif pipe.eof:
                await self.conn.send(sid, b"", end_stream=True)
                return
            else:
                self.feed.idle(rt.feed_key)
                await pipe.wait_readable()

    def transfer_stats(self, transfer_id: str) -> tuple[int, int]:
        """(bytes in flight, bytes retransmitted) of an outbound transfer on this connection."""
        sids = self._sent_on.get(transfer_id)
        if not sids:
            return 0, 0
        quic = self.conn.quic
        retransmitted = sum(quic.retransmitted_by_stream.get(sid, 0) for sid in sids)
        return quic.stream_in_flight(sids[-1]), retransmitted

    def forget_stats(self, transfer_id: str) -> None:
        self._sent_on.pop(transfer_id, None)

    def stats_of_all(self) -> dict[str, tuple[int, int]]:
        """:meth:`transfer_stats` of every transfer this connection carried."""
        return {tid: self.transfer_stats(tid) for tid in self._sent_on}

    def data_stream_of(self, transfer_id: str) -> int | None:
        """The QUIC stream carrying an outbound transfer's bytes this session, if any."""
        entry = self._pumps.get(transfer_id)
        return None if entry is None else entry[1]

    def unsent_bulk(self) -> int:
        """Bytes the pumps handed to QUIC that have not been put in a packet yet."""
        return self.conn.quic.unsent_except(self.conn.quic.urgent_streams)

    # -- inbound ---------------------------------------------------------------------

    async def _accept_data_streams(self) -> None:
        assert self._nursery is not None
        while True:
            stream = await self.conn.accept_stream()
            if not stream.stream_id & 0x2:
                raise RemoteProtocolError("peer opened an extra bidirectional stream")
            self._nursery.start_soon(self._serve_data_stream, stream)

    async def _serve_data_stream(self, stream: InboundStream) -> None:
        decoder = FrameDecoder(m.MAX_WIRE_FRAME)
        named: str | None = None  # the transfer this stream carries, once known
        try:
            try:
                header = await self._read_message(stream, decoder, HEADER_READ)
            except RemoteProtocolError as exc:
                tid = getattr(exc, "transfer_id", None)
                if tid is not None:
                    self.perform(self.protocol.refused(tid, str(exc)))
                self.book.stats.peer_refused("bad_data_stream")
                log.warning("data stream %d: %s", stream.stream_id, exc)
                return
            if not isinstance(header, m.DataHeader):
                self.book.stats.peer_refused("bad_data_stream")
                log.warning("data stream %d does not start with a data header", stream.stream_id)
                return
            named = header.id
            decision = await self._wait_for_open(header)
            if isinstance(decision, pp.Refuse):
                self.book.stats.peer_refused("refused_data_stream")
                log.warning("data stream %d for %s refused: %s", stream.stream_id, header.id,
                            decision.reason)
                self.perform(decision.actions)
                return
            t = decision.transfer
            rt = self.book.runtime(t)
            async with rt.lock:  # the sink of an earlier session may still be unwinding
                again = self.protocol.data_header(header)  # things may have moved meanwhile
                if not isinstance(again, pp.Accept):
                    return
                decision = again
                try:
                    leftover = await _skip(stream, decoder.take_rest(), decision.skip)
                except RemoteProtocolError as exc:
                    self.perform(self.protocol.data_failed(t, str(exc)))
                    return
                if t.kind == "file":
                    await self._sink_file(t, rt, stream, leftover)
                else:
                    await self._sink_stream(t, rt, stream, leftover)
        except StreamReset:
            return  # no verdict: a cancel or error, if any, comes on the control stream
        except (ConnectionClosed, SessionEnded):
            return
        except Exception as exc:  # a bug here costs this transfer, not the session
            log.exception("data stream %d failed", stream.stream_id)
            t_bad = self.table.get(named) if named is not None else None
            if t_bad is not None:
                self.book.fail(t_bad, Failure.INTERNAL, f"internal error while receiving: {exc!r}")
        finally:
            self.conn.discard_stream(stream.stream_id)

    async def _wait_for_open(self, header: m.DataHeader) -> pp.Accept | pp.Refuse:
        """The data stream may overtake its ``open`` (another QUIC stream): wait for it."""
        with trio.move_on_after(OPEN_WAIT):
            while True:
                decision = self.protocol.data_header(header)
                if not isinstance(decision, pp.WaitForOpen):
                    return decision
                await self.book.added.park()
        return pp.Refuse(f"no open for transfer {header.id} within {OPEN_WAIT:.0f} s", [])

    async def _take(self, stream: InboundStream, leftover: list[bytes]) -> bytes:
        if leftover:
            return leftover.pop()
        return await stream.receive_some(256 * 1024)

    async def _sink_file(self, t: Transfer, rt: Runtime, stream: InboundStream,
                         pending: list[bytes]) -> None:
        """QUIC → partial file, by group commit: while one batch is written, fsynced,
        journaled and acked (worker threads), the next one accumulates.

        A batch is what arrived during the previous commit, at most
        :data:`FSYNC_EVERY` bytes: at a high rate batches grow and fsyncs are
        few; at a low rate each arrival is committed (and acked) at once. With a
        full batch waiting, the sink stops consuming (no QUIC credit: the sender
        waits), so a stalled disk holds the sender back as before.
        """
        if t.delivered == 0 and not await self._write_durably(t, rt, [], 0):
            return  # (creates the partial file, so even an empty file has one)
        batches = _Batches(t.delivered, self.sink_held)
        raised: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit_batches, t, rt, batches, nursery.cancel_scope)
                try:
                    while not t.terminal:
                        # Past the session's budget only a sink with nothing waiting reads.
                        while batches.size >= FSYNC_EVERY or (
                                batches.size and self.sink_held.bytes >= SINK_BUDGET):
                            await batches.changed.park()
                        chunk = await self._take(stream, pending)
                        if not chunk:
                            batches.end()
                            break
                        # (t.delivered moves as batches commit; batches.received does not wait)
                        refused = self.protocol.check_incoming(
                            t, batches.received + len(chunk) - t.delivered)
                        if refused:
                            self.perform(refused)
                            break
                        batches.add(chunk)
                except (StreamReset, ConnectionClosed, SessionEnded) as exc:
                    raised = exc  # re-raised outside the nursery (not as an exception group)
                if not batches.ended:
                    nursery.cancel_scope.cancel()
        finally:
            batches.drop()  # what a cancelled commit left is no longer held
        if raised is not None:
            raise raised
        if batches.ended and batches.committed and not t.terminal:
            self.perform(self.protocol.data_ended(t, rt.hasher.digest()))

    async def _commit_batches(self, t: Transfer, rt: Runtime, batches: _Batches,
                              scope: trio.CancelScope) -> None:
        """The committing half of :meth:`_sink_file`: one batch at a time, in order."""
        while True:
            while not batches.size and not batches.ended:
                await batches.changed.park()
            if not batches.size:
                batches.committed = True  # ended, and everything is on disk
                return
            chunks, size = batches.take()
            if not await self._write_durably(t, rt, chunks, size):
                scope.cancel()
                return

    async def _write_durably(self, t: Transfer, rt: Runtime, batch: list[bytes],
                             size: int) -> bool:
        """Write and fsync ``batch`` at the delivered offset, stalling while the disk can't.

        The bytes stay in memory (and unconsumed bytes stay in QUIC, uncredited)
        until they are on disk: a full disk holds the sender back, it never
        loses data. ``False`` if the transfer ended meanwhile.
        """
        partial = self.book.inbox.partial_path(t.id)
        while not t.terminal:
            reason = self._stall_reason(size)
            if reason is None:
                try:
                    # Written, fsynced and hashed in a worker thread (hashlib drops the
                    # GIL): the event loop keeps receiving meanwhile.
                    await trio.to_thread.run_sync(_write_at, partial, t.delivered, batch,
                                                  rt.hasher)
                except OSError as exc:
                    log.warning("transfer %s: writing %s: %s", t.id, partial, exc)
                    if exc.errno not in _STALL_ERRNOS:
                        self.book.fail(t, Failure.IO_ERROR, f"writing the partial file: {exc}")
                        return False
                    reason = self._stall_reason_for(exc)
                else:
                    # On disk. The digest, the offset and the journal move together:
                    # a session ending here must not leave them disagreeing.
                    # (_write_at hashed the batch once it was durable.)
                    with trio.CancelScope(shield=True):
                        if size:
                            actions = self.protocol.delivered(t, t.delivered + size)
                            # durable in the journal (in a worker thread: an fsync never
                            # stalls the event loop), then acknowledged
                            await trio.to_thread.run_sync(self._persist, actions)
                            self.perform([a for a in actions if not isinstance(a, pp.Persist)])
                    if t.stall is not None:
                        self._unstall(t)
                    return True
            if not await self._stall(t, reason):
                return False
        return False

    def _persist(self, actions: list[pp.Action]) -> None:
        """Perform the ``Persist`` actions among ``actions`` (runs in a worker thread)."""
        for action in actions:
            if isinstance(action, pp.Persist) and action.transfer.journaled:
                self.book.journal.update(action.transfer.id, **dict(action.fields))

    def _stall_reason(self, size: int) -> StallReason | None:
        inbox = self.book.inbox
        try:
            if not inbox.partial_dir.is_dir():
                inbox.prepare()  # removed at run time: recreate it
            free = self._free_bytes(inbox.directory)
        except (OSError, InboxError) as exc:
            log.warning("inbox %s unusable: %s", inbox.directory, exc)
            return StallReason.INBOX_UNAVAILABLE
        return StallReason.NO_SPACE if free - size < self.policy.min_free else None

    def _stall_reason_for(self, exc: OSError) -> StallReason:
        if exc.errno in _NO_SPACE:
            return StallReason.NO_SPACE
        if exc.errno == errno.ENOENT:
            try:
                self.book.inbox.prepare()  # the inbox was removed: recreate it
            except (OSError, InboxError) as again:
                log.warning("cannot recreate the inbox: %s", again)
        return StallReason.INBOX_UNAVAILABLE

    async def _stall(self, t: Transfer, reason: StallReason) -> bool:
        """Hold ``t`` (no credit to the sender) until the disk recovers or time runs out."""
        now = trio.current_time()
        if t.stall is not reason:
            t.stall = reason
            if t.stalled_since is None:
                t.stalled_since = now
            log.warning("transfer %s stalled: %s", t.id, reason.value)
            self.book.stalled(t)
        assert t.stalled_since is not None
        if now - t.stalled_since >= self.policy.stall_timeout:
            code = Failure.NO_SPACE if reason is StallReason.NO_SPACE \
                else Failure.INBOX_UNAVAILABLE
            self.book.fail(t, code, f"the inbox stayed unusable ({reason.value}) for "
                           f"{self.policy.stall_timeout:.0f} s; the partial file is kept")
            return False
        await trio.sleep(STALL_CHECK)
        return not t.terminal

    def _unstall(self, t: Transfer) -> None:
        log.info("transfer %s continues: the inbox is usable again", t.id)
        t.stall = None
        t.stalled_since = None
        self.book.publish("transfer.progress", t)

    async def _finalize(self, t: Transfer) -> None:
        """Give a verified file its final name (stalling like a write if the disk can't)."""
        inbox = self.book.inbox
        if t.kind == "dir":
            publish = functools.partial(inbox.publish_dir, t.id, t.name)
        elif t.group is not None:
            publish = functools.partial(inbox.place_member, inbox.partial_path(t.id), t.group,
                                        t.name, t.mode)
        else:
            publish = functools.partial(inbox.finalize, inbox.partial_path(t.id), t.name)
        while not t.terminal:
            try:
                final = await trio.to_thread.run_sync(publish)
            except (OSError, InboxError, UnsafeNameError, ValueError) as exc:
                log.warning("transfer %s: publishing into the inbox: %s", t.id, exc)
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in _STALL_ERRNOS:
                    self.book.fail(t, Failure.IO_ERROR, f"cannot publish into the inbox: {exc}")
                    return
                if not await self._stall(t, self._stall_reason_for(cause)):
                    return
                continue
            if t.stall is not None:
                self._unstall(t)
            if t.kind == "dir":
                for member in self.table.members(t.id):
                    member.path = str(final / member.name)  # where the tree now lives
            self.perform(self.protocol.finalized(t, str(final)))
            return

    def _ack_stream(self, t: Transfer, offset: int) -> None:
        """Acknowledge an incoming stream's bytes below ``offset`` (delivered to its reader)."""
        self._acked[t.id] = offset
        self._ack_due.pop(t.id, None)
        self.perform(self.protocol.delivered(t, offset))

    async def _acknowledge_streams(self) -> None:
        """Acknowledge, ACK_LINGER after the first of them asked, every incoming stream
        whose buffer ran dry with delivered bytes unacknowledged (one wake-up for all)."""
        while True:
            await self._ack_wake.wait()
            await trio.sleep(ACK_LINGER)
            self._ack_wake = trio.Event()
            due, self._ack_due = self._ack_due, {}
            for t in due.values():
                acked = self._acked.get(t.id)
                if acked is not None and t.delivered > acked and not t.terminal:
                    self._ack_stream(t, t.delivered)

    async def _sink_stream(self, t: Transfer, rt: Runtime, stream: InboundStream,
                           pending: list[bytes]) -> None:
        assert rt.inp is not None
        try:
            reader = await rt.inp.wait_reader()
        except PipeAborted:
            return
        self._acked[t.id] = t.delivered
        try:
            while not t.terminal:
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
                    self.book.fail(t, Failure.READER_STALLED, "the local reader stopped reading")
                    return
                rt.hasher.update(chunk)
                offset = t.delivered + len(chunk)
                if offset - self._acked[t.id] >= ACK_EVERY:
                    self._ack_stream(t, offset)
                else:
                    t.delivered = offset
                    if not stream.buffered and t.id not in self._ack_due:
                        self._ack_due[t.id] = t  # acknowledged within ACK_LINGER
                        self._ack_wake.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not t.terminal:
                self.book.fail(t, Failure.READER_GONE, "the local reader disconnected")
            return
        finally:
            acked = self._acked.pop(t.id, t.delivered)
            self._ack_due.pop(t.id, None)
        if t.terminal:
            return
        if acked != t.delivered:
            self.perform(self.protocol.delivered(t, t.delivered))
        self.perform(self.protocol.data_ended(t, rt.hasher.digest()))


class _SourceChanged(QuelayError):
    """The file being sent changed on disk: a local fault (``source_changed``)."""


def _check_source(t: Transfer) -> None:
    if t.source is not None and source_stat(t.path) != t.source:
        raise _SourceChanged(f"{t.path} changed on disk while being sent")


async def _skip(stream: InboundStream, first: bytes, overlap: int) -> list[bytes]:
    """Discard replayed bytes the reader already has (a resume may overlap)."""
    data = first
    while overlap > 0:
        if not data:
            data = await stream.receive_some(min(overlap, 256 * 1024))
            if not data:
                raise RemoteProtocolError("data stream ended inside the replayed overlap")
        cut = min(overlap, len(data))
        data, overlap = data[cut:], overlap - cut
    return [data] if data else []


def _write_at(path: Path, offset: int, chunks: list[bytes], hasher: Any = None) -> None:
    """Write ``chunks`` at ``offset`` (dropping anything after it) and fsync (a thread);
    then, only once they are durable, feed them to ``hasher``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if hasher is not None:
        for chunk in chunks:
            hasher.update(chunk)


class _Held:
    """Bytes the incoming files of one session hold in memory, waiting for the disk."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class _Batches:
    """Bytes received for one incoming file and not yet committed (see ``_sink_file``)."""

    def __init__(self, offset: int, held: _Held | None = None) -> None:
        self.held = _Held() if held is None else held  # shared by the session's sinks
        self.chunks: list[bytes] = []
        self.size = 0  # accumulated, waiting for the committer
        self.received = offset  # the file offset after the last byte received
        self.ended = False  # the data stream ended (FIN)
        self.committed = False  # ended and every byte committed
        self.changed = trio.lowlevel.ParkingLot()

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.held.bytes += len(chunk)
        self.received += len(chunk)
        self.changed.unpark_all()

    def end(self) -> None:
        self.ended = True
        self.changed.unpark_all()

    def take(self) -> tuple[list[bytes], int]:
        chunks, size = self.chunks, self.size
        self.chunks, self.size = [], 0
        self.held.bytes -= size
        self.changed.unpark_all()
        return chunks, size

    def drop(self) -> None:
        """The sink is gone: what it still had waiting is no longer held."""
        self.held.bytes -= self.size
        self.chunks, self.size = [], 0


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
