"""The agent: one nursery owning the control server, the UDP endpoint and the link.

The listening agent accepts the peer's connections; the dialling agent keeps
(re)connecting. Either way, an authenticated connection becomes a
:class:`~quelay.session.Session`, and transfers requested by local clients are
handed to whichever session is up (they wait while none is).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration

from . import wire
from .errors import ProtocolError
from .events import EventHub
from .identity import Identity, TrustStore, fingerprint_of_der, load_or_create_identity
from .inbox import Inbox
from .journal import Journal
from .scheduler import FeedScheduler
from .session import Session, SessionEnded
from .transfers import State, Transfer, hash_file
from .transport.connection import ConnectionClosed, QuicConn
from .transport.endpoint import QuicEndpoint
from .transport.pacing import WireGate
from .transport.udp import Address, UdpSocket, resolve

log = logging.getLogger("quelay.agent")

MiB = 1024 * 1024
RESUME_GRACE = 30.0  # after a peer restart, how long an incoming file waits to be resumed


@dataclass
class AgentConfig:
    state_dir: Path
    inbox: Path
    control: Path
    listen: Address | None = None
    peer: Address | None = None
    trust: list[str] = field(default_factory=list)
    name: str = ""
    stream_window: int = 2 * MiB
    connection_window: int = 8 * MiB
    send_high_water: int = 2 * MiB
    max_streams: int = 1024
    spool_size: int = 1 * MiB
    max_datagram_size: int = 1350
    keepalive: float = 1.0
    dead_after: float = 3.0  # silence (or 4 RTTs) after which the link is declared dead
    probe_interval: float = 1.0  # a dial attempt nobody answers is replaced this often
    idle_timeout: float = 30.0
    handshake_timeout: float = 10.0
    reconnect_interval: float = 1.0
    congestion: str = "allotted"  # see docs/performance.md for the measurements
    progress_interval: float = 0.5
    rate: int = 0  # wire cap in bits/s; 0 = uncapped
    max_concurrent: int = 0  # outbound transfers active at once; 0 = no limit

    def __post_init__(self) -> None:
        if (self.listen is None) == (self.peer is None):
            raise ValueError("an agent needs exactly one of --listen HOST:PORT or --peer HOST:PORT")
        from .transport.allotted import CONGESTION_CONTROLS

        if self.congestion not in CONGESTION_CONTROLS:
            raise ValueError(f"congestion must be one of {', '.join(CONGESTION_CONTROLS)}")
        if self.rate < 0:
            raise ValueError("rate must be >= 0 bit/s (0 = uncapped)")
        if self.max_concurrent < 0:
            raise ValueError("max_concurrent must be >= 0 (0 = no limit)")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity: Identity = load_or_create_identity(config.state_dir)
        self.trust = TrustStore.from_specs(config.trust)
        self.inbox = Inbox(config.inbox)
        self.journal = Journal(config.state_dir / "journal.sqlite3")
        self.epoch = secrets.randbits(63)
        self.events = EventHub()
        self.transfers: dict[str, Transfer] = {}
        self.transfer_added = trio.lowlevel.ParkingLot()
        self.session: Session | None = None
        self.link_state = "connecting"
        self.link_reason = ""
        self.peer_fingerprint: str | None = None
        self.peer_epoch: int | None = None
        self._last_rtt = 0.0
        self._last_attempt_heard = True
        self._unsent_cancels: dict[str, str] = {}
        self._queue_snapshot: tuple[str, ...] = ()
        self._recover()
        self.endpoint: QuicEndpoint | None = None
        self.sock: UdpSocket | None = None
        self.ready = trio.Event()
        self._session_changed = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self.stopping = False
        self.feed = FeedScheduler()
        self.feed.rate_bps = config.rate
        self.feed.uncapped_target = 4 * config.send_high_water
        self.feed.max_datagram = config.max_datagram_size
        self.gate: WireGate | None = None
        self.rate = config.rate

    # -- life ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from .control.server import ControlServer

        cfg = self.config
        bind_host, bind_port = cfg.listen if cfg.listen else ("0.0.0.0", 0)
        family, _ = resolve(bind_host, bind_port)
        if cfg.peer is not None:
            family, peer = resolve(*cfg.peer)
            bind_host = "::" if family.name == "AF_INET6" else "0.0.0.0"
        self.sock = UdpSocket((bind_host, bind_port), family=family)
        self.gate = WireGate(cfg.rate, trio.current_time(), cfg.max_datagram_size)
        self.endpoint = QuicEndpoint(
            self.sock,
            make_connection=self._make_connection,
            configuration=self._quic_configuration(is_client=cfg.peer is not None),
            quic_kwargs={
                "stream_window": cfg.stream_window,
                "connection_window": cfg.connection_window,
                "max_streams": cfg.max_streams,
            },
        )
        log.info("agent %s starting (udp %s:%d)", self.identity.fingerprint, *self.sock.address)
        control = ControlServer(self, cfg.control)
        try:
            listener = control.bind()
        except BaseException:
            self.sock.close()
            raise
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(control.serve, listener)
                nursery.start_soon(self.endpoint.run, nursery)
                nursery.start_soon(self._progress_loop)
                nursery.start_soon(self.feed.run, self._unsent)
                if cfg.peer is not None:
                    nursery.start_soon(self._dial_loop, peer)
                else:
                    nursery.start_soon(self._accept_loop, nursery)
                self.ready.set()
                task_status.started()
        finally:
            self.sock.close()
            self.journal.close()

    async def shutdown(self, reason: str = "agent shutting down") -> None:
        """Stop cleanly: close the QUIC connection with a reason, then stop every task.

        The control server's cleanup removes the socket as its task unwinds.
        """
        if self._nursery is None or self.stopping:
            return
        self.stopping = True
        log.info("%s: shutting down: %s", self.label, reason)
        session = self.session
        if session is not None:
            session.conn.close(reason)
            with trio.move_on_after(1.0):  # let the CONNECTION_CLOSE reach the wire
                await session.conn.terminated.wait()
        self._nursery.cancel_scope.cancel()

    @property
    def label(self) -> str:
        """How this agent names itself in logs (two agents may share a process)."""
        return self.config.name or ("dialler" if self.config.peer else "listener")

    @property
    def udp_address(self) -> Address:
        assert self.sock is not None
        return self.sock.address

    def _quic_configuration(self, *, is_client: bool) -> QuicConfiguration:
        import ssl

        cfg = self.config
        conf = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[wire.ALPN],
            idle_timeout=cfg.idle_timeout,
            max_datagram_size=cfg.max_datagram_size,
            congestion_control_algorithm=cfg.congestion,
            verify_mode=ssl.CERT_NONE,  # we pin fingerprints ourselves (identity.TrustStore)
            server_name="quelay-peer",
        )
        conf.certificate = self.identity.certificate
        conf.private_key = self.identity.private_key
        return conf

    def _make_connection(self, quic: Any, sock: UdpSocket, peer: Address) -> QuicConn:
        quic.set_cap(self.rate / 8)
        return QuicConn(
            quic,
            sock,
            peer,
            verify_peer=self._verify_peer,
            send_high_water=self.config.send_high_water,
            keepalive=self.config.keepalive,
            label=self.label,
            gate=self.gate,
            dead_after=self.config.dead_after,
        )

    def _verify_peer(self, der: bytes | None) -> str | None:
        """``None`` if the peer's certificate is pinned, else why it is refused."""
        if der is None:
            return "untrusted peer: it presented no certificate"
        if not self.trust.is_trusted_der(der):
            return f"untrusted peer: identity {fingerprint_of_der(der)} is not in the trust list"
        return None

    # -- link ----------------------------------------------------------------------

    def _set_link(self, state: str, reason: str = "") -> None:
        if state == self.link_state and reason == self.link_reason:
            return
        self.link_state, self.link_reason = state, reason
        log.info("%s: link %s%s", self.label, state, f": {reason}" if reason else "")
        self.events.publish("link.state", {"state": state, "reason": reason,
                                           "peer": self.peer_fingerprint})

    async def _dial_loop(self, peer: Address) -> None:
        assert self.endpoint is not None
        while True:
            if self.link_state != "down":
                self._set_link("connecting")
            conn = self.endpoint.connect(peer)
            try:
                await self._run_connection(conn, dialer=True)
            finally:
                self.endpoint.forget(conn)
            if self.link_state != "down" or self._last_attempt_heard:
                await trio.sleep(self.config.reconnect_interval)

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        assert self.endpoint is not None
        async for conn in self.endpoint.accepted:
            nursery.start_soon(self._serve_accepted, conn)

    async def _serve_accepted(self, conn: QuicConn) -> None:
        assert self.endpoint is not None
        try:
            await self._run_connection(conn, dialer=False)
        finally:
            self.endpoint.forget(conn)

    async def _run_connection(self, conn: QuicConn, *, dialer: bool) -> None:
        """Drive one connection: authenticate, run a session, report why it ended."""
        reason = "connection closed"
        self._last_attempt_heard = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            if dialer:
                # Probe: an attempt that hears nothing is replaced quickly by a fresh one,
                # so the link's return is noticed within one probe interval, not after
                # QUIC's exponential Initial backoff.
                with trio.move_on_after(self._probe_interval()):
                    await _first(conn.first_rx.wait, conn.terminated.wait)
                if not conn.first_rx.is_set():
                    self._last_attempt_heard = False
                    conn.abandon("no answer to this dial attempt", quiet=True)
                    nursery.cancel_scope.cancel()
                    return
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    await _first(conn.authenticated.wait, conn.terminated.wait)
                if conn.closed is not None:
                    return
                session = Session(self, conn, dialer=dialer)
                await session.run()
            except trio.TooSlowError:
                reason = "handshake timed out"
                conn.close(reason)
            except Exception as exc:  # noqa: BLE001 - any failure ends this connection only
                leaf = _leaf(exc)
                if isinstance(leaf, ConnectionClosed):
                    reason = leaf.reason
                elif isinstance(leaf, (ProtocolError, SessionEnded)):
                    reason = f"session error: {leaf}"
                    conn.close(str(leaf)[:200])
                else:
                    reason = f"internal error: {leaf!r}"
                    log.exception("%s: session failed", self.label)
                    conn.close("internal error")
            finally:
                reason = conn.closed or reason
                log.log(logging.INFO if self.stopping else logging.WARNING,
                        "%s: connection with %s:%d ended: %s", self.label, *conn.peer, reason)
                self._session_ended(conn, reason)
                if conn.closed is None:
                    conn.close(reason[:200])
                with trio.move_on_after(1):
                    await conn.terminated.wait()
                nursery.cancel_scope.cancel()

    def _probe_interval(self) -> float:
        return max(self.config.probe_interval, 1.2 * self._last_rtt)

    def session_up(self, session: Session) -> None:
        old = self.session
        if old is not None and old.conn is not session.conn:
            old.conn.close("replaced by a newer connection from the peer")
        self.session = session
        self.peer_fingerprint = session.conn.peer_fingerprint
        self._set_link("up")
        for tid, reason in self._unsent_cancels.items():
            session.send(wire.Cancel(tid, reason))  # canceled here while the link was down
        self._unsent_cancels.clear()
        for t in list(self.transfers.values()):
            if t.direction == "out" and t.state is State.ACTIVE:
                session.start_outbound(t)  # resume from the receiver's offset
        self._fill()
        self._session_changed.unpark_all()

    def peer_identified(self, session: Session) -> None:
        """The peer's hello arrived: a new boot epoch means it restarted."""
        hello = session.peer_hello
        assert hello is not None
        if self.peer_epoch is not None and hello.epoch != self.peer_epoch:
            self._peer_restarted()
        self.peer_epoch = hello.epoch

    def _peer_restarted(self) -> None:
        """The peer lost its memory: what lived only there cannot continue."""
        log.warning("%s: the peer restarted (new boot epoch)", self.label)
        for t in list(self.transfers.values()):
            if t.terminal:
                continue
            if t.direction == "in" and t.kind == "file":
                # The sender journals files: give it a moment to resume them.
                assert self._nursery is not None
                self._nursery.start_soon(self._expect_resume, t, t.resumes)
            elif t.direction == "in":
                self.finish_transfer(t, "peer_restarted",
                                     "the sending agent restarted; its in-memory data is gone")
            elif t.kind == "stream" and t.state is State.ACTIVE:
                self.finish_transfer(t, "peer_restarted",
                                     "the receiving agent restarted; the stream cannot resume")

    async def _expect_resume(self, t: Transfer, resumes: int) -> None:
        await trio.sleep(RESUME_GRACE)
        if not t.terminal and t.resumes == resumes:
            self.finish_transfer(t, "peer_restarted",
                                 "the sending agent restarted and did not resume this file")

    def _session_ended(self, conn: QuicConn, reason: str) -> None:
        if self.session is None or self.session.conn is not conn:
            return
        loss = conn.quic._loss
        if loss._rtt_initialized:
            self._last_rtt = loss._rtt_smoothed
        self.session = None
        self._set_link("down", reason)
        live = sum(1 for t in self.transfers.values() if t.state is State.ACTIVE)
        if live:
            log.info("%s: %d transfers wait for the link to resume", self.label, live)

    # -- transfers -------------------------------------------------------------------

    def add_transfer(self, t: Transfer) -> None:
        self.transfers[t.id] = t
        self.transfer_added.unpark_all()

    def _start(self, t: Transfer) -> None:
        assert self.session is not None
        t.move_to(State.ACTIVE)
        t.queue_position = None
        t.sched_key = self.feed.add(t.priority)
        log.info("transfer %s started: %s %s %r, priority %d", t.id, t.kind, t.direction, t.name,
                 t.priority)
        self.publish_transfer("transfer.started", t)
        self.session.start_outbound(t)

    def _release(self, t: Transfer) -> None:
        """Give back what a finished transfer held: scheduler entry, spool memory."""
        if t.sched_key is not None:
            self.feed.remove(t.sched_key)
            t.sched_key = None
        if t.spool is not None and not t.spool.released:
            t.spool.release()

    def _recover(self) -> None:
        """Reload unfinished file transfers from the journal (after a restart or crash)."""
        for row in self.journal.unfinished():
            t = Transfer(row.id, row.direction, "file", row.name, row.size,  # type: ignore[arg-type]
                         row.priority, row.attrs)
            t.resumed_from = row.resumed_from
            if row.direction == "out":
                t.path, t.offset, t.opened = row.path, row.offset, row.opened
                t.sent = row.offset
                if row.path is None or not Path(row.path).is_file():
                    self._journal_end(t, "failed")
                    continue
            else:
                partial = self.inbox.partial_path(row.id)
                have = partial.stat().st_size if partial.exists() else 0
                t.offset = min(have, row.offset)
                with open(partial, "ab") as f:
                    f.truncate(t.offset)
                hash_file(partial, t.hasher, t.offset)  # the receiver's digest so far
                t.move_to(State.ACTIVE)
            self.transfers[t.id] = t
            log.info("%s: recovered %s file transfer %s (%s) at byte %d of %d", self.label,
                     "outbound" if t.direction == "out" else "inbound", t.id, t.name, t.offset,
                     row.size)

    def _journal_end(self, t: Transfer, state: str) -> None:
        if t.kind == "file":
            self.journal.update(t.id, state=state, offset=t.offset, sha256=t.sha256,
                                path=t.path)

    def journal_offset(self, t: Transfer) -> None:
        """Record a file's durable offset (the receiver does this before acking it)."""
        if t.kind == "file":
            self.journal.update(t.id, offset=t.offset)

    def submit(self, t: Transfer) -> None:
        """Accept a new outbound transfer; it starts now or when the link is up."""
        if t.kind == "file":
            self.journal.record(id=t.id, direction="out", name=t.name, path=t.path,
                                size=t.size or 0, priority=t.priority, attrs=t.attrs)
        self.add_transfer(t)
        self._fill()
        if t.state is State.PENDING:
            self.publish_transfer("transfer.queued", t)

    # -- the pending queue -------------------------------------------------------------

    def queue(self) -> list[Transfer]:
        """Outbound transfers waiting to start: priority order, FIFO within a priority."""
        pending = [t for t in self.transfers.values()
                   if t.direction == "out" and t.state is State.PENDING]
        pending.sort(key=lambda t: (-t.priority, t.seq))
        return pending

    def _fill(self) -> None:
        """Start queued transfers while the link is up and --max-concurrent allows."""
        queue = self.queue()
        if self.session is not None:
            limit = self.config.max_concurrent
            active = sum(1 for t in self.transfers.values()
                         if t.direction == "out" and t.state is State.ACTIVE)
            while queue and (not limit or active < limit):
                self._start(queue.pop(0))
                active += 1
        for position, t in enumerate(queue, 1):
            t.queue_position = position
        snapshot = tuple(t.id for t in queue)
        if snapshot != self._queue_snapshot:
            self._queue_snapshot = snapshot
            self.events.publish("queue.status", {"pending": [
                {"id": t.id, "name": t.name, "priority": t.priority,
                 "position": t.queue_position} for t in queue]})

    def complete_transfer(self, t: Transfer) -> None:
        if t.move_to(State.DONE):
            self._release(t)
            self._journal_end(t, "done")
            self._fill()
            log.info("transfer %s done: %s, %d bytes, sha256 %s", t.id, t.name, t.offset,
                     t.sha256)
            self.publish_transfer("transfer.done", t)

    def finish_transfer(self, t: Transfer, code: str, message: str, *,
                        canceled: bool = False) -> None:
        """Fail or cancel a transfer and release what it holds; idempotent."""
        if not t.fail(code, message, canceled=canceled):
            return
        log.warning("transfer %s %s: %s: %s", t.id, t.state.value, code, message)
        self._release(t)
        self._journal_end(t, t.state.value)
        self._fill()
        t.space.unpark_all()
        if self.session is not None and t.data_stream is not None and t.direction == "out":
            self.session.conn.reset_stream(t.data_stream)
        if t.reader is not None:
            _abort_stream(t.reader)
        t.reader_ready.set()
        self.publish_transfer("transfer.canceled" if canceled else "transfer.failed", t)

    def cancel(self, t: Transfer, reason: str = "canceled by local client") -> None:
        """Cancel in any state; the peer hears of it now, or when the link returns."""
        if t.terminal:
            return
        peer_knows = t.direction == "in" or t.opened
        if peer_knows and self.session is not None:
            self.session.send(wire.Cancel(t.id, reason))
        elif peer_knows:
            self._unsent_cancels[t.id] = reason
        self.finish_transfer(t, "canceled", reason, canceled=True)

    # -- the rate cap and the feed -------------------------------------------------

    def set_rate(self, rate_bps: int) -> None:
        """Change the wire cap at run time; the next tick and datagram obey it."""
        assert self.gate is not None
        self.gate.set_rate(rate_bps, trio.current_time())  # validates
        self.rate = rate_bps
        if self.session is not None:
            self.session.conn.quic.set_cap(rate_bps / 8)
        log.info("%s: rate cap %s", self.label, f"{rate_bps} bit/s" if rate_bps else "off")
        self.feed.rate_bps = rate_bps
        self.feed.wake()

    def _unsent(self) -> int | None:
        return None if self.session is None else self.session.unsent_bulk()

    def publish_transfer(self, name: str, t: Transfer) -> None:
        self.events.publish(name, t.info())

    async def _progress_loop(self) -> None:
        last: dict[str, int] = {}
        while True:
            await trio.sleep(self.config.progress_interval)
            for t in list(self.transfers.values()):
                if t.state is State.ACTIVE and last.get(t.id) != t.offset:
                    last[t.id] = t.offset
                    self.publish_transfer("transfer.progress", t)
            for tid in [tid for tid in last if tid not in self.transfers]:
                del last[tid]

    def status(self) -> dict[str, Any]:
        counters = self.sock.counters if self.sock else None
        states: dict[str, int] = {}
        for t in self.transfers.values():
            states[t.state.value] = states.get(t.state.value, 0) + 1
        out: dict[str, Any] = {
            "agent": self.identity.fingerprint,
            "name": self.config.name,
            "epoch": self.epoch,
            "role": "dial" if self.config.peer else "listen",
            "udp": list(self.udp_address) if self.sock else None,
            "link": {"state": self.link_state, "reason": self.link_reason,
                     "peer": self.peer_fingerprint},
            "transfers": states,
            "wire": None,
        }
        out["rate"] = self.rate
        if counters is not None:
            now = trio.current_time()
            out["wire"] = {
                "rate": self.gate.window_bytes(now) * 8 if self.gate else 0,
                "held_datagrams": self.gate.held if self.gate else 0,
                "bytes_sent": counters.bytes_sent,
                "bytes_received": counters.bytes_received,
                "datagrams_sent": counters.datagrams_sent,
                "datagrams_received": counters.datagrams_received,
            }
        if self.session is not None:
            rec = self.session.conn.quic._loss
            out["link"]["rtt"] = rec._rtt_smoothed if rec._rtt_initialized else None
            out["link"]["cwnd"] = rec._cc.congestion_window
            out["link"]["bytes_in_flight"] = rec._cc.bytes_in_flight
            out["link"]["lost_packets"] = self.session.conn.quic.lost_packets
            out["link"]["lost_bytes"] = self.session.conn.quic.lost_bytes
            out["link"]["congestion"] = self.config.congestion
        return out


def _abort_stream(stream: Any) -> None:
    """Close a local reader's socket with RST so it sees an error, not a clean EOF."""
    import socket
    import struct

    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as exc:
            log.debug("could not set SO_LINGER on reader socket: %s", exc)
        sock.close()


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _first(*waiters: Callable[[], Any]) -> None:
    """Return as soon as any of the given waits completes."""
    async with trio.open_nursery() as nursery:
        async def one(w: Callable[[], Any]) -> None:
            await w()
            nursery.cancel_scope.cancel()

        for w in waiters:
            nursery.start_soon(one, w)
