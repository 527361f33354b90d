"""TLS session resumption between agents, with the pins enforced on every resumed connection.

Agents on the in-memory network and Trio's mock clock: handshakes are counted
(full vs resumed, on both sides), never timed.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import trio
import trio.testing
from aioquic.tls import CipherSuite, SessionTicket

from quelay.agent import Agent
from quelay.core import messages as wire
from quelay.identity import load_or_create_identity, sign_binding, verify_binding
from quelay.transport.memory import MemoryNetwork
from quelay.transport.resumption import MAX_HELD, MAX_ISSUED, ProvenIdentity, TicketStore

from .conftest import site_config
from .test_memory_link import start_memory_pair


async def _until(condition: object, step: float = 0.05, limit: float = 120.0) -> None:
    """Wait (mock time) for ``condition``; fail after ``limit`` mock seconds."""
    with trio.fail_after(limit):
        while not condition():  # type: ignore[operator]
            await trio.sleep(step)


async def _reconnect(a: Agent, b: Agent) -> None:
    """Drop the connection from the dialler's side and wait for the next session."""
    ups = (a.link_ups, b.link_ups)
    assert b.session is not None
    b.session.conn.close("test: reconnect")
    await _until(lambda: a.link_ups > ups[0] and b.link_ups > ups[1]
                 and a.link_state == "up" and b.link_state == "up")


async def test_reconnect_resumes_the_tls_session(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.375)  # 750 ms RTT
    a, b = await start_memory_pair(nursery, tmp_path, net)
    assert a.book.stats.handshakes == {"full": 1}
    assert b.book.stats.handshakes == {"full": 1}
    await _until(lambda: b.tickets.held("peer") is not None)  # NewSessionTicket arrived
    for _ in range(2):
        await _reconnect(a, b)
    assert a.book.stats.handshakes == {"full": 1, "resumed": 2}
    assert b.book.stats.handshakes == {"full": 1, "resumed": 2}
    # Both sides still know who the other is (the hello proved it on the new connection).
    assert a.peer_fingerprint == b.identity.fingerprint
    assert b.peer_fingerprint == a.identity.fingerprint
    assert a.book.stats.peer_rejected["untrusted_identity"] == 0


async def test_resumption_off_means_full_handshakes(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net, resumption=False)
    await _reconnect(a, b)
    assert a.book.stats.handshakes == {"full": 2}
    assert b.book.stats.handshakes == {"full": 2}
    assert len(b.tickets) == 0


