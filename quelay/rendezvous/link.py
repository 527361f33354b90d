"""The agent's side of a rendezvous: register, learn the peer, punch, pick the path.

Both agents dial out to the relay from their one UDP socket and register
(:class:`~.protocol.AgentTokens`). Once the relay has paired them it tells
each the other's fingerprint and observed address. The role follows a fixed
rule: **the agent whose fingerprint sorts lower (as text) is the QUIC
client**, the other accepts. QUIC first runs through the relay (the client
dials the relay's address; the relay forwards ciphertext). When the relay
says "punch" (on pairing, and whenever the client asks again while relayed),
both agents send authenticated punches to each other's observed address for
:data:`PUNCH_WINDOW` seconds; once the client has heard the peer *and* the
peer says it has heard the client, the path is open both ways and the client
moves its connection to the direct address. A direct attempt that hears
nothing falls back to the relay at once; while relayed the client asks for a
new punch every :data:`DIRECT_RETRY` seconds.

Every rendezvous datagram the agent sends passes the wire gate (it counts
against the cap like any QUIC datagram) and is sent without blocking: a
datagram the gate or the socket cannot take now is dropped (all of them are
repeated).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import trio

from ..core.codes import LinkState
from ..transport.pacing import WireGate
from ..transport.udp import Address, UdpSocket, resolve
from .protocol import AgentTokens, Punched, Refusal, Refused, Registered, normalise
from .server import read_secret

log = logging.getLogger("quelay.rendezvous")

REGISTER_RETRY = 1.0  # seconds between registrations until the relay answers
REFUSED_RETRY = 5.0  # after a refusal
REFRESH = 10.0  # registrations while registered (keeps the relay's entry and the NAT mapping)
PUNCH_WINDOW = 3.0  # seconds both agents punch after the relay says so
PUNCH_EVERY = 0.1  # uncapped; a capped link punches so as to spend at most 10 % of its cap
PUNCH_BYTES = 200  # about the size of a punch datagram
DIRECT_RETRY = 30.0  # while relayed, ask for another punch this often


class RendezvousLink:
    def __init__(self, sock: UdpSocket, relay: Address, tokens: AgentTokens,
                 gate: WireGate | None, *, label: str = "agent", direct: bool = True) -> None:
        self.sock = sock
        self.relay = normalise(relay)
        self.tokens = tokens
        self.gate = gate
        self.label = label
        self.direct_allowed = direct
        self._relay_dst = self._dst(self.relay)  # as the socket wants it (v4-mapped on v6)
        self.observed: Address | None = None
        self.peer_address: Address | None = None
        self.registered = False
        self.refusal: str = ""
        self.peer_known = trio.Event()
        self.client: bool | None = None  # our QUIC role once the peer is known
        self.direct: Address | None = None  # the peer's confirmed direct address (client)
        self.current: Any = None  # the client's current QuicConn
        self.current_direct = False
        self.punch_attempts = 0
        self.punch_successes = 0
        self.punch_failures = 0
        self.direct_failures = 0
        self.registrations_sent = 0
        self.refusals: dict[str, int] = {}
        self._heard_from: Address | None = None
        self._peer_heard_us = False
        self._punching = False
        self._next_register = 0.0
        self._nursery: trio.Nursery | None = None

    @property
    def peer_fingerprint(self) -> str | None:
        return self.tokens.peer_fingerprint

    # -- sending (never blocks; the gate counts every datagram) -------------------------

    def _send(self, data: bytes, addr: Address) -> bool:
        if self.gate is not None and not self.gate.try_send(len(data), trio.current_time()):
            return False
        try:
            self.sock.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError, ConnectionRefusedError):
            return False
        except OSError as exc:  # unreachable network etc.: the next retry may work
            log.debug("%s: rendezvous send to %s:%d failed: %s", self.label, *addr, exc)
            return False
        c = self.sock.counters
        c.bytes_sent += len(data)
        c.datagrams_sent += 1
        c.wire_bytes_sent += len(data) + self.sock.per_datagram(addr[0])
        return True

    def _dst(self, addr: Address) -> Address:
        if self.sock.family == trio.socket.AF_INET6 and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    def register(self, *, punch: bool = False) -> None:
        self.registrations_sent += 1
        self._send(self.tokens.register(time.time(), punch=punch), self._relay_dst)

    # -- receiving (called by the endpoint for every non-QUIC datagram) -----------------

    def handle(self, data: bytes, addr: Address) -> None:
        ev = self.tokens.receive_untrusted(data, addr, time.time())
        if isinstance(ev, Punched):
            self._punched(ev)
            return
        if normalise(addr) != self.relay:
            return  # relay answers come from the relay
        if isinstance(ev, Registered):
            self._registered(ev)
        elif isinstance(ev, Refused):
            self._refused(ev)

    def _registered(self, ev: Registered) -> None:
        first = not self.registered
        self.registered = True
        self.refusal = ""
        self.observed = ev.info.observed
        if ev.info.peer_fingerprint:
            self.peer_address = ev.info.peer_address
            if not self.peer_known.is_set():
                log.info("%s: rendezvous paired with %s (observed %s, peer at %s)", self.label,
                         ev.info.peer_fingerprint, _fmt(self.observed), _fmt(self.peer_address))
                self.peer_known.set()
        elif first:
            log.info("%s: registered with rendezvous %s:%d (observed %s); waiting for the peer",
                     self.label, *self.relay, _fmt(self.observed))
        if ev.punch and self.peer_address is not None and self.direct_allowed:
            self._start_punch(self.peer_address)

    def _refused(self, ev: Refused) -> None:
        self.refusals[ev.code.text] = self.refusals.get(ev.code.text, 0) + 1
        if ev.code is Refusal.UNREGISTERED and ev.authentic:
            # The relay forgot us (it restarted, or our entry expired): register at once.
            self.registered = False
            self._next_register = min(self._next_register, trio.current_time())
            return
        self.refusal = f"{ev.code.text}: {ev.reason}"
        log.warning("%s: rendezvous refused registration: %s%s", self.label, self.refusal,
                    "" if ev.authentic else " (unauthenticated answer: is the secret right?)")
        self.registered = False
        self._next_register = trio.current_time() + REFUSED_RETRY

    def _punched(self, ev: Punched) -> None:
        if self.peer_fingerprint is not None and ev.fingerprint != self.peer_fingerprint:
            return
        if not self.direct_allowed:
            return
        self._heard_from = ev.address
        if ev.heard:
            self._peer_heard_us = True
        if not self._punching:  # a late punch: answer it so the peer can confirm too
            self._send(self.tokens.punch(time.time(), heard=True), self._dst(ev.address))

    # -- tasks --------------------------------------------------------------------------

    async def run(self) -> None:
        """Registration (and refresh) for the agent's lifetime; punches as told."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                now = trio.current_time()
                if now >= self._next_register:
                    self.register()
                    self._next_register = now + (REFRESH if self.registered else REGISTER_RETRY)
                with trio.move_on_at(self._next_register):
                    await trio.sleep_forever()

    def _start_punch(self, peer: Address) -> None:
        if self._punching or self._nursery is None:
            return
        if self.client and self.current_direct:
            return  # already direct
        self._nursery.start_soon(self._punch, peer)

    def _punch_every(self) -> float:
        """Seconds between punches: at most a tenth of the cap goes to punching."""
        gate = self.gate
        if gate is None or not gate.capped:
            return PUNCH_EVERY
        wire = gate.wire_size(PUNCH_BYTES)
        return max(PUNCH_EVERY, 10 * wire / gate.bytes_per_second)

    async def _punch(self, peer: Address) -> None:
        self._punching = True
        every = self._punch_every()
        self._heard_from, self._peer_heard_us = None, False
        self.punch_attempts += 1
        try:
            with trio.move_on_after(PUNCH_WINDOW):
                while not (self._heard_from and self._peer_heard_us):
                    heard = self._heard_from is not None
                    self._send(self.tokens.punch(time.time(), heard=heard), self._dst(peer))
                    if self._heard_from is not None and self._heard_from != peer:
                        self._send(self.tokens.punch(time.time(), heard=True),
                                   self._dst(self._heard_from))
                    await trio.sleep(every)
            opened = self._heard_from is not None and self._peer_heard_us
            if self._heard_from is not None:  # make sure the peer can confirm too
                for _ in range(3):
                    self._send(self.tokens.punch(time.time(), heard=True),
                               self._dst(self._heard_from))
                    await trio.sleep(every)
        finally:
            self._punching = False
        if not opened:
            self.punch_failures += 1
            log.info("%s: no direct path to %s (punching for %g s); staying relayed",
                     self.label, _fmt(peer), PUNCH_WINDOW)
            return
        self.punch_successes += 1
        assert self._heard_from is not None
        log.info("%s: direct path to %s open both ways", self.label, _fmt(self._heard_from))
        if self.client and self.direct is None:
            self.direct = self._heard_from
            conn = self.current
            if conn is not None and not self.current_direct:
                conn.close("moving to a direct path")

    async def ask_for_punches(self) -> None:
        """Client, while relayed: ask the relay to make both of us punch, now and then."""
        await self.peer_known.wait()
        while True:
            await trio.sleep(DIRECT_RETRY)
            if self.direct is None and not self._punching and self.registered:
                self.register(punch=True)

    def direct_failed(self) -> None:
        """A direct connection heard nothing: back to the relay (retried later)."""
        log.info("%s: direct path to %s failed; back to the relay", self.label,
                 _fmt(self.direct))
        self.direct = None
        self.direct_failures += 1

    def status(self, session_peer: Address | None) -> dict[str, Any]:
        path = None
        if session_peer is not None:
            path = "relayed" if normalise(session_peer) == self.relay else "direct"
        out: dict[str, Any] = {
            "path": path,
            "rendezvous": {
                "relay": f"{self.relay[0]}:{self.relay[1]}",
                "session": self.tokens.session,
                "registered": self.registered,
                "observed": list(self.observed) if self.observed else None,
                "peer_address": list(self.peer_address) if self.peer_address else None,
                "role": None if self.client is None else ("client" if self.client
                                                          else "server"),
                "direct": list(self.direct) if self.direct else None,
                "refusal": self.refusal,
                "punch_attempts": self.punch_attempts,
                "punch_successes": self.punch_successes,
                "punch_failures": self.punch_failures,
                "direct_failures": self.direct_failures,
            },
        }
        if self.client is not None:  # the QUIC client dials (the relay or the peer)
            out["role"] = "dial" if self.client else "listen"
        return out


