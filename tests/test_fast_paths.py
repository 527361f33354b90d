"""The short paths do exactly what aioquic does: the same scenario run through
aioquic's ``receive_datagram`` and ``_write_application`` and through
``fast_receive`` / ``fast_send`` gives the same datagrams, at the same times,
on both sides, and the same receive state. Explicit time, no sockets (the
sans-IO pair of test_recovery_sansio)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from aioquic import tls

from quelay.transport import quic_ext
from quelay.transport.fast_receive import receive_one_rtt
from quelay.transport.fast_send import write_bulk

from . import test_recovery_sansio
from .test_recovery_sansio import CLIENT, Link, Pair, _connected

SIZE = 600_000
MOVED = ("10.0.0.9", 40001)  # the client after a NAT rebinding


class RoughLink(Link):
    """Delay, jitter and loss as :class:`Link`, and also duplicates and corrupted
    datagrams (one byte flipped anywhere: in the header or the payload)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.rough = random.Random(7)

    def send(self, dst: str, data: bytes, now: float) -> None:
        draw = self.rough.random()
        if draw < 0.02:
            data = bytearray(data)
            data[self.rough.randrange(len(data))] ^= 0x10
            data = bytes(data)
        super().send(dst, data, now)
        if 0.02 <= draw < 0.04:
            super().send(dst, data, now)  # a duplicate, with its own delay


class MovingPair(Pair):
    """The client's datagrams come from ``MOVED`` once ``moved`` is set (a NAT
    rebinding: the server sees a new address and migrates)."""

    moved = False

    def _deliver(self, dst: str, data: bytes) -> None:
        if dst == "server" and self.moved and self.server.quic is not None:
            self.server.quic.receive_datagram(data, MOVED, self.now)
            return
        super()._deliver(dst, data)


def _state(quic: object) -> tuple[object, ...]:
    """What a received packet changes in a connection, beyond the datagrams it sends."""
    space = quic._spaces[tls.Epoch.ONE_RTT]  # type: ignore[attr-defined]
    return (list(space.ack_queue), space.largest_received_packet,
            space.largest_received_time, space.expected_packet_number, space.ack_at,
            quic._spin_bit, quic._spin_highest_pn, quic._close_at,  # type: ignore[attr-defined]
            quic._ack_eliciting_sent_since_receipt,  # type: ignore[attr-defined]
            [p.addr for p in quic._network_paths])  # type: ignore[attr-defined]


