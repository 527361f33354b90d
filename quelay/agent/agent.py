"""The agent: one nursery owning the control server, the UDP endpoint and its links.

A single-peer agent has one link; a hub has one per named peer
(:class:`~quelay.agent.peerlink.PeerLink`). Links with an address are dialled
and kept (re)connecting; a listener accepts any pinned peer and learns from its
certificate which link it is. Either way, an authenticated connection becomes
a :class:`~quelay.agent.session.Session` of that link, and transfers requested
by local clients are handed to their link's session while it is up (they wait
while it is not). All links share one UDP socket, one identity, one transfer
book and — with ``rate_total`` — one total cap, divided by
:mod:`quelay.core.share`.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration

from ..control.server import ControlServer
from ..core import messages as wire
from ..core.codes import Failure, LinkState
from ..core.share import effective_rates
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
from ..transport.pacing import IPV6_UDP_HEADER, WireGate, minimum_rate
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
from .peerlink import PeerLink
from .session import IncomingPolicy, Session, SessionEnded, UntrustedPeer
from .settings import AgentConfig

__all__ = ["Agent", "AgentConfig", "StateDirLocked", "lock_state_dir"]

log = logging.getLogger("quelay.agent")

MiB = 1024 * 1024
PRUNE_EVERY = 60.0  # seconds between history prunes
SWEEP_EVERY = 10.0  # seconds between looks for received files whose time to live ended
SHARE_EVERY = 0.5  # seconds between divisions of a total cap while links are busy


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
            if getattr(self, "journal", None) is not None:
                self.journal.close()
            os.close(self._lock_fd)
            raise

    def _init(self, config: AgentConfig) -> None:
        self.identity: Identity = load_or_create_identity(config.state_dir)
        self.inbox = Inbox(config.inbox)
        self.journal = Journal(config.state_dir / "journal.sqlite3")
        self.epoch = secrets.randbits(63)
        self.events = EventHub()
        self.book = TransferBook(
            journal=self.journal, events=self.events, inbox=self.inbox, feed=None,
            label=self.label, max_concurrent=config.max_concurrent,
            history=HistoryPolicy(config.history_max, config.history_age),
            inbox_ttl=config.inbox_ttl)
        self.exports = Exports(parse_exports(config.export))
        self.incoming_policy = IncomingPolicy(config.min_free, config.stall_timeout,
                                              config.max_incoming)
        self.tickets = TicketStore()  # TLS session tickets (resumption.py), in memory only
        self.rate_total = config.rate_total
        # The total cap every link's gate answers to (a hub; it also measures the total).
        self.total_gate: WireGate | None = None
        if config.rate_total or config.peers:
            self.total_gate = WireGate(config.rate_total, 0.0, config.max_datagram_size,
                                       link_overhead=config.link_overhead)
        self.links: dict[str, PeerLink] = {}
        if config.peers:
            for spec in config.peers:
                rate = config.rate if spec.rate is None else spec.rate
                self._add_link(spec.name, TrustStore.from_specs(spec.trust), spec.address, rate)
        else:
            self._add_link("", TrustStore.from_specs(config.trust), config.peer, config.rate)
        self._check_pins()
        self.default = next(iter(self.links.values()))
        self.book.feed = self.default.feed
        self.book.recover()
        self._adopt_recovered()
        self.book.clean_stale_staging()
        self._endpoint: QuicEndpoint | None = None
        self.sock: UdpSocket | None = None
        self.ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._identified: dict[QuicConn, PeerLink] = {}  # accepted, authenticated: whose
        self._share_wake = trio.Event()
        self._busy: set[str] = set()  # the links busy at the last division of the total
        self.rendezvous: Any = None  # the RendezvousLink of an agent run with --rendezvous
        self.metrics_address: Address | None = None  # bound once serving (--metrics)
        # Configurations handed out (the endpoint's; rendezvous makes more): updated in
        # place when the identity is reloaded, so new connections present the new one.
        self._quic_confs: list[weakref.ref[QuicConfiguration]] = []

    def _add_link(self, name: str, trust: TrustStore, address: Address | None,
                  rate: int) -> None:
        cfg = self.config
        gate = WireGate(rate, 0.0, cfg.max_datagram_size, link_overhead=cfg.link_overhead,
                        parent=self.total_gate)
        link = PeerLink(self, self.book, name=name, trust=trust, address=address, rate=rate,
                        gate=gate, max_datagram=cfg.max_datagram_size,
                        send_high_water=cfg.send_high_water,
                        reconnect_interval=cfg.reconnect_interval,
                        probe_interval=cfg.probe_interval)
        link.datagrams = DatagramService(
            share=cfg.datagram_share, max_age=cfg.datagram_max_age,
            cap=lambda: link.effective_rate, label=link.label,
            header_bytes=lambda: link.gate.per_datagram)
        self.links[name] = link
        self.book.feeds[name] = link.feed

    def _check_pins(self) -> None:
        """A pin names one peer: a certificate trusted by two links would be ambiguous."""
        seen: dict[str, str] = {}
        for link in self.links.values():
            for fp in link.trust.fingerprints:
                if fp in seen:
                    raise ValueError(f"peers {seen[fp]} and {link.name} have the same pin "
                                     f"{fp}: a pin names one peer")
                seen[fp] = link.name

    def _adopt_recovered(self) -> None:
        """Journaled transfers of a link that is no longer configured: with one link they
        move to it (an agent that became a hub of one, or the reverse); else they fail."""
        for t in self.book.table.live():
            if t.peer in self.links:
                continue
            if len(self.links) == 1:
                t.peer = self.default.name
                self.journal.update(t.id, peer=t.peer)
            else:
                self.book.fail(t, Failure.UNKNOWN_PEER, f"peer {t.peer or '(unnamed)'} is no "
                               f"longer configured (peers: {', '.join(self.links)})",
                               tell_peer=False)

    @property
    def hub(self) -> bool:
        """Whether the book holds several links' transfers (each session sees its own)."""
        return len(self.links) > 1

    @property
    def transfers(self) -> TransferTable:
        return self.book.table

    @property
    def endpoint(self) -> QuicEndpoint | None:
        return self._endpoint

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the single-peer view (the one link, or a hub's first) --------------------------

    @property
    def session(self) -> Session | None:
        return self.default.session

    @property
    def link_state(self) -> LinkState:
        return self.default.link_state

    @property
    def link_reason(self) -> str:
        return self.default.link_reason

    @property
    def peer_fingerprint(self) -> str | None:
        return self.default.peer_fingerprint

    @property
    def peer_epoch(self) -> int | None:
        return self.default.peer_epoch

    @property
    def link_ups(self) -> int:
        return self.default.link_ups

    @property
    def feed(self) -> FeedScheduler:
        return self.default.feed

    @property
    def gate(self) -> WireGate:
        return self.default.gate

    @property
    def datagrams(self) -> DatagramService:
        return self.default.datagrams

    @property
    def rate(self) -> int:
        return self.default.rate

    @property
    def trust(self) -> TrustStore:
        return self.default.trust

    @trust.setter
    def trust(self, store: TrustStore) -> None:
        self.default.trust = store

    @property
    def _last_attempt_heard(self) -> bool:
        return self.default.last_attempt_heard

    def _set_link(self, state: LinkState, reason: str = "") -> None:
        self.default.set_link(state, reason)

    async def _run_connection(self, conn: QuicConn, *, dialer: bool) -> None:
        await self.run_connection(conn, dialer=dialer, link=self.default)

    def link_named(self, name: str | None) -> PeerLink:
        """The link a client means: ``name``, or the only one when ``name`` is None.

        Raises ``LookupError`` (unknown name) or ``ValueError`` (several links, no name)."""
        if name is None or (name == "" and not self.hub):
            if self.hub:
                raise ValueError(f"this agent has {len(self.links)} peers "
                                 f"({', '.join(self.links)}): say which")
            return self.default
        link = self.links.get(name)
        if link is None:
            raise LookupError(f"no peer named {name!r} (peers: "
                              f"{', '.join(n or '(unnamed)' for n in self.links)})")
        return link

    # -- life ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            os.close(self._lock_fd)

    def _bind_address(self) -> tuple[Any, Address, Address | None]:
        """(address family, where to bind, the address headers are counted for)."""
        cfg = self.config
        bind_host, bind_port = cfg.listen if cfg.listen else ("0.0.0.0", 0)
        family, _ = resolve(bind_host, bind_port)
        dialled = [link.address for link in self.links.values() if link.address is not None]
        counted: Address | None = None
        if cfg.listen is None and dialled:
            family, counted = resolve(*dialled[0])
            bind_host = "::" if family.name == "AF_INET6" else "0.0.0.0"
        if cfg.rendezvous is not None:  # both agents dial out to the relay
            family, _ = resolve(*cfg.rendezvous)
            bind_host = "::" if family.name == "AF_INET6" else "0.0.0.0"
        return family, (bind_host, bind_port), counted

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        cfg = self.config
        family, bind, counted = self._bind_address()
        self.sock = self._socket_factory(bind, family=family, link_overhead=cfg.link_overhead)
        now = trio.current_time()
        header = header_bytes_for(family, counted[0] if counted else None)
        for gate in [self.total_gate, *(link.gate for link in self.links.values())]:
            if gate is not None:
                gate.set_link(header_bytes=header)
                gate.set_rate(gate.rate_bps, now)
        dials = any(link.address is not None for link in self.links.values())
        server = cfg.listen is not None or cfg.rendezvous is not None
        self._endpoint = QuicEndpoint(
            self.sock,
            make_connection=self._make_connection,
            configuration=self._quic_configuration(is_client=not server),
            client_configuration=self._quic_configuration(is_client=True) if dials else None,
            quic_kwargs={
                "stream_window": cfg.stream_window,
                "connection_window": cfg.connection_window,
                "max_streams": cfg.max_streams,
                "tickets": self.tickets if cfg.resumption else None,
            },
            path_memory=PathMemory(cfg.state_dir),
        )
        if cfg.listen is not None:  # flood protection for the open port (admission.py)
            self._endpoint.admission = HandshakeAdmission(label=self.label)
            gate = self._handshake_gate()
            self._endpoint.retry_gate = lambda size, now: gate.try_send(size, now)
        log.info("agent %s starting (udp %s:%d)", self.identity.fingerprint, *self.sock.address,
                 extra={"event": "agent.starting", "agent": self.label,
                        "fingerprint": self.identity.fingerprint,
                        "udp": f"{self.sock.address[0]}:{self.sock.address[1]}"})
        control = ControlServer(self, self.book, cfg.control)
        try:
            listener = control.bind()
        except BaseException:
            self.sock.close()
            raise
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(control.serve, listener)
                nursery.start_soon(self._endpoint.run, nursery)
                nursery.start_soon(self._housekeeping)
                for link in self.links.values():
                    nursery.start_soon(link.feed.run, link.unsent)
                    self.book.stats.link_changed(link.link_state.value, now)
                if self.rate_total:
                    nursery.start_soon(self._share_total)
                if cfg.metrics is not None:
                    await nursery.start(serve_metrics, self, *cfg.metrics)
                if cfg.rendezvous is not None:
                    nursery.start_soon(run_rendezvous, self, nursery)
                else:
                    for link in self.links.values():
                        if link.address is not None:
                            nursery.start_soon(link.dial_loop)
                    if cfg.listen is not None:
                        nursery.start_soon(self._accept_loop, nursery)
                self.ready.set()
                task_status.started()
        finally:
            self.sock.close()
            self.journal.close()

    def _handshake_gate(self) -> WireGate:
        """What a connection counts against before we know whose it is: the total cap on
        a hub, the one link's cap otherwise."""
        if self.hub and self.total_gate is not None:
            return self.total_gate
        return self.default.gate

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def shutdown(self, reason: str = "agent shutting down") -> None:
        """Stop cleanly: close every QUIC connection with a reason, then stop every task.

        The control server's cleanup removes the socket as its task unwinds.
        """
        if self._nursery is None or self._stopping:
            return
        self._stopping = True
        log.info("%s: shutting down: %s", self.label, reason,
                 extra={"event": "shutdown", "agent": self.label, "reason": reason})
        sessions = [link.session for link in self.links.values() if link.session is not None]
        for session in sessions:
            session.conn.close(reason)
        with trio.move_on_after(1.0):  # let the CONNECTION_CLOSEs reach the wire
            for session in sessions:
                await session.conn.terminated.wait()
        self._nursery.cancel_scope.cancel()

    @property
    def label(self) -> str:
        """How this agent names itself in logs (two agents may share a process)."""
        if self.config.name:
            return self.config.name
        return "dialler" if self.config.peer else "listener"

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
        if self._endpoint is not None and self._endpoint.admission is not None:
            self._endpoint.admission.identity_refused(conn.peer, trio.current_time())
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

        Connections made from now on present it; the current sessions go on
        undisturbed on the identity they were authenticated with.
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

    def _make_connection(self, quic: Any, sock: UdpSocket, peer: Address, *,
                         link: PeerLink | None = None) -> QuicConn:
        """A connection we dial (``link`` known) or accept (whose it is, the certificate
        says: until then it counts against the hub's total cap)."""
        if link is None and not self.hub:
            link = self.default
        gate = link.gate if link is not None else self._handshake_gate()
        gate.set_link(header_bytes=header_bytes_for(sock.family, peer[0]))
        quic.follow_cap(gate)

        def verify(der: bytes | None) -> str | None:
            problem, found = self._verify_peer(der, quic.peer_certificate_chain(), peer, link)
            if found is not None:
                self._identified[conn] = found
                if found.gate is not conn.gate:  # an accepted hub connection: now its link's
                    found.gate.set_link(header_bytes=gate.header_bytes)
                    conn.gate = found.gate
                    quic.follow_cap(found.gate)
                conn.label = found.label
                conn.on_datagram = found.datagrams.received  # best-effort datagrams
            return problem

        conn = QuicConn(
            quic,
            sock,
            peer,
            verify_peer=verify,
            send_high_water=self.config.send_high_water,
            keepalive=self.config.keepalive,
            label=link.label if link is not None else self.label,
            gate=gate,
            dead_after=self.config.dead_after,
            hold_for=self.config.idle_timeout,
        )
        return conn

    def _verify_peer(self, der: bytes | None, chain: Any = (), peer: Address | None = None,
                     link: PeerLink | None = None) -> tuple[str | None, PeerLink | None]:
        """(``None``, its link) if the peer's certificate is pinned (or endorsed by a pinned
        one during the peer's identity rotation) by ``link`` — or, for a connection we
        accepted on a hub, by any link; else (why it is refused, ``None``)."""
        if der is None:
            return "untrusted peer: it presented no certificate", None
        for candidate in [link] if link is not None else self.links.values():
            if candidate.trust.trusts_chain(der, chain) is not None:
                return None, candidate
        admission = self._endpoint.admission if self._endpoint is not None else None
        if admission is not None and peer is not None:
            admission.identity_refused(peer, trio.current_time())  # ignored a while
        self.book.stats.peer_refused("untrusted_identity")
        return f"untrusted peer: identity {fingerprint_of_der(der)} is not in the trust list", None

    # -- links ---------------------------------------------------------------------

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        assert self._endpoint is not None
        async for conn in self._endpoint.accepted:
            nursery.start_soon(self._serve_accepted, conn)

    async def _serve_accepted(self, conn: QuicConn) -> None:
        assert self._endpoint is not None
        try:
            await self.run_connection(conn, dialer=False, link=None)
        finally:
            self._endpoint.forget(conn)

    async def run_connection(self, conn: QuicConn, *, dialer: bool,
                             link: PeerLink | None) -> None:
        """Drive one connection: authenticate, run a session, report why it ended.

        ``link`` is the link we dialled for; an accepted connection's link is known
        once its certificate has been checked."""
        reason = "connection closed"
        if link is not None:
            link.last_attempt_heard = True
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            if dialer:
                assert link is not None
                # Probe: an attempt that hears nothing is replaced quickly by a fresh one,
                # so the link's return is noticed within one probe interval, not after
                # QUIC's exponential Initial backoff.
                with trio.move_on_after(link.probe_wait()):
                    await _first(conn.first_rx.wait, conn.terminated.wait)
                if not conn.first_rx.is_set():
                    link.last_attempt_heard = False
                    conn.abandon("no answer to this dial attempt", quiet=True)
                    nursery.cancel_scope.cancel()
                    return
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    await _first(conn.authenticated.wait, conn.terminated.wait)
                if conn.closed is not None:
                    return
                link = self._identified.pop(conn, link)
                assert link is not None  # an authenticated connection has passed verify
                if dialer and await link.prefer_held(conn):
                    # Dialled while the session's connection was held silent, and that
                    # one is heard again: it carries on, this one goes (before our
                    # hello, so the peer never switches to it).
                    reason = "the held connection answered"
                    conn.close(reason)
                    return
                conn.on_silence = functools.partial(link.connection_silent, conn)
                self.book.stats.handshake.observe(trio.current_time() - started)
                self.book.stats.handshakes[("resumed" if conn.resumed else "full")] += 1
                session = Session(link, self.book, link.feed, conn, dialer=dialer,
                                  early=dialer and link.peer_epoch is not None,
                                  policy=self.incoming_policy, exports=self.exports,
                                  datagrams=link.datagrams, peer=link.name, shared=self.hub)
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
                    log.error("%s: refusing peer %s:%d: %s", conn.label, *conn.peer, leaf)
                    conn.close(reason[:200], code=APP_ERROR_UNTRUSTED)
                elif isinstance(leaf, (ProtocolError, SessionEnded)):
                    reason = f"session error: {leaf}"
                    conn.close(str(leaf)[:200])
                else:
                    reason = f"internal error: {leaf!r}"
                    log.exception("%s: session failed", conn.label)
                    conn.close("internal error")
            finally:
                self._identified.pop(conn, None)
                reason = conn.closed or reason
                log.log(logging.INFO if self._stopping else logging.WARNING,
                        "%s: connection with %s:%d ended: %s", conn.label, *conn.peer, reason,
                        extra={"event": "connection.ended", "agent": self.label,
                               "link": link.name if link is not None else None,
                               "peer": f"{conn.peer[0]}:{conn.peer[1]}", "reason": reason})
                if link is not None:
                    link.session_ended(conn, reason)
                if conn.closed is None:
                    conn.close(reason[:200])
                with trio.move_on_after(1):
                    await conn.terminated.wait()
                nursery.cancel_scope.cancel()

    # -- the rate caps and the feed -------------------------------------------------

    @property
    def cap(self) -> int:
        return self.rate

    def set_rate(self, rate_bps: int, peer: str | None = None) -> None:
        """Change a link's cap at run time (the only link's, or ``peer``'s); the next
        tick and datagram obey it."""
        link = self.link_named(peer)
        link.gate.check_rate(rate_bps)  # a cap below one datagram a second is refused
        link.rate = rate_bps
        log.info("%s: rate cap %s", link.label, f"{rate_bps} bit/s" if rate_bps else "off",
                 extra={"event": "rate", "agent": self.label, "link": link.name,
                        "rate": rate_bps})
        self._apply_rates()

    def set_rate_total(self, rate_bps: int) -> None:
        """Change the total cap (all links together; 0 = none) at run time."""
        if self.total_gate is None:
            raise ValueError("this agent has one peer and was started without --rate-total: "
                             "its total is its link's cap (set that instead)")
        self.total_gate.set_rate(rate_bps, trio.current_time())  # validates
        started = not self.rate_total and rate_bps
        self.rate_total = rate_bps
        log.info("%s: total rate cap %s", self.label,
                 f"{rate_bps} bit/s" if rate_bps else "off",
                 extra={"event": "rate_total", "agent": self.label, "rate": rate_bps})
        if started and self._nursery is not None:
            self._nursery.start_soon(self._share_total)
        self._apply_rates()

    def links_changed(self) -> None:
        """A link came up or went down: divide the total cap again now."""
        self._share_wake.set()

    def link_wants(self, link: PeerLink) -> None:
        """A transfer of ``link`` waits for bytes: if the link was idle at the last
        division of the total cap, divide again now (not at the next period)."""
        if self.rate_total and link.name not in self._busy:
            self._share_wake.set()

    def _apply_rates(self) -> None:
        """Give every link its rate now: its own cap, or its share of the total."""
        floor = minimum_rate(self.config.max_datagram_size,
                             IPV6_UDP_HEADER + self.config.link_overhead)
        caps = {name: link.rate for name, link in self.links.items()}
        busy = {name for name, link in self.links.items() if link.busy()}
        self._busy = busy
        for name, rate in effective_rates(self.rate_total, caps, busy, floor=floor).items():
            self.links[name].apply_rate(rate)

    async def _share_total(self) -> None:
        """Divide the total cap among the links that have bytes to send: again whenever a
        link comes or goes, and every :data:`SHARE_EVERY` while any is busy (with none
        busy it waits, so an idle hub does not wake for it)."""
        while self.rate_total:
            self._apply_rates()
            any_busy = any(link.busy() for link in self.links.values())
            with trio.move_on_after(SHARE_EVERY if any_busy else self.config.keepalive):
                await self._share_wake.wait()
            self._share_wake = trio.Event()
        self._apply_rates()

    async def _housekeeping(self) -> None:
        """Progress events, busy retries and history pruning, at the progress interval
        while any transfer is live. With none it parks until one is (any transfer
        event wakes it) or the next expiry sweep or prune is due: an idle agent does
        not wake for it more often than every :data:`SWEEP_EVERY`."""
        last: dict[str, int] = {}
        next_prune = next_sweep = trio.current_time()
        table = self.book.table
        while True:
            if not table.any_live():
                with trio.move_on_at(min(next_sweep, next_prune)) as idle:
                    await self.book.activity.park()
                if not idle.cancelled_caught:
                    continue  # a transfer appeared: sample it a progress interval from now
            else:
                await trio.sleep(self.config.progress_interval)
            self._sample_stats()
            for t in table.live():
                if t.state is State.ACTIVE and last.get(t.id) != t.delivered:
                    last[t.id] = t.delivered
                    self.book.publish("transfer.progress", t)
            for tid in [tid for tid in last if tid not in table]:
                del last[tid]
            if any(t.not_before for t in table.queue()):
                self.book.fill()  # a transfer refused as busy may retry now
            if trio.current_time() >= next_sweep:
                next_sweep = trio.current_time() + SWEEP_EVERY
                self.book.sweep_expired()
            if trio.current_time() >= next_prune:
                next_prune = trio.current_time() + PRUNE_EVERY
                self.book.prune()

    def _sample_stats(self) -> None:
        now = trio.current_time()
        by_link: dict[str, list[Transfer]] = {name: [] for name in self.links}
        for t in self.book.table.live():
            if t.peer in by_link:
                by_link[t.peer].append(t)
        for name, link in self.links.items():
            link.sample_stats(by_link[name], now)

    def status(self) -> dict[str, Any]:
        counters = self.sock.counters if self.sock else None
        states: dict[str, int] = {}
        by_link: dict[str, dict[str, int]] = {name: {} for name in self.links}
        for t in self.book.table:
            states[t.state.value] = states.get(t.state.value, 0) + 1
            if t.peer in by_link:
                counts = by_link[t.peer]
                counts[t.state.value] = counts.get(t.state.value, 0) + 1
        default = self.default
        out: dict[str, Any] = {
            "agent": self.identity.fingerprint,
            "name": self.config.name,
            "epoch": self.epoch,
            "role": ("listen" if self.config.listen else "dial") if self.hub
                    else ("dial" if self.config.peer else "listen"),
            "udp": list(self.udp_address) if self.sock else None,
            "link": default.link_status(),
            "transfers": states,
            "wire": None,
        }
        out["rate"] = default.rate
        out["rate_total"] = self.rate_total
        out["datagrams"] = default.datagrams.status()
        if self.rendezvous is not None:
            out.update(self.rendezvous.status(default.session.conn.peer
                                              if default.session else None))
        now = trio.current_time() if self.sock is not None else 0.0
        if counters is not None:
            gate = self.total_gate if self.hub and self.total_gate is not None else default.gate
            out["wire"] = {
                "rate": gate.window_bytes(now) * 8,
                "payload_rate": gate.window_payload(now) * 8,
                "wire_bytes_sent": counters.wire_bytes_sent,
                "wire_bytes_received": counters.wire_bytes_received,
                "header_bytes": gate.header_bytes,
                "link_overhead": self.config.link_overhead,
                "held_datagrams": sum(link.gate.held for link in self.links.values()),
                "bytes_sent": counters.bytes_sent,
                "bytes_received": counters.bytes_received,
                "datagrams_sent": counters.datagrams_sent,
                "datagrams_received": counters.datagrams_received,
            }
        if default.session is not None:
            out["link"]["congestion"] = self.config.congestion
        out["peers"] = [
            {"name": name, "link": link.link_status(), "rate": link.rate,
             "effective_rate": link.effective_rate,
             "address": None if link.address is None else f"{link.address[0]}:{link.address[1]}",
             "wire": link.wire_status(now) if self.sock is not None else None,
             "transfers": by_link[name], "datagrams": link.datagrams.status()}
            for name, link in self.links.items()]
        return out

    def rates(self) -> dict[str, Any]:
        """Every cap: each link's own and what it may use now, and the total."""
        return {"rate": self.rate_total if self.hub else self.default.rate,
                "rate_total": self.rate_total,
                "peers": {name: {"rate": link.rate, "effective": link.effective_rate}
                          for name, link in self.links.items()}}


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
