"""Best-effort datagrams, the Trio side: the pump that feeds QUIC, and waiting readers.

One :class:`DatagramService` per agent outlives sessions (its counters and
inboxes do); the decisions are :mod:`quelay.core.datagrams`'. While a session
is up, queued datagrams are handed to aioquic by the connection's transmit
just before it builds packets, and aioquic writes DATAGRAM frames into a packet
ahead of any stream data: a datagram waits at most for the packets the wire
gate already holds and for pacing. aioquic's own datagram queue is kept to
about one packet's worth, and a datagram still in it at its deadline is taken
back before the next packet is built: nothing is sent later than its
``max_age``. The wire gate counts every packet, so the cap holds with
datagrams in it; the share bucket keeps them to ``datagram_share`` of the cap.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from ..core.datagrams import (
    HEADER_BYTES,
    MAX_AGE_LIMIT,
    Counters,
    Inboxes,
    MalformedDatagram,
    Outgoing,
    Received,
    SendQueue,
    decode_datagram_untrusted,
    encode_datagram,
)
from ..transport.connection import QuicConn
from ..transport.quic_ext import DATAGRAM_FRAME_LIMIT

__all__ = ["DATAGRAM_FRAME_LIMIT", "DatagramService"]

log = logging.getLogger("quelay.datagrams")


class DatagramService:
    """Send and receive named best-effort datagrams over whichever session is up.

    ``cap`` returns the operator's wire cap in bits/s (0 = uncapped) and
    ``header_bytes`` the IP/UDP header and link overhead per datagram (both
    read at each pump step, so a changed cap applies at once); ``wall`` is
    the clock for ``sent_at`` / ``received_at`` (Unix time).
    """

    def __init__(self, *, share: float, max_age: float, cap: Callable[[], int],
                 header_bytes: Callable[[], int] = lambda: 28,
                 wall: Callable[[], float] = time.time, label: str = "agent") -> None:
        if not 0 < max_age <= MAX_AGE_LIMIT:
            raise ValueError(f"datagram max_age must be in (0, {MAX_AGE_LIMIT:.0f}] seconds")
        self.counters = Counters()
        self.queue = SendQueue(self.counters, share=share)
        self.inboxes = Inboxes(self.counters)
        self.share = share
        self.max_age = max_age
        self._cap = cap
        self._header_bytes = header_bytes
        self._wall = wall
        self.label = label
        self._conn: QuicConn | None = None  # the session whose pump runs
        self._handed: deque[Outgoing] = deque()  # in aioquic's queue, oldest first
        self._wake = trio.Event()
        self._arrived = trio.lowlevel.ParkingLot()

    # -- the local side ---------------------------------------------------------------

    def capacity(self) -> int | None:
        """The most bytes of name, payload and header one datagram may have now
        (None: no session, or its connection is held through an outage, so no
        datagram can go now)."""
        conn = self._conn
        if conn is None or conn.closed is not None or conn.silent:
            return None
        return conn.quic.datagram_capacity()

    def send(self, name: str, payload: bytes, max_age: float | None = None) -> dict[str, Any]:
        """Queue one datagram (``name`` already checked); never waits.

        Returns ``{"accepted", "reason", "message", "sent_at", "max_payload"}``:
        refused at once when the link is down, the message is too big for the
        path, or too many wait already (all counted).
        """
        now = trio.current_time()
        sent_at = self._wall()
        frame = encode_datagram(name, payload, sent_at)
        age = self.max_age if max_age is None else max_age
        capacity = self.capacity()
        refusal = self.queue.offer(Outgoing(name, frame, len(payload), now + age), now,
                                   capacity)
        room = None if capacity is None else \
            max(0, capacity - (len(frame) - len(payload)))
        if refusal is not None:
            return {"accepted": False, "reason": refusal.reason, "message": refusal.message,
                    "sent_at": sent_at, "max_payload": room}
        self._wake.set()
        return {"accepted": True, "reason": None, "message": None, "sent_at": sent_at,
                "max_payload": room}

    async def recv(self, name: str, count: int = 1, timeout: float | None = None,
                   max_bytes: int | None = None) -> list[Received]:
        """Up to ``count`` datagrams named ``name``, oldest first, with at most
        ``max_bytes`` of payload (but at least one message): as soon as one is here,
        or none once ``timeout`` seconds passed without one (None: wait for ever)."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        with trio.move_on_at(deadline):
            while not self.inboxes.available(name):
                await self._arrived.park()
        return self.inboxes.take(name, count, max_bytes)

    # -- the peer's side --------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """A DATAGRAM frame from the peer (called while QUIC events are processed):
        keep it for readers; a malformed one is counted and dropped."""
        try:
            msg = decode_datagram_untrusted(data)
        except MalformedDatagram as exc:
            self.counters.malformed += 1
            log.debug("%s: dropped a malformed datagram: %s", self.label, exc)
            return
        self.inboxes.put(Received(msg.name, msg.payload, msg.sent_at, self._wall()))
        self._arrived.unpark_all()

    # -- the pump ---------------------------------------------------------------------

    async def serve(self, conn: QuicConn) -> None:
        """Send queued datagrams on ``conn`` while its session lasts (a session task,
        started after :meth:`attach`).

        Datagrams are handed to aioquic in ``conn.transmit`` just before it builds
        packets (:meth:`_before_build`), so one handed over is written at once,
        unless pacing or the congestion window hold every packet back; this task
        only wakes the connection when one becomes ready (the share bucket refilled,
        a new one queued). When the session ends, what still waits is dropped
        (``link_down``): a datagram is for now, and the next session is at least a
        reconnect away.
        """
        if self._conn is not conn:
            return  # never attached, or a newer connection replaced it already
        try:
            await self._pump(conn)
        except Exception:  # a bug here costs the datagrams, not the session
            log.exception("%s: the datagram pump failed", self.label)
        finally:
            if self._conn is conn:
                self._detach(conn)
                n = self.queue.drop_all("link_down")
                if n:
                    log.info("%s: %d datagrams dropped: the session ended", self.label, n)

    def attach(self, conn: QuicConn) -> None:
        """Send on ``conn`` from now on (the session calls it as it comes up, so a
        client may send at once; :meth:`serve` then runs the pump)."""
        old = self._conn
        if old is conn:
            return
        if old is not None:  # a newer connection replaces it: the queue goes on the new one
            self._detach(old)
        self._conn = conn
        conn.before_build = self._before_build
        conn.after_build = self._after_build

    def link_silent(self) -> None:
        """The link is reported down while its connection is held through the outage:
        what waits is dropped (``link_down``), as when a session ends — a datagram
        is for now, and sending it resumes when the link is back."""
        if self._conn is not None:
            self._take_back(self._conn)
        n = self.queue.drop_all("link_down")
        if n:
            log.info("%s: %d datagrams dropped: the link is down", self.label, n)

    def _detach(self, conn: QuicConn) -> None:
        """Stop using ``conn``; what aioquic still holds for it is dropped (``link_down``)."""
        conn.before_build = conn.after_build = None
        self._take_back(conn)
        self._conn = None
        self._wake.set()  # the pump of ``conn`` sees it is no longer wanted

    def _take_back(self, conn: QuicConn) -> None:
        """What aioquic holds of ours and has not written into a packet: taken back
        and dropped (``link_down``); what it wrote counts as sent."""
        self._account(conn)
        for msg in self._handed:
            self.counters.dropped(msg.name, "link_down")
        self._handed.clear()
        conn.quic.withdraw_datagrams()

    def _account(self, conn: QuicConn) -> None:
        """Count as sent what aioquic has written into packets since the last look
        (its queue is FIFO and holds only what we handed it)."""
        pending = conn.quic.datagrams_pending()
        while len(self._handed) > pending:
            self.queue.sent(self._handed.popleft())

    def _room(self, conn: QuicConn) -> int:
        """Bytes we may still hand to aioquic: about one packet's worth waits there."""
        return conn.quic.datagram_capacity() - sum(len(msg.frame) for msg in self._handed)

    def _before_build(self, now: float) -> None:
        """``conn.transmit`` is about to build packets: late datagrams out, ready ones in."""
        conn = self._conn
        if conn is None:
            return
        self._account(conn)
        handed = self._handed
        if any(msg.deadline <= now for msg in handed):
            # Held back past their deadline (pacing, a full congestion window): taken
            # back rather than sent late; the others queue in aioquic again.
            conn.quic.withdraw_datagrams()
            for msg in list(handed):
                if msg.deadline <= now:
                    handed.remove(msg)
                    self.queue.withdrawn(msg)
                else:
                    conn.quic.send_datagram_frame(msg.frame)
        capacity = self._update_cap(conn, now)
        room = self._room(conn)
        while room > 0:
            nxt = self.queue.take(now)
            if nxt is None:
                break
            if len(nxt.frame) > capacity:  # accepted for a path that carried more
                self.counters.dropped(nxt.name, "too_big")
                continue
            conn.quic.send_datagram_frame(nxt.frame)
            handed.append(nxt)
            room -= len(nxt.frame)

    def _after_build(self) -> None:
        conn = self._conn
        if conn is not None and self._handed:
            before = len(self._handed)
            self._account(conn)
            if len(self._handed) < before:
                self._wake.set()  # room again: the pump looks at the queue

    def _update_cap(self, conn: QuicConn, now: float) -> int:
        """Give the share bucket the current cap and per-datagram cost; the capacity."""
        capacity = conn.quic.datagram_capacity()
        self.queue.set_cap(self._cap() / 8, now,
                           overhead=conn.quic.datagram_overhead() + self._header_bytes(),
                           largest=capacity)
        return capacity

    async def _pump(self, conn: QuicConn) -> None:
        """Wake the connection whenever a queued datagram may go; drop late ones."""
        while self._conn is conn and conn.closed is None:
            self._wake = trio.Event()
            now = trio.current_time()
            self._account(conn)
            self.queue.expire(now)
            self._update_cap(conn, now)
            at = self.queue.ready_at(now)
            if at <= now:
                if self._room(conn) > 0:
                    conn.kick()  # the next transmit hands it over
                    # ...unless the wire gate holds packets then: look again a packet
                    # time later (only while one waits, ready, for the gate).
                    at = now + self._packet_time()
                else:  # aioquic holds a packet's worth: after_build wakes us
                    at = self.queue.next_expiry
            with trio.move_on_at(at):
                await self._wake.wait()

    def _packet_time(self) -> float:
        """How long a full packet takes at the cap (at least 1 ms)."""
        cap = self._cap()
        return max(0.001, 8 * 1400 / cap) if cap else 0.001

    # -- reporting --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counters (total and per name), settings and what waits, for ``status``."""
        capacity = self.capacity()
        return {
            "share": self.share,
            "max_age": self.max_age,
            "max_message": None if capacity is None else max(0, capacity - HEADER_BYTES),
            "queued": len(self.queue) + len(self._handed),
            "unread": self.inboxes.queued,
            "malformed": self.counters.malformed,
            **self.counters.total,
            "names": {name: dict(c) for name, c in sorted(self.counters.names.items())},
        }