async def test_a_ticket_alone_does_not_admit_an_untrusted_agent(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """An agent whose identity A does not pin, holding a ticket A issued to B (stolen,
    copied), resumes the TLS session but cannot prove B's identity in its hello."""
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    await _until(lambda: b.tickets.held("peer") is not None)
    stolen = b.tickets.held("peer")
    assert stolen is not None
    b_ups = a.link_ups

    for claims_b in (False, True):
        root = tmp_path / f"mallory{int(claims_b)}"
        load_or_create_identity(root / "state")
        mallory = Agent(site_config(root, peer=("10.0.0.1", 4433),
                                    trust=[a.identity.fingerprint]),
                        socket_factory=net.socket)
        mallory.tickets.hold("peer", stolen.ticket, stolen.identity)
        if claims_b:  # it even names B's identity in its hello
            honest_hello = mallory.hello

            def lying_hello(conn: object, honest: object = honest_hello) -> wire.Hello:
                h = honest(conn)  # type: ignore[operator]
                return wire.Hello(h.version, b.identity.fingerprint, h.epoch, h.name, h.proof)

            mallory.hello = lying_hello  # type: ignore[method-assign]
        refused = a.book.stats.peer_rejected["untrusted_identity"]
        scope = trio.CancelScope()
        nursery.start_soon(_run_until_cancelled, mallory, scope)
        await _until(lambda r=refused: a.book.stats.peer_rejected["untrusted_identity"] > r)
        scope.cancel()
        # The TLS session did resume (the ticket was good); the identity proof refused it.
        assert a.book.stats.handshakes["resumed"] >= 1
        assert mallory.link_ups == 0
        assert a.peer_fingerprint == b.identity.fingerprint
    assert a.link_ups == b_ups  # B's session was never replaced by Mallory's


async def _run_until_cancelled(agent: Agent, scope: trio.CancelScope) -> None:
    with scope:
        await agent.run()


async def test_a_withdrawn_pin_refuses_its_ticket(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """B's ticket stays valid, but A no longer pins B: the resumption is refused before
    any hello, exactly as a full handshake with B's certificate would be."""
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    await _until(lambda: b.tickets.held("peer") is not None)
    refused = a.book.stats.peer_rejected["untrusted_identity"]
    a.trust = type(a.trust)([])  # the operator withdrew B's pin
    ups = a.link_ups
    assert b.session is not None
    b.session.conn.close("test: reconnect")
    await _until(lambda: a.book.stats.peer_rejected["untrusted_identity"] > refused)
    assert a.link_ups == ups


def test_binding_proof_is_tied_to_role_key_and_connection(tmp_path: Path) -> None:
    me = load_or_create_identity(tmp_path / "me")
    other = load_or_create_identity(tmp_path / "other")
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = me.certificate.public_bytes(Encoding.DER)
    binding = bytes(range(32))
    proof = sign_binding(me, binding, signer_is_client=True)
    assert verify_binding(cert, proof, binding, signer_is_client=True) is None
    # Reflected (other role), another connection, another key: all refused.
    assert verify_binding(cert, proof, binding, signer_is_client=False) is not None
    assert verify_binding(cert, proof, bytes(32), signer_is_client=True) is not None
    forged = sign_binding(other, binding, signer_is_client=True)
    assert verify_binding(cert, forged, binding, signer_is_client=True) is not None
    assert verify_binding(b"not a certificate", proof, binding, signer_is_client=True) \
        is not None


def _ticket(label: bytes, *, expired: bool = False) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    life = datetime.timedelta(hours=-1 if expired else 1)
    return SessionTicket(age_add=0, cipher_suite=CipherSuite.AES_128_GCM_SHA256,
                         not_valid_after=now + life, not_valid_before=now - abs(life),
                         resumption_secret=b"s" * 32, server_name="quelay-peer", ticket=label)


def test_ticket_store_is_bounded_and_keeps_tickets_for_retries() -> None:
    store = TicketStore()
    who = ProvenIdentity(b"cert")
    for i in range(MAX_ISSUED + 5):
        store.issued(_ticket(b"t%d" % i), who)
    assert store.redeem(b"t0") is None  # the oldest fell out
    newest = store.redeem(b"t%d" % (MAX_ISSUED + 4))
    assert newest is not None and newest.identity == who
    assert store.redeem(b"t%d" % (MAX_ISSUED + 4)) is not None  # reusable: no early data
    store.issued(_ticket(b"old", expired=True), who)
    assert store.redeem(b"old") is None
    # A dialler keeps its ticket across failed attempts; a newer one replaces it.
    store.hold("peer", _ticket(b"first"), who)
    assert store.held("peer") is not None
    assert store.held("peer").ticket.ticket == b"first"  # type: ignore[union-attr]
    store.hold("peer", _ticket(b"second"), who)
    assert store.held("peer").ticket.ticket == b"second"  # type: ignore[union-attr]
    for i in range(MAX_HELD + 1):
        store.hold(f"k{i}", _ticket(b"x"), who)
    assert store.held("peer") is None and store.held(f"k{MAX_HELD}") is not None
    store.clear()
    assert len(store) == 0


async def test_a_close_ends_both_sessions_without_waiting_for_the_drain(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """aioquic reports a closed connection only after 3 PTOs of draining (seconds at
    750 ms RTT); the session ends when the CONNECTION_CLOSE leaves, and at the peer
    when it arrives (one-way delay), not at the liveness deadline."""
    net = MemoryNetwork(delay=0.375)
    a, b = await start_memory_pair(nursery, tmp_path, net, resumption=False)
    assert b.session is not None
    started = trio.current_time()
    b.session.conn.close("test: closing")
    await _until(lambda: b.link_state != "up", step=0.01)
    assert trio.current_time() - started < 0.1  # our close left at once
    await _until(lambda: a.link_state != "up", step=0.01)
    assert a.link_reason == "test: closing"  # the peer's close, not "link dead"
    assert trio.current_time() - started < 0.375 + 0.1  # one way, not 3 PTOs


async def test_a_close_under_a_saturated_cap_still_reaches_the_peer(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Datagrams the wire gate holds leave first, then the CONNECTION_CLOSE: the peer
    learns of the close in about one way, not at its dead-link bound."""
    from quelay.agent.pipes import OutboundPipe
    from quelay.core.transfer import Transfer

    net = MemoryNetwork(delay=0.1)
    a, b = await start_memory_pair(nursery, tmp_path, net, resumption=False, rate=200_000)
    pipe = OutboundPipe(1 << 20)
    t = Transfer(wire.new_transfer_id(), "out", "stream", "bulk", None, 4)
    b.book.submit(t, pipe)

    async def write() -> None:
        view = memoryview(bytes(4 << 20))
        while view:
            view = view[await pipe.write(view):]

    nursery.start_soon(write)
    await _until(lambda: b.session is not None and b.session.conn._outbox, step=0.001)
    assert b.session is not None
    started = trio.current_time()
    b.session.conn.close("test: closing")
    await _until(lambda: a.link_state != "up", step=0.01)
    assert a.link_reason == "test: closing"  # the close arrived, not "link dead"
    assert trio.current_time() - started < 1.0