def _fmt(addr: Address | None) -> str:
    return "-" if addr is None else f"{addr[0]}:{addr[1]}"


async def run_rendezvous(agent: Any, nursery: trio.Nursery) -> None:
    """The link supervisor of an agent started with ``--rendezvous`` (both roles)."""
    cfg = agent.config
    secret = read_secret(Path(cfg.rendezvous_secret_file).expanduser())
    _, relay = resolve(*cfg.rendezvous)
    link = RendezvousLink(agent.sock, relay, AgentTokens(secret, cfg.session, agent.fingerprint),
                          agent.gate, label=agent.label, direct=cfg.rendezvous_direct)
    agent.rendezvous = link
    endpoint = agent.endpoint
    endpoint.foreign = link.handle
    async with trio.open_nursery() as inner:
        inner.start_soon(link.run)
        await link.peer_known.wait()
        peer_fp = link.peer_fingerprint
        assert peer_fp is not None
        link.client = agent.fingerprint < peer_fp
        log.info("%s: QUIC %s (fingerprint rule: the lower one dials)", agent.label,
                 "client" if link.client else "server")
        if not link.client:
            await agent._accept_loop(nursery)
            return
        endpoint.reconfigure(agent._quic_configuration(is_client=True))
        if link.direct_allowed:
            inner.start_soon(link.ask_for_punches)
        await _client_loop(agent, link)


async def _client_loop(agent: Any, link: RendezvousLink) -> None:
    endpoint = agent.endpoint
    while True:
        direct = link.direct is not None
        target = link.direct if link.direct is not None else link._relay_dst
        if agent.link_state is not LinkState.DOWN:
            agent._set_link(LinkState.CONNECTING)
        conn = endpoint.connect(link._dst(target))
        conn.hold_for = 0.0  # one connection at a time here: a held one would block the redial
        link.current, link.current_direct = conn, direct
        ups = agent.link_ups
        try:
            await agent._run_connection(conn, dialer=True)
        finally:
            endpoint.forget(conn)
            link.current, link.current_direct = None, False
        if direct and agent.link_ups == ups:
            link.direct_failed()
            continue
        if not direct and link.direct is not None:
            # Moving to the direct path. Give the peer the reconnect interval to end the
            # relayed session before the direct one starts (see docs/rendezvous.md).
            await trio.sleep(agent.config.reconnect_interval)
            continue
        if direct and not agent._last_attempt_heard:
            link.direct_failed()
            continue
        if agent.link_state is not LinkState.DOWN or agent._last_attempt_heard:
            await trio.sleep(agent.config.reconnect_interval)
