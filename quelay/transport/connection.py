"""One QUIC connection driven by Trio: timers, transmit, streams with back-pressure.

The aioquic ``QuicConnection`` is sans-IO; this class is its Trio edge. The
endpoint feeds received datagrams in (``datagram_received``); ``run`` owns the
timer and transmit loop. Upper layers see streams: ``send`` waits while a
stream holds more than ``send_high_water`` unsent+unacked bytes, and
``InboundStream.receive_some`` grants the peer new credit only for what it
hands out.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio
from aioquic.quic import events

from .liveness import Liveness
from .pacing import WireGate
from .quic_ext import PathStats, QuelayQuicConnection
from .udp import Address, UdpSocket

log = logging.getLogger("quelay.transport")

__all__ = ["ConnectionClosed", "InboundStream", "Liveness", "PathStats", "QuicConn", "StreamReset"]

APP_ERROR_UNTRUSTED = 0x101
APP_ERROR_SHUTDOWN = 0x100


class ConnectionClosed(Exception):
    """The QUIC connection ended; ``reason`` says how (and from which side)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StreamReset(Exception):
    """The peer reset the stream (it abandoned the transfer's bytes)."""


@dataclass
class _RecvState:
    chunks: deque[bytes]
    buffered: int = 0
    ended: bool = False
    reset: int | None = None


