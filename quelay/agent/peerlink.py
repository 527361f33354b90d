"""One peer's link: its session, state, liveness history, cap, scheduler and statistics.

A single-peer agent has one :class:`PeerLink` (named ``""``); a hub has one per
named peer. Everything that must not leak from one site to another lives here:
the link state and its reason, the peer's boot epoch (restart detection), the
dial loop, the wire gate holding this link's cap, the DRR feed that shares it
among this link's transfers, and the per-transfer statistics of its session.
What all links share — the identity, the UDP endpoint, the transfer book and
the total cap — stays with the agent (:class:`HubPort`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ..core import messages as wire
from ..core.codes import Failure, LinkState
from ..core.transfer import State, Transfer
from ..identity import TrustStore
from ..scheduler import FeedScheduler
from ..transport.connection import PathStats, QuicConn
from ..transport.endpoint import QuicEndpoint
from ..transport.pacing import WireGate
from ..transport.udp import Address
from .book import TransferBook
from .datagrams import DatagramService
from .session import Session

log = logging.getLogger("quelay.agent")

RESUME_GRACE = 30.0  # after a peer restart, how long an incoming file waits to be resumed
RATE_SMOOTHING = 2.0  # seconds: the time constant of a transfer's reported rate
BUSY_HOLD = 1.0  # seconds a link stays busy (for the total cap's division) after demand
HELD_ANSWER = 1.5  # round trips a held connection gets to answer when a dial attempt did


class HubPort(Protocol):
    """What a link needs from its agent (and nothing more)."""

    @property
    def label(self) -> str: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def endpoint(self) -> QuicEndpoint | None: ...

    def hello(self, conn: QuicConn) -> wire.Hello: ...
    def check_proof(self, conn: QuicConn, hello: wire.Hello) -> str | None: ...
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...
    def run_connection(self, conn: QuicConn, *, dialer: bool,
                       link: PeerLink | None) -> Awaitable[None]: ...
    def links_changed(self) -> None: ...
    def link_wants(self, link: PeerLink) -> None: ...


class PeerLink:
    datagrams: DatagramService  # its best-effort datagrams (the agent sets it up)

    def __init__(self, hub: HubPort, book: TransferBook, *, name: str, trust: TrustStore,
                 address: Address | None, rate: int, gate: WireGate,
                 max_datagram: int, send_high_water: int,
                 reconnect_interval: float, probe_interval: float) -> None:
        self.hub = hub
        self.book = book
        self.name = name
        self.trust = trust
        self.address = address  # where we dial it; None: it dials us
        self.rate = rate  # this link's own cap (bit/s, 0 = none)
        self.effective_rate = rate  # what it may use now (its share of a total cap)
        self.gate = gate
        self.feed = FeedScheduler()
        self.feed.rate_bps = rate
        self.feed.uncapped_target = 4 * send_high_water
        self.feed.max_datagram = max_datagram
        self.feed.on_demand = self._wants
        self.wanted_at = -math.inf  # when a transfer last waited for bytes (trio time)
        self.reconnect_interval = reconnect_interval
        self.probe_interval = probe_interval
        self.session: Session | None = None
        self.link_state = LinkState.CONNECTING
        self.link_reason = ""
        self.peer_fingerprint: str | None = None
        self.peer_epoch: int | None = None
        self.last_rtt = 0.0
        self.last_attempt_heard = True
        self.link_ups = 0  # sessions established since start (a flapping link shows here)
        self.revivals = 0  # held connections that heard the peer again (no new session)
        self._changed = trio.Event()  # the session came, went, fell silent or was heard
        self._sampled: dict[str, tuple[float, int]] = {}

    @property
    def label(self) -> str:
        """How this link is named in logs: the agent's label, and the peer's name."""
        return self.hub.label if not self.name else f"{self.hub.label}/{self.name}"

    # -- AgentPort (what its sessions need) ----------------------------------------

    def hello(self, conn: QuicConn) -> wire.Hello:
        return self.hub.hello(conn)

    def check_proof(self, conn: QuicConn, hello: wire.Hello) -> str | None:
        return self.hub.check_proof(conn, hello)

    def session_up(self, session: Session) -> None:
        old = self.session
        if old is not None and old.conn is not session.conn:
            old.conn.close("replaced by a newer connection from the peer")
        self.session = session
        self.book.links[self.name] = session
        self.peer_fingerprint = session.conn.peer_fingerprint
        self.link_ups += 1
        endpoint = self.hub.endpoint
        if endpoint is not None and endpoint.admission is not None:
            endpoint.admission.peer_authenticated(session.conn.peer)
        self.set_link(LinkState.UP)
        self.feed.wake()
        self.hub.links_changed()
        self._changed.set()

    def held(self) -> bool:
        """Whether the session's connection is held through an outage (silent, kept)."""
        return self.session is not None and self.session.conn.silent

    async def prefer_held(self, conn: QuicConn) -> bool:
        """``conn``, dialled while the session's connection was held silent, has just
        been answered: the path is back. Whether the held one should carry on instead
        (it keeps every stream where it was; the new one would resume them all):
        tell it to probe now and give it a round trip to be heard. It cannot be if
        the peer restarted meanwhile; then ``conn`` replaces it."""
        session = self.session
        if session is None or session.conn is conn:
            return False
        held = session.conn
        if held.silent:
            held.peer_heard_elsewhere()
            rtt = held.path_stats().min_rtt or self.last_rtt or self.probe_interval
            with trio.move_on_after(HELD_ANSWER * rtt):
                while self.session is session and held.silent and held.closed is None:
                    await self.wait_changed()
        return self.session is session and not held.silent and held.closed is None

    def connection_silent(self, conn: QuicConn, reason: str | None) -> None:
        """The session's connection fell silent past the dead-link bound (``reason``),
        or heard the peer again (``None``). Held, it keeps its streams: the link is
        reported down, the dialler tries a fresh connection meanwhile (the peer may
        have restarted), and whichever answers first carries on."""
        if self.session is None or self.session.conn is not conn:
            return
        if reason is not None:
            self.set_link(LinkState.DOWN, reason)
            self.datagrams.link_silent()
            self._remember_path(conn)  # the dial attempts meanwhile start from it
        else:
            self.revivals += 1
            self.set_link(LinkState.UP)
            self.feed.wake()
            self.book.fill()  # what was queued during the outage starts now, in order
        self.hub.links_changed()
        self._changed.set()

    def peer_identified(self, session: Session) -> None:
        """The peer's hello arrived: a new boot epoch means it restarted."""
        hello = session.peer_hello
        assert hello is not None
        if self.peer_epoch is not None and hello.epoch != self.peer_epoch:
            self._peer_restarted()
        self.peer_epoch = hello.epoch

    # -- link state ------------------------------------------------------------------

    def set_link(self, state: LinkState, reason: str = "") -> None:
        if state == self.link_state and reason == self.link_reason:
            return
        self.link_state, self.link_reason = state, reason
        self.book.stats.link_changed(state.value, trio.current_time())
        log.info("%s: link %s%s", self.label, state.value, f": {reason}" if reason else "",
                 extra={"event": f"link.{state.value}", "agent": self.hub.label,
                        "link": self.name, "state": state.value, "reason": reason,
                        "peer": self.peer_fingerprint})
        self.book.events.publish("link.state", {"state": state.value, "reason": reason,
                                                "peer": self.peer_fingerprint,
                                                "name": self.name})

    def _peer_restarted(self) -> None:
        """The peer lost its memory: what lived only there cannot continue."""
        log.warning("%s: the peer restarted (new boot epoch)", self.label,
                    extra={"event": "peer.restarted", "agent": self.hub.label,
                           "link": self.name})
        for t in self.book.table.live():
            if t.peer != self.name:
                continue  # another link's transfer: that peer did not restart
            if t.direction == "in" and t.kind == "file":
                # The sender journals files: give it a moment to resume them.
                self.hub.spawn(self._expect_resume, t, t.resumes)
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

    def _remember_path(self, conn: QuicConn) -> None:
        """What the next dial attempt waits for: the path's own round trip (min RTT),
        not the smoothed one, which includes the queue at the cap (gone by then); and,
        in the endpoint's path memory, the RTT that seeds its handshake timers (one
        Initial per attempt, not aioquic's three)."""
        stats = conn.path_stats()
        self._note_rtt(stats)
        endpoint = self.hub.endpoint
        if endpoint is not None and conn.authenticated.is_set():
            endpoint.path_memory.remember(endpoint.path_key(conn.peer), stats)

    def _note_rtt(self, stats: PathStats) -> None:
        """The path's own round trip (min RTT) is what the next dial attempt waits for."""
        rtt = stats.min_rtt if stats.min_rtt is not None else stats.rtt
        if rtt is not None:
            self.last_rtt = rtt

    def session_ended(self, conn: QuicConn, reason: str) -> None:
        if self.session is None or self.session.conn is not conn:
            return
        stats = conn.path_stats()
        self.book.stats.connection_ended(stats)
        self._note_rtt(stats)
        session, self.session = self.session, None
        for tid, (_, retransmitted) in session.stats_of_all().items():  # fold into totals
            t = self.book.table.get(tid)
            if t is not None:
                t.retransmitted_earlier += retransmitted
                t.retransmitted, t.in_flight = t.retransmitted_earlier, 0
        self.book.links.pop(self.name, None)
        self.set_link(LinkState.DOWN, reason)
        self.hub.links_changed()
        self._changed.set()
        live = sum(1 for t in self.book.table.live() if t.peer == self.name
                   and (t.direction == "in" or t.state is State.ACTIVE))
        if live:
            log.info("%s: %d transfers wait for the link to resume", self.label, live)

    # -- dialling --------------------------------------------------------------------

    def probe_wait(self) -> float:
        """How long a dial attempt may go unanswered before a fresh one replaces it."""
        return max(self.probe_interval, 1.2 * self.last_rtt)

    async def wait_changed(self) -> None:
        """Until the session comes, goes, falls silent or is heard again."""
        await self._changed.wait()
        self._changed = trio.Event()

    async def dial_loop(self) -> None:
        """Dial whenever the link has no session, or its connection is held silent.

        Each attempt runs in its own task: one that becomes the session lives on
        there, and the loop waits for the next time a connection is needed."""
        endpoint = self.hub.endpoint
        assert endpoint is not None and self.address is not None
        # The first dial after a restart waits as long as the path needs (path memory).
        self.last_rtt = endpoint.remembered_rtt(self.address) or self.last_rtt
        async with trio.open_nursery() as nursery:
            while True:
                if self.session is not None and not self.held():
                    while self.session is not None and not self.held():
                        await self.wait_changed()
                    if self.session is None:  # it ended (not held): pause, as after any
                        await trio.sleep(self.reconnect_interval)
                        continue
                if self.link_state is not LinkState.DOWN:
                    self.set_link(LinkState.CONNECTING)
                conn = endpoint.connect(self.address, link=self)
                ended = trio.Event()
                nursery.start_soon(self._attempt, conn, ended)
                # Until it ends, or it is the session (then wait for the next need above).
                while not ended.is_set() and (self.session is None
                                              or self.session.conn is not conn):
                    await self.wait_changed()
                if not ended.is_set():
                    continue
                if self.link_state is not LinkState.DOWN or self.last_attempt_heard:
                    await trio.sleep(self.reconnect_interval)

    async def _attempt(self, conn: QuicConn, ended: trio.Event) -> None:
        endpoint = self.hub.endpoint
        assert endpoint is not None
        try:
            await self.hub.run_connection(conn, dialer=True, link=self)
        finally:
            endpoint.forget(conn)
            ended.set()
            self._changed.set()

    # -- the cap -----------------------------------------------------------------------

    def apply_rate(self, rate_bps: int) -> None:
        """Run at ``rate_bps`` from now on (its own cap, or its share of the total)."""
        if rate_bps == self.effective_rate and rate_bps == self.gate.rate_bps:
            return
        self.gate.set_rate(rate_bps, trio.current_time())  # validates
        self.effective_rate = rate_bps
        if self.session is not None:
            self.session.conn.quic.follow_cap(self.gate)
        self.feed.rate_bps = rate_bps
        self.feed.wake()

    def _wants(self) -> None:
        self.wanted_at = trio.current_time()
        self.hub.link_wants(self)

    def busy(self, now: float | None = None) -> bool:
        """Whether this link has bytes to send (it takes a share of a total cap): a
        transfer waits for bytes, QUIC holds unsent bulk, or one waited within the last
        :data:`BUSY_HOLD` seconds — so a link between two grants, or whose QUIC buffer
        just drained, keeps its share instead of flapping to idle and back."""
        if self.session is None or self.held():
            return False  # a held connection's link is down: it reserves nothing
        if self.feed.has_demand() or self.session.unsent_bulk():
            return True
        now = trio.current_time() if now is None else now
        return now - self.wanted_at < BUSY_HOLD

    def unsent(self) -> int | None:
        return None if self.session is None else self.session.unsent_bulk()

    # -- statistics ----------------------------------------------------------------------

    def sample_stats(self, transfers: list[Transfer], now: float) -> None:
        """Per-transfer rate (delivered bytes/s, smoothed over ~2 s), bytes in flight and
        bytes retransmitted (``quelay get``, progress events), for this link's transfers."""
        sampled = self._sampled
        session = self.session
        seen = set()
        for t in transfers:
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

    def link_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.link_state.value, "reason": self.link_reason,
                               "peer": self.peer_fingerprint, "ups": self.link_ups}
        if self.session is not None:
            stats = self.session.conn.path_stats()
            out.update(rtt=stats.rtt, cwnd=stats.cwnd, bytes_in_flight=stats.bytes_in_flight,
                       lost_packets=stats.lost_packets, lost_bytes=stats.lost_bytes,
                       spurious_losses=stats.spurious_losses)
        return out

    def wire_status(self, now: float) -> dict[str, Any]:
        gate = self.gate
        return {"rate": gate.window_bytes(now) * 8, "payload_rate": gate.window_payload(now) * 8,
                "wire_bytes_sent": gate.total_bytes, "payload_bytes_sent": gate.total_payload,
                "datagrams_sent": gate.total_datagrams, "held_datagrams": gate.held,
                "header_bytes": gate.header_bytes}
