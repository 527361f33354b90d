"""The agent: one nursery owning the control server, the UDP endpoint and the link.

The listening agent accepts the peer's connections; the dialling agent keeps
(re)connecting. Either way, an authenticated connection becomes a
:class:`~quelay.agent.session.Session`, and transfers requested by local clients are
handed to whichever session is up (they wait while none is).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration

from ..control.server import ControlServer
from ..core import messages as wire
from ..core.codes import Failure, LinkState
from ..core.transfer import State, Transfer, TransferTable
from ..errors import ProtocolError, QuelayError
from ..identity import (
    Identity,
    TrustStore,
    fingerprint_of_der,
    load_or_create_identity,
    sign_binding,
    verify_binding,
)
from ..rendezvous.link import run_rendezvous
from ..scheduler import FeedScheduler
from ..transport.admission import HandshakeAdmission
from ..transport.connection import APP_ERROR_UNTRUSTED, ConnectionClosed, QuicConn
from ..transport.endpoint import QuicEndpoint
from ..transport.pacing import WireGate
from ..transport.path_memory import PathMemory
from ..transport.resumption import TicketStore
from ..transport.udp import Address, UdpSocket, header_bytes_for, resolve
from .book import HistoryPolicy, TransferBook
from .datagrams import DATAGRAM_FRAME_LIMIT, DatagramService
from .events import EventHub
from .exports import Exports, parse_exports
from .inbox import Inbox
from .journal import Journal
from .metrics import serve_metrics
from .peerspec import PeerSpec
from .session import IncomingPolicy, Session, SessionEnded, UntrustedPeer

log = logging.getLogger("quelay.agent")

MiB = 1024 * 1024
RESUME_GRACE = 30.0  # after a peer restart, how long an incoming file waits to be resumed
PRUNE_EVERY = 60.0  # seconds between history prunes
SWEEP_EVERY = 10.0  # seconds between looks for received files whose time to live ended
RATE_SMOOTHING = 2.0  # seconds: the time constant of a transfer's reported rate


@dataclass
class AgentConfig:
    state_dir: Path
    inbox: Path
    control: Path
    listen: Address | None = None
    peer: Address | None = None
    rendezvous: Address | None = None  # HOST:PORT of a rendezvous relay (replaces listen/peer)
    session: str = ""  # rendezvous session name (the same on both agents)
    rendezvous_secret_file: str = ""  # file with the rendezvous shared secret
    rendezvous_direct: bool = True  # try a direct path (hole punching); False: always relayed
    trust: list[str] = field(default_factory=list)
    export: list[str] = field(default_factory=list)  # NAME=DIR read-only exports the peer may fetch
    name: str = ""
    stream_window: int = 2 * MiB
    connection_window: int = 8 * MiB
    send_high_water: int = 2 * MiB
    max_streams: int = 16384  # per direction; a closed stream is granted again
    spool_size: int = 1 * MiB
    max_datagram_size: int = 1350
    link_overhead: int = 0  # bytes the link adds per datagram beyond IP+UDP (VPN, GSE)
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
    min_free: int = 64 * MiB  # free bytes kept under the inbox; below, incoming files stall
    stall_timeout: float = 3600.0  # a stalled incoming file fails after this long
    max_incoming: int = 16384  # live incoming transfers from the peer; more are "busy"
    history_max: int = 1000  # finished transfers kept (memory and journal)
    history_age: float = 7 * 24 * 3600.0  # seconds a finished transfer is kept
    inbox_ttl: float = 0.0  # seconds a received file stays in the inbox (0 = until removed)
    metrics: Address | None = None  # HOST:PORT of the Prometheus endpoint; None = off
    datagram_share: float = 0.25  # of the cap that best-effort datagrams may use
    datagram_max_age: float = 1.0  # seconds a datagram may wait before it is dropped
    resumption: bool = True  # TLS session resumption on reconnects (identities still proven)
    peers: list[PeerSpec] = field(default_factory=list)  # a hub's named peers (peerspec.py)
    rate_total: int = 0  # bit/s shared by every link's traffic; 0 = no total cap

    def __post_init__(self) -> None:
        if self.peers:
            self._check_peers()
        elif self.rendezvous is not None:
            if self.listen is not None or self.peer is not None:
                raise ValueError("--rendezvous replaces --listen and --peer: give only one")
            if not self.session or not self.rendezvous_secret_file:
                raise ValueError("--rendezvous needs --session NAME and "
                                 "--rendezvous-secret-file FILE")
        elif (self.listen is None) == (self.peer is None):
            raise ValueError("an agent needs exactly one of --listen HOST:PORT or --peer HOST:PORT")
        from ..transport.allotted import CONGESTION_CONTROLS

        if self.congestion not in CONGESTION_CONTROLS:
            raise ValueError(f"congestion must be one of {', '.join(CONGESTION_CONTROLS)}")
        if self.rate < 0:
            raise ValueError("rate must be >= 0 bit/s (0 = uncapped)")
        parse_exports(self.export)  # validates: one-component names, existing directories
        if self.link_overhead < 0:
            raise ValueError("link_overhead must be >= 0 bytes")
        if self.rate:
            floor = 8 * (self.max_datagram_size + 48 + self.link_overhead)
            if self.rate < floor:
                raise ValueError(f"rate must be 0 (uncapped) or at least {floor} bit/s "
                                 "(one datagram with its headers per second)")
        if self.rate_total < 0:
            raise ValueError("rate_total must be >= 0 bit/s (0 = no total cap)")
        if self.rate_total:
            floor = 8 * (self.max_datagram_size + 48 + self.link_overhead)
            for what, value in [("rate_total", self.rate_total)] + [
                    (f"the rate of peer {p.name}", p.rate) for p in self.peers if p.rate]:
                if value is not None and value < floor:
                    raise ValueError(f"{what} must be 0 or at least {floor} bit/s "
                                     "(one datagram with its headers per second)")
        if self.max_concurrent < 0:
            raise ValueError("max_concurrent must be >= 0 (0 = no limit)")
        if self.min_free < 0 or self.history_max < 0:
            raise ValueError("min_free and history_max must be >= 0")
        if self.max_incoming < 1:
            raise ValueError("max_incoming must be >= 1")
        if self.inbox_ttl < 0:
            raise ValueError("inbox_ttl must be >= 0 seconds (0 = keep received files)")
        if self.stall_timeout <= 0 or self.history_age <= 0:
            raise ValueError("stall_timeout and history_age must be > 0 seconds")
        if not 0 < self.datagram_share <= 1:
            raise ValueError("datagram_share must be a fraction of the cap in (0, 1]")
        if not 0 < self.datagram_max_age <= 3600:
            raise ValueError("datagram_max_age must be in (0, 3600] seconds")


    def _check_peers(self) -> None:
        """Named peers (a hub): unique names; whoever has no address dials us."""
        if self.rendezvous is not None:
            raise ValueError("--rendezvous meets one peer: it cannot be used with named peers")
        if self.peer is not None or self.trust:
            raise ValueError("named peers (--trust NAME=PIN, --peer NAME=HOST:PORT) and an "
                             "unnamed --trust/--peer cannot be mixed: name every peer")
        names = [p.name for p in self.peers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"peer {repeated[0]} is configured twice")
        waiting = [p.name for p in self.peers if p.address is None]
        if waiting and self.listen is None:
            raise ValueError(f"peer {waiting[0]} has no address to dial (--peer NAME=HOST:PORT)"
                             ", so it must dial us: give --listen HOST:PORT")
        for spec in self.peers:
            if not spec.trust:
                raise ValueError(f"peer {spec.name} has no pin: give --trust {spec.name}=PIN")


class StateDirLocked(QuelayError):
    """Another agent runs on this state directory (an operator error)."""

    code = "state_dir_locked"


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory's exclusive lock (held for the process lifetime)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(f"another agent is running on state directory {state_dir}") from None
    return fd


class Agent:
    def __init__(self, config: AgentConfig, *,
                 socket_factory: Callable[..., Any] | None = None) -> None:
        """``socket_factory`` replaces the UDP socket (tests: an in-memory network)."""
        self.config = config
        self._socket_factory = socket_factory or UdpSocket
        self._lock_fd = lock_state_dir(config.state_dir)
        try:
            self._init(config)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _init(self, config: AgentConfig) -> None:
        self.identity: Identity = load_or_create_identity(config.state_dir)
        self.trust = TrustStore.from_specs(config.trust)
        self.inbox = Inbox(config.inbox)
        self.journal = Journal(config.state_dir / "journal.sqlite3")
        self.epoch = secrets.randbits(63)
        self.events = EventHub()
        self.feed = FeedScheduler()
        self.feed.rate_bps = config.rate
        self.feed.uncapped_target = 4 * config.send_high_water
        self.feed.max_datagram = config.max_datagram_size
        self.book = TransferBook(
            journal=self.journal, events=self.events, inbox=self.inbox, feed=self.feed,
            label=self.label, max_concurrent=config.max_concurrent,
            history=HistoryPolicy(config.history_max, config.history_age),
            inbox_ttl=config.inbox_ttl)
        self.exports = Exports(parse_exports(config.export))
        self.datagrams = DatagramService(
            share=config.datagram_share, max_age=config.datagram_max_age,
            cap=lambda: self.rate, label=self.label,
            header_bytes=lambda: self.gate.per_datagram if self.gate is not None else 28)
        self.incoming_policy = IncomingPolicy(config.min_free, config.stall_timeout,
                                              config.max_incoming)
        self.session: Session | None = None
        self.link_state = LinkState.CONNECTING
        self.link_reason = ""
        self.peer_fingerprint: str | None = None
        self.tickets = TicketStore()  # TLS session tickets (resumption.py), in memory only
        self.peer_epoch: int | None = None
        self._last_rtt = 0.0
        self._last_attempt_heard = True
        self.link_ups = 0  # sessions established since start (a flapping link shows here)
        self.book.recover()
        self.book.clean_stale_staging()
        self.endpoint: QuicEndpoint | None = None
        self.sock: UdpSocket | None = None
        self.ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.stopping = False
        self.gate: WireGate | None = None
        self.rate = config.rate
        self.rendezvous: Any = None  # the RendezvousLink of an agent run with --rendezvous
        self.metrics_address: Address | None = None  # bound once serving (--metrics)
        # Configurations handed out (the endpoint's; rendezvous makes more): updated in
        # place when the identity is reloaded, so new connections present the new one.
        self._quic_confs: list[weakref.ref[QuicConfiguration]] = []

    @property
    def transfers(self) -> TransferTable:
        return self.book.table

    # -- life ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            os.close(self._lock_fd)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        cfg = self.config
        bind_host, bind_port = cfg.listen if cfg.listen else ("0.0.0.0", 0)
        family, _ = resolve(bind_host, bind_port)
        if cfg.peer is not None:
            family, peer = resolve(*cfg.peer)
            bind_host = "::" if family.name == "AF_INET6" else "0.0.0.0"
        if cfg.rendezvous is not None:  # both agents dial out to the relay
            family, _ = resolve(*cfg.rendezvous)
            bind_host = "::" if family.name == "AF_INET6" else "0.0.0.0"
        self.sock = self._socket_factory((bind_host, bind_port), family=family,
                                         link_overhead=cfg.link_overhead)
        self.gate = WireGate(cfg.rate, trio.current_time(), cfg.max_datagram_size,
                             header_bytes=header_bytes_for(family, peer[0] if cfg.peer else None),
                             link_overhead=cfg.link_overhead)
        self.endpoint = QuicEndpoint(
            self.sock,
            make_connection=self._make_connection,
            configuration=self._quic_configuration(is_client=cfg.peer is not None),
            quic_kwargs={
                "stream_window": cfg.stream_window,
                "connection_window": cfg.connection_window,
                "max_streams": cfg.max_streams,
                "tickets": self.tickets if cfg.resumption else None,
            },
            path_memory=PathMemory(cfg.state_dir),
        )
        if cfg.listen is not None:  # flood protection for the open port (admission.py)
            self.endpoint.admission = HandshakeAdmission(label=self.label)
            gate = self.gate
            assert gate is not None
            self.endpoint.retry_gate = lambda size, now: gate.try_send(size, now)
        log.info("agent %s starting (udp %s:%d)", self.identity.fingerprint, *self.sock.address,
                 extra={"event": "agent.starting", "agent": self.label,
                        "fingerprint": self.identity.fingerprint,
                        "udp": f"{self.sock.address[0]}:{self.sock.address[1]}"})
        control = ControlServer(self, self.book, cfg.control, datagrams=self.datagrams)
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
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self.feed.run, self._unsent)
                self.book.stats.link_changed(self.link_state.value, trio.current_time())
                if cfg.metrics is not None:
                    await nursery.start(serve_metrics, self, *cfg.metrics)
                if cfg.rendezvous is not None:
                    nursery.start_soon(run_rendezvous, self, nursery)
                elif cfg.peer is not None:
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
        log.info("%s: shutting down: %s", self.label, reason,
                 extra={"event": "shutdown", "agent": self.label, "reason": reason})
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
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def spool_size(self) -> int:
        return self.config.spool_size

    @property
    def udp_address(self) -> Address:
        assert self.sock is not None
        return self.sock.address

    def hello(self, conn: QuicConn) -> wire.Hello:
        proof = None
        if conn.resumed:  # no certificate crossed: prove our identity on this connection
            proof = sign_binding(self.identity, conn.binding, signer_is_client=conn.quic._is_client)
        return wire.Hello(wire.PROTOCOL_VERSION, self.identity.fingerprint, self.epoch,
                          self.config.name, proof)

    def check_proof(self, conn: QuicConn, hello: wire.Hello) -> str | None:
        """On a resumed connection: ``None`` if the peer's hello proves, on this
        connection, the identity its ticket stands for; else why it is refused."""
        certificate = conn.quic.peer_certificate_der()
        problem = None
        if certificate is None:
            problem = "resumed connection without a known identity"
        elif hello.proof is None:
            problem = "resumed connection, but the hello carries no identity proof"
        else:
            problem = verify_binding(certificate, hello.proof, conn.binding,
                                     signer_is_client=not conn.quic._is_client)
        if problem is None:
            return None
        if self.endpoint is not None and self.endpoint.admission is not None:
            self.endpoint.admission.identity_refused(conn.peer, trio.current_time())
        self.book.stats.peer_refused("untrusted_identity")
        return f"untrusted peer: {problem}"

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
            max_datagram_frame_size=DATAGRAM_FRAME_LIMIT,  # best-effort datagrams (RFC 9221)
        )
        self._present_identity(conf)
        self._quic_confs = [r for r in self._quic_confs if r() is not None] + [weakref.ref(conf)]
        return conf

    def _present_identity(self, conf: QuicConfiguration) -> None:
        """Our certificate, and during a rotation the endorsement and the previous one."""
        conf.certificate = self.identity.certificate
        conf.private_key = self.identity.private_key
        conf.certificate_chain = self.identity.chain

    def reload_identity(self) -> dict[str, Any]:
        """Re-read the identity (after ``quelay identity rotate``/``retire``).

        Connections made from now on present it; the current session goes on
        undisturbed on the identity it was authenticated with.
        """
        identity = load_or_create_identity(self.config.state_dir)
        old, self.identity = self.identity.fingerprint, identity
        self.tickets.clear()  # they stand for the old identity on both sides
        for ref in self._quic_confs:
            conf = ref()
            if conf is not None:
                self._present_identity(conf)
        log.info("%s: identity %s (previous %s)", self.label, identity.fingerprint,
                 identity.previous_fingerprint or "none",
                 extra={"event": "identity.loaded", "agent": self.label,
                        "fingerprint": identity.fingerprint,
                        "previous": identity.previous_fingerprint, "was": old})
        return {"fingerprint": identity.fingerprint,
                "previous": identity.previous_fingerprint}

    def _make_connection(self, quic: Any, sock: UdpSocket, peer: Address) -> QuicConn:
        assert self.gate is not None
        self.gate.set_link(header_bytes=header_bytes_for(sock.family, peer[0]))
        quic.set_cap(self.gate.payload_bytes_per_second)
        conn = QuicConn(
            quic,
            sock,
            peer,
            verify_peer=lambda der: self._verify_peer(der, quic.peer_certificate_chain(), peer),
            send_high_water=self.config.send_high_water,
            keepalive=self.config.keepalive,
            label=self.label,
            gate=self.gate,
            dead_after=self.config.dead_after,
        )
        conn.on_datagram = self.datagrams.received  # best-effort datagrams from the peer
        return conn

    def _verify_peer(self, der: bytes | None, chain: Any = (),
                     peer: Address | None = None) -> str | None:
        """``None`` if the peer's certificate is pinned (or endorsed by a pinned one
        during the peer's identity rotation), else why it is refused."""
        if der is None:
            return "untrusted peer: it presented no certificate"
        if self.trust.trusts_chain(der, chain) is None:
            admission = self.endpoint.admission if self.endpoint is not None else None
            if admission is not None and peer is not None:
                admission.identity_refused(peer, trio.current_time())  # ignored a while
            self.book.stats.peer_refused("untrusted_identity")
            return f"untrusted peer: identity {fingerprint_of_der(der)} is not in the trust list"
        return None

    # -- link ----------------------------------------------------------------------

    def _set_link(self, state: LinkState, reason: str = "") -> None:
        if state == self.link_state and reason == self.link_reason:
            return
        self.link_state, self.link_reason = state, reason
        self.book.stats.link_changed(state.value, trio.current_time())
        log.info("%s: link %s%s", self.label, state.value, f": {reason}" if reason else "",
                 extra={"event": f"link.{state.value}", "agent": self.label,
                        "state": state.value, "reason": reason, "peer": self.peer_fingerprint})
        self.events.publish("link.state", {"state": state.value, "reason": reason,
                                           "peer": self.peer_fingerprint})

    async def _dial_loop(self, peer: Address) -> None:
        assert self.endpoint is not None
        # The first dial after a restart waits as long as the path needs (path memory).
        self._last_rtt = self.endpoint.remembered_rtt(peer) or self._last_rtt
        while True:
            if self.link_state is not LinkState.DOWN:
                self._set_link(LinkState.CONNECTING)
            conn = self.endpoint.connect(peer)
            try:
                await self._run_connection(conn, dialer=True)
            finally:
                self.endpoint.forget(conn)
            if self.link_state is not LinkState.DOWN or self._last_attempt_heard:
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
        started = trio.current_time()
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
                self.book.stats.handshake.observe(trio.current_time() - started)
                self.book.stats.handshakes[("resumed" if conn.resumed else "full")] += 1
                session = Session(self, self.book, self.feed, conn, dialer=dialer,
                                  early=dialer and self.peer_epoch is not None,
                                  policy=self.incoming_policy, exports=self.exports,
                                  datagrams=self.datagrams)
                await session.run()
            except trio.TooSlowError:
                reason = "handshake timed out"
                conn.close(reason)
            except Exception as exc:  # noqa: BLE001 - any failure ends this connection only
                leaf = _leaf(exc)
                if isinstance(leaf, ConnectionClosed):
                    reason = leaf.reason
                elif isinstance(leaf, UntrustedPeer):
                    reason = str(leaf)
                    log.error("%s: refusing peer %s:%d: %s", self.label, *conn.peer, leaf)
                    conn.close(reason[:200], code=APP_ERROR_UNTRUSTED)
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
                        "%s: connection with %s:%d ended: %s", self.label, *conn.peer, reason,
                        extra={"event": "connection.ended", "agent": self.label,
                               "peer": f"{conn.peer[0]}:{conn.peer[1]}", "reason": reason})
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
        self.book.link = session
        self.peer_fingerprint = session.conn.peer_fingerprint
        self.link_ups += 1
        if self.endpoint is not None and self.endpoint.admission is not None:
            self.endpoint.admission.peer_authenticated(session.conn.peer)
        self._set_link(LinkState.UP)
        self.feed.wake()

    def peer_identified(self, session: Session) -> None:
        """The peer's hello arrived: a new boot epoch means it restarted."""
        hello = session.peer_hello
        assert hello is not None
        if self.peer_epoch is not None and hello.epoch != self.peer_epoch:
            self._peer_restarted()
        self.peer_epoch = hello.epoch

    def _peer_restarted(self) -> None:
        """The peer lost its memory: what lived only there cannot continue."""
        log.warning("%s: the peer restarted (new boot epoch)", self.label,
                    extra={"event": "peer.restarted", "agent": self.label})
        for t in self.book.table.live():
            if t.direction == "in" and t.kind == "file":
                # The sender journals files: give it a moment to resume them.
                assert self._nursery is not None
                self._nursery.start_soon(self._expect_resume, t, t.resumes)
            elif t.direction == "in":
                self.book.fail(t, Failure.PEER_RESTARTED,
                               "the sending agent restarted; its in-memory data is gone")
            elif t.kind == "stream" and t.state is State.ACTIVE:
                self.book.fail(t, Failure.PEER_RESTARTED,
                               "the receiving agent restarted; the stream cannot resume")

    async def _expect_resume(self, t: Transfer, resumes: int) -> None:
        await trio.sleep(RESUME_GRACE)
        if not t.terminal and t.resumes == resumes:
            self.book.fail(t, Failure.PEER_RESTARTED,
                           "the sending agent restarted and did not resume this file")

    def _session_ended(self, conn: QuicConn, reason: str) -> None:
        if self.session is None or self.session.conn is not conn:
            return
        stats = conn.path_stats()
        self.book.stats.connection_ended(stats)
        # The path's own round trip (min RTT), not the smoothed one, which includes the
        # queue at the cap: a dial attempt need not wait for a queue that is gone.
        rtt = stats.min_rtt if stats.min_rtt is not None else stats.rtt
        if rtt is not None:
            self._last_rtt = rtt
        session, self.session = self.session, None
        for tid, (_, retransmitted) in session.stats_of_all().items():  # fold into totals
            t = self.book.table.get(tid)
            if t is not None:
                t.retransmitted_earlier += retransmitted
                t.retransmitted, t.in_flight = t.retransmitted_earlier, 0
        self.book.link = None
        self._set_link(LinkState.DOWN, reason)
        live = len(self.book.table.active_outbound()) + self.book.table.live_incoming()
        if live:
            log.info("%s: %d transfers wait for the link to resume", self.label, live)

    # -- the rate cap and the feed -------------------------------------------------

    @property
    def cap(self) -> int:
        return self.rate

    def set_rate(self, rate_bps: int) -> None:
        """Change the wire cap at run time; the next tick and datagram obey it."""
        assert self.gate is not None
        self.gate.set_rate(rate_bps, trio.current_time())  # validates
        self.rate = rate_bps
        if self.session is not None:
            self.session.conn.quic.set_cap(self.gate.payload_bytes_per_second)
        log.info("%s: rate cap %s", self.label, f"{rate_bps} bit/s" if rate_bps else "off",
                 extra={"event": "rate", "agent": self.label, "rate": rate_bps})
        self.feed.rate_bps = rate_bps
        self.feed.wake()

    def _unsent(self) -> int | None:
        return None if self.session is None else self.session.unsent_bulk()

    async def _housekeeping(self) -> None:
        """Progress events, busy retries and history pruning, at the progress interval."""
        last: dict[str, int] = {}
        next_prune = next_sweep = trio.current_time()
        sampled: dict[str, tuple[float, int]] = {}
        while True:
            await trio.sleep(self.config.progress_interval)
            self._sample_stats(sampled)
            for t in self.book.table.live():
                if t.state is State.ACTIVE and last.get(t.id) != t.delivered:
                    last[t.id] = t.delivered
                    self.book.publish("transfer.progress", t)
            for tid in [tid for tid in last if tid not in self.book.table]:
                del last[tid]
            if any(t.not_before for t in self.book.table.queue()):
                self.book.fill()  # a transfer refused as busy may retry now
            if trio.current_time() >= next_sweep:
                next_sweep = trio.current_time() + SWEEP_EVERY
                self.book.sweep_expired()
            if trio.current_time() >= next_prune:
                next_prune = trio.current_time() + PRUNE_EVERY
                self.book.prune()

    def _sample_stats(self, sampled: dict[str, tuple[float, int]]) -> None:
        """Per-transfer rate (delivered bytes/s, smoothed over ~2 s), bytes in flight and
        bytes retransmitted (``quelay get``, progress events)."""
        now = trio.current_time()
        session = self.session
        seen = set()
        for t in self.book.table.live():
            if t.state is not State.ACTIVE:
                t.rate = 0.0
                continue
            seen.add(t.id)
            then, delivered = sampled.get(t.id, (now, t.delivered))
            if now > then:
                sample = max(0, t.delivered - delivered) / (now - then)
                weight = 1.0 - math.exp(-(now - then) / RATE_SMOOTHING)
                t.rate += weight * (sample - t.rate)
            sampled[t.id] = (now, t.delivered)
            if t.direction == "out" and session is not None:
                t.in_flight, retransmitted = session.transfer_stats(t.id)
                t.retransmitted = t.retransmitted_earlier + retransmitted
        for tid in [tid for tid in sampled if tid not in seen]:
            del sampled[tid]
            if session is not None:
                session.forget_stats(tid)

    def status(self) -> dict[str, Any]:
        counters = self.sock.counters if self.sock else None
        states: dict[str, int] = {}
        for t in self.book.table:
            states[t.state.value] = states.get(t.state.value, 0) + 1
        out: dict[str, Any] = {
            "agent": self.identity.fingerprint,
            "name": self.config.name,
            "epoch": self.epoch,
            "role": "dial" if self.config.peer else "listen",
            "udp": list(self.udp_address) if self.sock else None,
            "link": {"state": self.link_state.value, "reason": self.link_reason,
                     "peer": self.peer_fingerprint, "ups": self.link_ups},
            "transfers": states,
            "wire": None,
        }
        out["rate"] = self.rate
        out["datagrams"] = self.datagrams.status()
        if self.rendezvous is not None:
            out.update(self.rendezvous.status(self.session.conn.peer if self.session else None))
        if counters is not None:
            now = trio.current_time()
            out["wire"] = {
                "rate": self.gate.window_bytes(now) * 8 if self.gate else 0,
                "payload_rate": self.gate.window_payload(now) * 8 if self.gate else 0,
                "wire_bytes_sent": counters.wire_bytes_sent,
                "wire_bytes_received": counters.wire_bytes_received,
                "header_bytes": self.gate.header_bytes if self.gate else 0,
                "link_overhead": self.config.link_overhead,
                "held_datagrams": self.gate.held if self.gate else 0,
                "bytes_sent": counters.bytes_sent,
                "bytes_received": counters.bytes_received,
                "datagrams_sent": counters.datagrams_sent,
                "datagrams_received": counters.datagrams_received,
            }
        if self.session is not None:
            stats = self.session.conn.path_stats()
            out["link"]["rtt"] = stats.rtt
            out["link"]["cwnd"] = stats.cwnd
            out["link"]["bytes_in_flight"] = stats.bytes_in_flight
            out["link"]["lost_packets"] = stats.lost_packets
            out["link"]["lost_bytes"] = stats.lost_bytes
            out["link"]["spurious_losses"] = stats.spurious_losses
            out["link"]["congestion"] = self.config.congestion
        return out


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