class InboundStream:
    """A peer-initiated stream; consumption drives the credit granted to the peer."""

    def __init__(self, conn: QuicConn, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._state = _RecvState(deque())
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def buffered(self) -> int:
        return self._state.buffered

    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._state.chunks.append(data)
            self._state.buffered += len(data)
        if end:
            self._state.ended = True
        self._lot.unpark_all()

    def _reset(self, code: int) -> None:
        self._state.reset = code
        self._lot.unpark_all()

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Next bytes of the stream; ``b""`` at its end. Raises on reset/closure."""
        state = self._state
        while not state.chunks:
            if state.reset is not None:
                raise StreamReset(f"peer reset stream {self.stream_id} (code {state.reset})")
            if state.ended:
                return b""
            if self.conn.closed is not None:
                raise ConnectionClosed(self.conn.closed)
            await self._lot.park()
        # Coalesce: aioquic delivers one event per packet (~1.3 KB); consumers want
        # big writes (one socket send or file write per batch, not per packet).
        chunks = state.chunks
        parts: list[bytes] = []
        taken = 0
        while chunks and taken < max_bytes:
            chunk = chunks.popleft()
            room = max_bytes - taken
            if len(chunk) > room:
                chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            parts.append(chunk)
            taken += len(chunk)
        state.buffered -= taken
        self.conn.consume(self.stream_id, taken)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wake(self) -> None:
        self._lot.unpark_all()


class QuicConn:
    def __init__(
        self,
        quic: QuelayQuicConnection,
        sock: UdpSocket,
        peer: Address,
        *,
        verify_peer: Callable[[bytes | None], str | None],
        send_high_water: int,
        keepalive: float,
        label: str = "agent",
        gate: WireGate | None = None,
        dead_after: float = 3.0,
        hold_for: float = 0.0,
    ) -> None:
        self.quic = quic
        self.sock = sock
        self.peer = peer
        self._verify_peer = verify_peer
        self.send_high_water = send_high_water
        self.keepalive = keepalive
        self.label = label
        self.gate = gate if gate is not None else WireGate(0, trio.current_time())
        self._outbox: deque[tuple[bytes, Address]] = deque()
        self._gate_at: float | None = None
        self.liveness = Liveness(dead_after)
        # Through an outage the connection is held (its streams, windows and RTT kept,
        # probing at a bounded interval) for up to ``hold_for`` seconds of silence, so
        # the link's return costs one probe, not a new handshake and a resume. 0: the
        # connection is abandoned at the dead-link bound.
        self.hold_for = hold_for
        self.silent = False  # past the dead-link bound, held: the link is reported down
        self.on_silence: Callable[[str | None], None] | None = None  # reason, None: heard again
        self.first_rx = trio.Event()
        self.authenticated = trio.Event()
        self.terminated = trio.Event()
        self.closed: str | None = None
        self.peer_fingerprint: str | None = None
        # A resumed TLS session: the peer's identity is the ticket's until its hello
        # proves it on this connection (``binding`` is what it signs).
        self.resumed = False
        self.binding = b""
        self._closing: events.ConnectionTerminated | None = None  # close() called, not yet sent
        self._wake = trio.Event()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._inbound: dict[int, InboundStream] = {}
        self._discarded: set[int] = set()
        self._new_streams: deque[InboundStream] = deque()
        self._new_lot = trio.lowlevel.ParkingLot()
        self.pings_sent = 0  # keep-alive PINGs (none while traffic flows both ways)
        self.cid_listeners: list[Callable[[events.QuicEvent], None]] = []
        # Best-effort datagrams (quelay.agent.datagrams): a DATAGRAM frame from the
        # authenticated peer; queued ones join the packets built in transmit().
        self.on_datagram: Callable[[bytes], None] | None = None
        self.before_build: Callable[[float], None] | None = None
        self.after_build: Callable[[], None] | None = None
        # Tail protection spends only spare cap: none while datagrams wait for the gate.
        quic.set_spare_cap(lambda: not self._outbox)

    def path_stats(self) -> PathStats:
        """RTT, window, losses and recovery state of this connection's path."""
        return self.quic.path_stats()

    # -- driving -------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        self.liveness.heard(now)
        if self.silent:
            self._set_silent(None)
        if not self.first_rx.is_set():
            self.first_rx.set()
        self.quic.receive_datagram(data, addr, now)
        closed_by_peer = self.quic.closed_by_peer
        if closed_by_peer is not None:
            # aioquic reports it only after draining (3 PTOs: seconds on a long link);
            # nothing more can be sent or received on it, so the session ends now.
            self._terminate(closed_by_peer)

    async def run(self) -> None:
        """Timer + transmit loop; returns when the connection has terminated."""
        async with trio.open_nursery() as nursery:
            if self.keepalive > 0:
                nursery.start_soon(self._keepalive_loop)
            try:
                await self._timer_loop()
            finally:
                nursery.cancel_scope.cancel()

    async def _timer_loop(self) -> None:
        while True:
            # While the gate holds datagrams, aioquic's pacing deadline is moot (and stale).
            timer = self.quic.get_timer_held() if self._outbox else self.quic.get_timer()
            deadline = timer if timer is not None else math.inf
            if self._gate_at is not None:
                deadline = min(deadline, self._gate_at)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            if timer is not None and now >= timer:
                self.quic.handle_timer(now)
            self.process_events()
            await self.transmit()
            if self.closed is not None:
                return

    async def transmit(self) -> None:
        """Send what QUIC has, as far as the wire gate allows; hold the rest.

        Held datagrams are few: aioquic's pacer already runs at the cap, so the
        gate only trims bursts. aioquic is asked for more only once they are out.
        """
        now = trio.current_time()
        outbox = self._outbox
        if not outbox:
            if self.before_build is not None:  # best-effort datagrams join these packets
                self.before_build(now)
            outbox.extend(self.quic.datagrams_to_send(now))
            if self.after_build is not None:
                self.after_build()
            if not outbox:
                self._gate_at = None
                self._closed_locally()
                return
        gate = self.gate
        if gate.capped:
            batch = []
            while outbox and gate.try_send(len(outbox[0][0]), now):
                batch.append(outbox.popleft())
        else:
            batch = list(outbox)
            outbox.clear()
            gate.try_send(sum(len(d) for d, _ in batch), now, datagrams=len(batch))
        self._gate_at = gate.ready_at(len(outbox[0][0]), now) if outbox else None
        if batch:
            await self.sock.send_batch(batch)
        if not outbox:
            self._closed_locally()

    def _closed_locally(self) -> None:
        """Our CONNECTION_CLOSE left: end the session now rather than after the drain.
        (Datagrams the gate held from before close() leave first; the close is built
        only after them.)"""
        if self._closing is None:
            return
        if self.quic.close_pending:
            self.kick()  # the gate's backlog left: build the CONNECTION_CLOSE now
            return
        closing, self._closing = self._closing, None
        self._terminate(closing)

    async def _keepalive_loop(self) -> None:
        """PING every interval; declare the link dead when nothing comes back in time,
        and give the connection up when the silence outlasts what it is held for."""
        await self.authenticated.wait()
        self.liveness.heard(trio.current_time())
        while self.closed is None:
            await trio.sleep(self.keepalive)
            now = trio.current_time()
            rtt = self.quic.path_stats().rtt
            if self.liveness.is_dead(now, rtt):
                silence = now - self.liveness.last_heard
                if silence > self.hold_for:
                    self.abandon(f"link dead: nothing heard from the peer for {silence:.1f}s")
                    return
                if not self.silent:
                    self._set_silent(f"nothing heard from the peer for {silence:.1f}s; "
                                     f"the connection is held for {self.hold_for:.0f}s")
            elif now - self.liveness.last_heard < self.keepalive:
                # Traffic flows: the peer was just heard, and what we send it elicits
                # or carries ACKs. A PING (and the ACK it elicits) would only take
                # the link's bytes: 1 % of a 100 kbit/s one.
                continue
            self.pings_sent += 1
            self.quic.send_keepalive(self.pings_sent, now)
            self.kick()

    def peer_heard_elsewhere(self) -> None:
        """The peer answered another connection of ours (a dial attempt made while this
        one is held): the path is back, so probe now, not at the next probe timer."""
        self.quic.path_is_back(trio.current_time())
        self.kick()

    def _set_silent(self, reason: str | None) -> None:
        """Past the dead-link bound (``reason``) or heard again (``None``): tell the owner."""
        self.silent = reason is not None
        if reason is not None:
            log.info("%s: link silent: %s", self.label, reason)
        if self.on_silence is not None:
            self.on_silence(reason)

    def abandon(self, reason: str, *, quiet: bool = False) -> None:
        """Give up on a connection we cannot reach: no close handshake, it is gone."""
        log.log(logging.DEBUG if quiet else logging.INFO, "%s: %s", self.label, reason)
        self._terminate(events.ConnectionTerminated(
            error_code=APP_ERROR_SHUTDOWN, frame_type=None, reason_phrase=reason))

    def process_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            self._handle_event(event)
        # ACKs may have freed send buffer space.
        self._send_lot.unpark_all()

    def _handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self._inbound.get(event.stream_id)
            if stream is None:
                if event.stream_id in self._discarded:
                    return  # late bytes for a stream we already gave up on
                stream = InboundStream(self, event.stream_id)
                self._inbound[event.stream_id] = stream
                self._new_streams.append(stream)
                self._new_lot.unpark_all()
            stream._feed(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            inbound = self._inbound.get(event.stream_id)
            if inbound is not None:
                inbound._reset(event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            self._check_peer()
        elif isinstance(event, events.ConnectionTerminated):
            self._terminate(event)
        elif isinstance(event, (events.ConnectionIdIssued, events.ConnectionIdRetired)):
            for listener in self.cid_listeners:
                listener(event)
        elif isinstance(event, events.DatagramFrameReceived) and self.on_datagram is not None \
                and self.authenticated.is_set():
            # Only an authenticated peer's datagrams count (the check runs at the
            # handshake's completion, an event before any 1-RTT datagram).
            self.on_datagram(event.data)

    def _check_peer(self) -> None:
        der = self.quic.peer_certificate_der()
        problem = self._verify_peer(der)
        if problem is not None:
            log.error("%s: refusing peer %s:%d: %s", self.label, *self.peer, problem)
            self.quic.close(error_code=APP_ERROR_UNTRUSTED, reason_phrase=problem[:200])
            self.kick()
            return
        from ..identity import fingerprint_of_der

        assert der is not None
        self.peer_fingerprint = fingerprint_of_der(der)
        self.resumed = self.quic.session_resumed
        self.binding = self.quic.tls_binding()
        self.authenticated.set()

    def _terminate(self, event: events.ConnectionTerminated) -> None:
        if self.closed is not None:
            return
        reason = event.reason_phrase or f"error code {event.error_code:#x}"
        self.closed = reason
        self.terminated.set()
        for stream in self._inbound.values():
            stream._wake()
        self._send_lot.unpark_all()
        self._new_lot.unpark_all()
        self.kick()

    def close(self, reason: str, code: int = APP_ERROR_SHUTDOWN) -> None:
        if self.closed is None and self._closing is None:
            self.quic.close(error_code=code, reason_phrase=reason)
            self._closing = events.ConnectionTerminated(
                error_code=code, frame_type=None, reason_phrase=reason)
            self.kick()

    # -- streams -------------------------------------------------------------

    def open_stream(self) -> int:
        """A new unidirectional stream of ours (one per transfer)."""
        return self.quic.get_next_available_stream_id(is_unidirectional=True)

    def open_bidi(self) -> tuple[int, InboundStream]:
        """A new bidirectional stream of ours, with the receiving half registered."""
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=False)
        inbound = InboundStream(self, stream_id)
        self._inbound[stream_id] = inbound
        return stream_id, inbound

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)

    async def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue bytes on a stream, first waiting for its buffer to drain below the mark."""
        self._check_open()
        while self.quic.stream_buffered(stream_id) >= self.send_high_water:
            await self._send_lot.park()
            self._check_open()
        self.quic.send_stream_data(stream_id, data, end_stream)
        self.kick()

    def send_nowait(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """For small control frames, which must never wait behind bulk data."""
        self._check_open()
        self.quic.send_stream_data(stream_id, data, end_stream)
        self.kick()

    def reset_stream(self, stream_id: int, code: int = 0) -> None:
        if self.closed is None:
            try:
                self.quic.reset_stream(stream_id, code)
            except ValueError:
                return  # already finished: nothing left to abandon
            self.kick()

    def stream_buffered(self, stream_id: int) -> int:
        return self.quic.stream_buffered(stream_id)

    async def wait_all_acked(self, stream_id: int) -> None:
        while self.quic.stream_buffered(stream_id) > 0:
            self._check_open()
            await self._send_lot.park()

    def consume(self, stream_id: int, nbytes: int) -> None:
        self.quic.consume(stream_id, nbytes)
        self.kick()

    async def accept_stream(self) -> InboundStream:
        while not self._new_streams:
            self._check_open()
            await self._new_lot.park()
        return self._new_streams.popleft()

    def inbound_buffered(self) -> int:
        """Bytes received from the peer that no local consumer has taken yet."""
        return sum(stream.buffered for stream in self._inbound.values())

    def discard_stream(self, stream_id: int) -> None:
        """Drop our record of a finished inbound stream (its credit history too)."""
        stream = self._inbound.pop(stream_id, None)
        self._discarded.add(stream_id)
        self.quic.forget_stream(stream_id)
        if stream is not None and not stream._state.ended and self.closed is None:
            try:
                self.quic.stop_stream(stream_id, 0)
            except ValueError:
                return
            self.kick()
