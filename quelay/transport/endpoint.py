"""A UDP endpoint that demultiplexes datagrams to QUIC connections.

The listening agent accepts connections (a reconnecting peer arrives as a new
connection with new connection IDs); the dialling agent has one at a time.
Batched receive: one wake-up drains the socket, feeds every datagram, then
kicks each touched connection once so it transmits one batch.

Path memory: when a connection ends (``forget``), the endpoint remembers its
peer's smoothed RTT (:class:`~quelay.transport.path_memory.PathMemory`, on
disk when given a state directory); every new connection to or from that
host starts from it, so a reconnect on a 750 ms link does not spend its
first second retransmitting Initials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from .admission import HandshakeAdmission, Verdict, host_of
from .connection import QuicConn
from .path_memory import PathMemory
from .quic_ext import QuelayQuicConnection
from .udp import Address, UdpSocket

log = logging.getLogger("quelay.transport")

CID_LENGTH = 8
MIN_INITIAL_SIZE = 1200


class QuicEndpoint:
    def __init__(
        self,
        sock: UdpSocket,
        *,
        make_connection: Callable[..., QuicConn],
        configuration: QuicConfiguration,
        quic_kwargs: dict[str, object],
        path_memory: PathMemory | None = None,
        client_configuration: QuicConfiguration | None = None,
    ) -> None:
        self.sock = sock
        self.path_memory = path_memory if path_memory is not None else PathMemory()
        self._make_connection = make_connection
        self._configuration = configuration
        self._quic_kwargs = quic_kwargs
        self._by_cid: dict[bytes, QuicConn] = {}
        self._clients: set[QuicConn] = set()  # connections we dialled, still running
        # Connections we dial use a client configuration even on a listener (a hub).
        self._client_configuration = client_configuration or configuration
        self._accepted: trio.MemorySendChannel[QuicConn]
        self._accepted, self.accepted = trio.open_memory_channel[QuicConn](16)
        # Datagrams that are not QUIC (first byte without the fixed bit 0x40, e.g. the
        # rendezvous protocol sharing this socket) go here instead of being ignored.
        self.foreign: Callable[[bytes, Address], None] | None = None
        # Flood protection for a listener (see admission.py): decides on every Initial
        # that would start a connection; Retry datagrams pass ``retry_gate`` (the cap).
        self.admission: HandshakeAdmission | None = None
        self.retry_gate: Callable[[int, float], bool] | None = None
        self._handshaking: dict[QuicConn, str] = {}  # accepted, not authenticated: host
        self._retries: list[tuple[bytes, Address]] = []

    def reconfigure(self, configuration: QuicConfiguration) -> None:
        """Use ``configuration`` (e.g. another role) for connections made from now on."""
        self._configuration = self._client_configuration = configuration

    @staticmethod
    def path_key(addr: Address) -> str:
        """Path memory's key for a peer: its host (a reconnecting dialler's port may change)."""
        host = addr[0].lower()
        return host.removeprefix("::ffff:")

    def remembered_rtt(self, peer: Address) -> float | None:
        """The smoothed RTT remembered for ``peer``'s host, if any (seconds)."""
        entry = self.path_memory.load(self.path_key(peer))
        return entry.rtt if entry is not None else None

    def _new_quic(self, peer: Address, configuration: QuicConfiguration | None = None,
                  **extra: object) -> QuelayQuicConnection:
        remembered = self.path_memory.load(self.path_key(peer))
        if remembered is not None:
            extra["remembered_rtt"] = remembered.rtt
            extra["remembered_rtt_var"] = remembered.rtt_var
        return QuelayQuicConnection(
            configuration=configuration or self._configuration,
            **self._quic_kwargs, **extra  # type: ignore[arg-type]
        )

    def connect(self, peer: Address, **context: object) -> QuicConn:
        """Start a client connection to ``peer``; drive it with ``conn.run()``.

        ``context`` goes to ``make_connection`` (a hub says which link dials).
        Several client connections may run at once (a hub dials several peers):
        with one, every datagram is its; with more, datagrams go by connection ID.
        """
        quic = self._new_quic(peer, configuration=self._client_configuration)
        conn = self._make_connection(quic, self.sock, peer, **context)
        quic.connect(peer, now=trio.current_time())
        self._clients.add(conn)
        self._register(conn)
        conn.kick()
        return conn

    def _register(self, conn: QuicConn) -> None:
        def on_cid(event: events.QuicEvent) -> None:
            if isinstance(event, events.ConnectionIdIssued):
                self._by_cid[event.connection_id] = conn
            elif isinstance(event, events.ConnectionIdRetired):
                self._by_cid.pop(event.connection_id, None)

        conn.cid_listeners.append(on_cid)
        self._by_cid[conn.quic.host_cid] = conn

    def forget(self, conn: QuicConn) -> None:
        """The connection is over: drop its routes and remember its path's RTT (only a
        peer's that authenticated: a stranger must not seed our next handshake)."""
        if conn.authenticated.is_set():
            self.path_memory.remember(self.path_key(conn.peer), conn.path_stats())
        for cid in [cid for cid, c in self._by_cid.items() if c is conn]:
            del self._by_cid[cid]
        self._clients.discard(conn)
        self._handshaking.pop(conn, None)

    def handshakes_in_progress(self, host: str | None = None) -> int:
        """Accepted connections not yet authenticated (from ``host``, if given)."""
        for conn in [c for c in self._handshaking
                     if c.authenticated.is_set() or c.closed is not None]:
            del self._handshaking[conn]
        if host is None:
            return len(self._handshaking)
        return sum(1 for h in self._handshaking.values() if h == host)

    async def run(self, nursery: trio.Nursery) -> None:
        """Receive loop; accepted server connections run as tasks in ``nursery``."""
        sock, route = self.sock, self._route
        while True:
            await sock.wait_readable()
            touched: dict[int, QuicConn] = {}
            now = trio.current_time()
            foreign = self.foreign
            last: QuicConn | None = None
            for data, addr in sock.recv_batch():
                if foreign is not None and data and not data[0] & 0x40:
                    foreign(data, addr)
                    continue
                conn = route(data, addr, nursery)
                if conn is not None:
                    conn.datagram_received(data, addr, now)
                    if conn is not last:  # (a batch is mostly one connection's)
                        touched[id(conn)] = last = conn
            for conn in touched.values():
                conn.process_events()
                conn.kick()
            if self._retries:
                retries, self._retries = self._retries, []
                await self.sock.send_batch(retries)

    def _admit(self, header: Any, addr: Address) -> tuple[bytes, bytes | None] | None:
        """Ask the admission about a connection-starting Initial: (original dcid,
        retry scid) to accept it, ``None`` when it is dropped or answered by a Retry."""
        assert self.admission is not None
        now = trio.current_time()
        decision = self.admission.initial(
            addr=addr, version=header.version, dcid=header.destination_cid,
            scid=header.source_cid, token=header.token, now=now,
            in_progress=self.handshakes_in_progress(),
            in_progress_host=self.handshakes_in_progress(host_of(addr)))
        if decision.verdict is Verdict.RETRY:
            assert decision.retry_packet is not None
            if self.retry_gate is None or self.retry_gate(len(decision.retry_packet), now):
                self._retries.append((decision.retry_packet, addr))
            else:
                self.admission.refused("cap", addr, now)  # the cap holds for Retries too
            return None
        if decision.verdict is Verdict.DROP:
            return None
        assert decision.original_dcid is not None
        return decision.original_dcid, decision.retry_scid

    def _route(self, data: bytes, addr: Address, nursery: trio.Nursery) -> QuicConn | None:
        dialler = self._configuration.is_client
        if dialler and len(self._clients) == 1:
            return next(iter(self._clients))  # the common case: one peer, one connection
        if len(data) > CID_LENGTH and not data[0] & 0x80:
            # Short header (1-RTT, nearly every datagram): the destination CID follows
            # the first byte; no need to parse a header per datagram to route it.
            conn = self._by_cid.get(data[1:1 + CID_LENGTH])
            if conn is not None:
                return conn
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return None  # not QUIC: ignore, as any UDP service must
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            return conn
        if dialler:
            return None  # a dialler never accepts: a late answer to an abandoned attempt
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < MIN_INITIAL_SIZE
            or header.version not in self._configuration.supported_versions
        ):
            return None
        original_dcid, retry_scid = header.destination_cid, None
        if self.admission is not None:
            decision = self._admit(header, addr)
            if decision is None:
                return None
            original_dcid, retry_scid = decision
        quic = self._new_quic(addr, original_destination_connection_id=original_dcid,
                              retry_source_connection_id=retry_scid)
        conn = self._make_connection(quic, self.sock, addr)
        self._register(conn)
        self._by_cid[header.destination_cid] = conn
        self._handshaking[conn] = host_of(addr)
        try:
            self._accepted.send_nowait(conn)
        except trio.WouldBlock:
            log.warning("dropping connection attempt from %s:%d: accept queue full", *addr)
            self.forget(conn)
            return None
        return conn

