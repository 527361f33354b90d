"""Hundreds of streams on one QUIC connection (sans-IO, explicit time): per-packet work
follows the streams with something to do, every stream arrives byte-exact, and finished
streams give their stream credit back."""

from __future__ import annotations

import random
from pathlib import Path

from quelay.transport import quic_ext
from quelay.transport.quic_ext import QuelayQuicConnection

from .test_recovery_sansio import WINDOW, Link, Pair, _configuration, digest

MAX_STREAMS = 400


class ManyPair(Pair):
    def _quic(self, is_client: bool, **extra: object) -> QuelayQuicConnection:
        quic = QuelayQuicConnection(
            configuration=_configuration(self.tmp, is_client=is_client, cc=self.cc),
            stream_window=WINDOW, connection_window=WINDOW, max_streams=MAX_STREAMS,
            **extra)  # type: ignore[arg-type]
        quic.set_cap(self.cap_bps / 8)
        return quic


def _connected(tmp: Path, link: Link, cap_bps: int) -> ManyPair:
    pair = ManyPair(tmp, link, cap_bps=cap_bps)
    pair.run(lambda: pair.client.handshake_done is not None
             and pair.server.handshake_done is not None, 30)
    assert pair.client.handshake_done is not None
    return pair


def _send_many(pair: ManyPair, count: int, seed: int) -> dict[int, bytes]:
    quic = pair.client.quic
    assert quic is not None
    rng = random.Random(seed)
    sent = {}
    for _ in range(count):
        sid = quic.get_next_available_stream_id(is_unidirectional=True)
        payload = rng.randbytes(rng.randint(1, 6000))
        quic.send_stream_data(sid, payload, end_stream=True)
        sent[sid] = payload
    return sent


def test_hundreds_of_streams_arrive_whole_and_return_their_credit(tmp_path: Path) -> None:
    pair = _connected(tmp_path, Link(rtt=0.2, loss=0.03, seed=5), cap_bps=20_000_000)
    client, server = pair.client.quic, pair.server.quic
    assert client is not None and server is not None
    # Two rounds of 300: the second needs the credit the first one's streams gave back.
    for round_ in range(2):
        sent = _send_many(pair, 300, seed=round_)  # type: ignore[arg-type]
        pair.run(lambda s=sent: all(sid in pair.server.ended for sid in s), 600)
        for sid, payload in sent.items():
            assert digest(pair.server.received[sid]) == digest(payload), sid
        assert client.view_builds > 0  # over VIEW_MIN_STREAMS: packets built over a view
    # Everything acknowledged: the finished streams are discarded at both ends ...
    pair.run(lambda: len(client._streams) == 0 and len(server._streams) == 0, pair.now + 30)
    assert len(client._streams) == 0 and len(server._streams) == 0
    # ... and each one the client opened was granted again by the server.
    assert server._local_max_streams_uni.value == MAX_STREAMS + 600
    assert pair.link.dropped > 0  # losses were recovered, not avoided


def test_per_packet_work_follows_the_busy_streams(tmp_path: Path) -> None:
    """300 open, idle streams and one busy one: building packets visits the busy one,
    not all 301, except for the bounded periodic full scan."""
    pair = _connected(tmp_path, Link(rtt=0.1), cap_bps=20_000_000)
    client = pair.client.quic
    assert client is not None
    for _ in range(300):  # open, a few bytes each, never finished
        sid = client.get_next_available_stream_id(is_unidirectional=True)
        client.send_stream_data(sid, b"header")
    pair.run(lambda: len(pair.server.received) == 300, 30)
    visits = {"n": 0}
    original = client._write_stream_limits

    def counting(builder: object, space: object, stream: object) -> None:
        visits["n"] += 1
        original(builder, space, stream)

    client._write_stream_limits = counting  # type: ignore[method-assign]
    bulk = client.get_next_available_stream_id(is_unidirectional=True)
    client.send_stream_data(bulk, random.Random(1).randbytes(600_000), end_stream=True)
    builds = {"n": 0}
    original_build = client._write_application

    def counting_build(*args: object) -> None:
        builds["n"] += 1
        original_build(*args)  # type: ignore[arg-type]

    client._write_application = counting_build  # type: ignore[method-assign,assignment]
    pair.run(lambda: bulk in pair.server.ended, 120)
    assert digest(pair.server.received[bulk]) == digest(random.Random(1).randbytes(600_000))
    assert builds["n"] > 50
    # Full scans every FULL_SCAN_EVERY builds may visit all 301; the rest visit a few.
    scans = builds["n"] // quic_ext.FULL_SCAN_EVERY + 1
    assert visits["n"] <= builds["n"] * 8 + scans * 301 * 4
    assert visits["n"] < builds["n"] * 301 / 10  # an order of magnitude below every stream


def test_many_busy_streams_fill_packets_one_stream_at_a_time(tmp_path: Path) -> None:
    """200 streams with 20 KB each queued at once: each packet is built from one
    stream's bytes (the DRR feed above decides who sends how much), not from attempts
    at several streams' small frames: stream-frame attempts per packet stay near one
    (four streams offered per build made ~3.7)."""
    pair = _connected(tmp_path, Link(rtt=0.1), cap_bps=20_000_000)
    client = pair.client.quic
    assert client is not None
    attempts = {"n": 0}
    original = client._write_stream_frame

    def counting(*args: object, **kwargs: object) -> object:
        attempts["n"] += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    client._write_stream_frame = counting  # type: ignore[method-assign,assignment]
    rng = random.Random(7)
    sent = {}
    for _ in range(200):
        sid = client.get_next_available_stream_id(is_unidirectional=True)
        sent[sid] = rng.randbytes(20_000)
        client.send_stream_data(sid, sent[sid], end_stream=True)
    packets_before = len(pair.client.sent)
    pair.run(lambda: all(sid in pair.server.ended for sid in sent), 120)
    for sid, payload in sent.items():
        assert digest(pair.server.received[sid]) == digest(payload)
    packets = len(pair.client.sent) - packets_before
    assert packets >= 4_000_000 // 1400  # every byte went in full-size packets...
    assert attempts["n"] <= 1.3 * packets  # ...each from one stream