def _scenario(tmp: Path, taken: list[int]) -> tuple[list[tuple[float, str, int]], bytes, bytes,
                                                   list[int], list[tuple[object, ...]]]:
    """Two transfers over a rough link: a PING in the middle of the first, a key update
    between them, a NAT rebinding in the middle of the second. Returns every datagram
    either side sent, as (time, side, wire bytes); what the server received; what was
    sent; what the short paths took (see _counting); both sides' receive state."""
    pair = MovingPair(tmp, RoughLink(rtt=0.06, jitter=0.01, loss=0.02, seed=5),
                      cap_bps=4_000_000)
    pair.run(lambda: pair.client.handshake_done is not None
             and pair.server.handshake_done is not None, 30)
    client = pair.client.quic
    assert client is not None
    payload = random.Random(1).randbytes(SIZE)
    sids = []
    for half in (payload[:SIZE // 2], payload[SIZE // 2:]):
        sid = client.get_next_available_stream_id(is_unidirectional=True)
        sids.append(sid)
        client.send_stream_data(sid, half, end_stream=True)
        pair.run(lambda sid=sid: len(pair.server.received.get(sid, b"")) > 100_000,
                 pair.now + 60)
        if len(sids) == 1:
            client.send_ping(7)  # a rare frame: that build goes to aioquic's loop
        else:
            pair.moved = True  # from here on the server hears the client from MOVED
        pair.run(lambda sid=sid: sid in pair.server.ended and client.stream_buffered(sid) == 0,
                 pair.now + 60)
        if len(sids) == 1:
            client.request_key_update()  # the next packets go in the next key phase
    pair.run(lambda: False, pair.now + 1.0)  # the last ACKs
    sent = sorted([(t, "client", n) for t, n in pair.client.sent]
                  + [(t, "server", n) for t, n in pair.server.sent])
    got = b"".join(bytes(pair.server.received.get(s, b"")) for s in sids)
    assert pair.server.quic is not None
    assert pair.server.quic._network_paths[0].addr == MOVED  # the rebinding took effect
    states = [_state(pair.client.quic), _state(pair.server.quic)]
    return sent, got, payload, taken, states


def _counting(monkeypatch: pytest.MonkeyPatch, enabled: bool) -> list[int]:
    """Route both short paths through counters: [datagrams received, packet loops
    built by them, packet loops left to aioquic while the short send path was on];
    ``enabled=False`` sends everything to aioquic instead."""
    taken = [0, 0, 0]

    def counted(real: Callable[..., bool], i: int) -> Callable[..., bool]:
        def call(*args: object) -> bool:
            if not enabled:
                return False
            done = real(*args)
            taken[i] += done
            if i == 1 and not done:
                taken[2] += 1
            return done
        return call

    monkeypatch.setattr(quic_ext, "receive_one_rtt", counted(receive_one_rtt, 0))
    monkeypatch.setattr(quic_ext, "write_bulk", counted(write_bulk, 1))
    return taken


def test_short_path_is_aioquic_for_one_rtt_packets(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Small windows, so the receiver's MAX_DATA / MAX_STREAM_DATA go in the loop too.
    monkeypatch.setattr(test_recovery_sansio, "WINDOW", 96_000)
    runs = {}
    for enabled in (False, True):
        runs[enabled] = _scenario(tmp_path / str(enabled), _counting(monkeypatch, enabled))
    plain, short = runs[False], runs[True]
    assert plain[1] == plain[2] and short[1] == short[2]  # both delivered every byte
    assert plain[3] == [0, 0, 0]
    # The short paths took nearly every datagram after the handshake, and left the
    # builds with a rare frame due (the PING, the path challenge) to aioquic...
    assert short[3][0] > 0.9 * len(short[0])
    assert short[3][1] > 100 and short[3][2] > 0
    # ...and the two runs sent the same datagrams at the same times, both sides.
    assert short[0] == plain[0]
    assert short[4] == plain[4]


def test_a_key_update_and_a_new_address_leave_the_short_path_and_come_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packets the short path must not take go to aioquic, and the next
    ordinary ones are taken again."""
    pair = _connected(tmp_path, Link(rtt=0.02))
    client, server = pair.client.quic, pair.server.quic
    assert client is not None and server is not None
    taken: list[bool] = []
    real = receive_one_rtt
    monkeypatch.setattr(quic_ext, "receive_one_rtt",
                        lambda *a: taken.append(real(*a)) or taken[-1])  # type: ignore[arg-type]
    sid = client.get_next_available_stream_id(is_unidirectional=True)
    client.send_stream_data(sid, b"x" * 50_000)
    pair.run(lambda: len(pair.server.received.get(sid, b"")) == 50_000, pair.now + 5)
    assert taken and all(taken)
    phase = server._cryptos[tls.Epoch.ONE_RTT].recv.key_phase
    client.request_key_update()
    taken.clear()
    client.send_stream_data(sid, b"y" * 50_000)
    pair.run(lambda: len(pair.server.received.get(sid, b"")) == 100_000, pair.now + 5)
    assert server._cryptos[tls.Epoch.ONE_RTT].recv.key_phase != phase
    assert False in taken and taken[-1]  # the new phase's first packet went to aioquic
    taken.clear()
    client.send_stream_data(sid, b"z" * 50_000)
    src = [MOVED]
    real_deliver = pair._deliver

    def moved(dst: str, data: bytes) -> None:
        if dst == "server":
            server.receive_datagram(data, src[0], pair.now)
        else:
            real_deliver(dst, data)

    pair._deliver = moved  # type: ignore[method-assign]
    pair.run(lambda: len(pair.server.received.get(sid, b"")) == 150_000, pair.now + 5)
    assert server._network_paths[0].addr == MOVED  # aioquic migrated the path
    assert False in taken  # from the new address, until aioquic validated it
    pair.run(lambda: server._network_paths[0].is_validated, pair.now + 5)
    assert server._network_paths[0].is_validated
    taken.clear()
    client.send_stream_data(sid, b"w" * 50_000)
    pair.run(lambda: len(pair.server.received.get(sid, b"")) == 200_000, pair.now + 5)
    assert taken and all(taken)


def test_a_duplicate_or_a_corrupted_packet_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 9000 §12.3 and RFC 9001 §5.3 on the short path: a packet seen before
    elicits no ACK, one that fails authentication is dropped, and both are taken
    (not handed to aioquic)."""
    pair = _connected(tmp_path, Link(rtt=0.02))
    client, server = pair.client.quic, pair.server.quic
    assert client is not None and server is not None
    taken = _counting(monkeypatch, True)
    space = server._spaces[tls.Epoch.ONE_RTT]
    sid = client.get_next_available_stream_id(is_unidirectional=True)
    client.send_stream_data(sid, b"d" * 1000)
    (datagram, _), = client.datagrams_to_send(pair.now)
    server.receive_datagram(datagram, CLIENT, pair.now)
    assert taken[0] == 1 and space.ack_at is not None
    server.datagrams_to_send(space.ack_at)  # the ACK leaves
    assert space.ack_at is None
    before = _state(server)
    server.receive_datagram(datagram, CLIENT, space.largest_received_time)
    assert taken[0] == 2 and space.ack_at is None and _state(server) == before
    corrupted = bytearray(datagram)
    corrupted[-1] ^= 1
    server.receive_datagram(bytes(corrupted), CLIENT, space.largest_received_time)
    assert taken[0] == 3 and _state(server) == before and server._state.name == "CONNECTED"


def _sealed_both_ways(frames: list[tuple[int, bytes]], *, spin: bool = False,
                      key_update: bool = False) -> tuple[object, object]:
    """One 1-RTT packet built twice with the same keys, ended by aioquic's
    ``_end_packet`` and by :func:`fast_send.seal`: (builder state, builder state)."""
    from aioquic.quic.crypto import CryptoPair
    from aioquic.quic.packet import QuicPacketType
    from aioquic.quic.packet_builder import QuicPacketBuilder

    from quelay.transport.fast_send import seal

    states = []
    for end in ("aioquic", "seal"):
        crypto = CryptoPair()
        crypto.setup_initial(b"\x01" * 8, is_client=True, version=1)  # any keys will do
        if key_update:
            crypto.update_key()
        builder = QuicPacketBuilder(host_cid=b"\x02" * 8, peer_cid=b"\x03" * 8, version=1,
                                    is_client=True, max_datagram_size=1350,
                                    packet_number=70_000, spin_bit=spin)
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        for frame_type, body in frames:
            builder.start_frame(frame_type).push_bytes(body)
        if end == "aioquic":
            builder._end_packet()
        else:
            seal(builder, crypto)
        datagrams, packets = builder.flush()
        states.append((datagrams, [vars(p) for p in packets], builder._packet_number,
                       builder._datagram_needs_padding, crypto.send.key_phase))
    return states[0], states[1]


@pytest.mark.parametrize("case", ["stream", "tiny", "ack only", "path challenge", "spin",
                                  "key update"])
def test_seal_is_byte_for_byte_aioquics_end_of_packet(case: str) -> None:
    """Same keys, same packet: the same datagram bytes (AES-GCM is deterministic for a
    given nonce), the same sent-packet record, the same next packet number."""
    from aioquic.quic.packet import QuicFrameType

    stream = [(QuicFrameType.STREAM_BASE | 2, b"\x04\x40\x10" + bytes(range(16)) * 70)]
    frames = {
        "stream": stream,
        "tiny": [(QuicFrameType.PING, b"")],  # padded so the header sample exists
        "ack only": [(QuicFrameType.ACK, b"")],  # padded: in flight only because of it
        "path challenge": [(QuicFrameType.PATH_CHALLENGE, b"12345678")],  # padded to 1200+
        "spin": stream,
        "key update": stream,
    }[case]
    plain, short = _sealed_both_ways(frames, spin=case == "spin", key_update=case == "key update")
    assert short == plain
