"""Hot-path pieces of the full path (issue 12, item 4): the pacer's burst, the
receiver's group commit bookkeeping, and hashing only what is durable."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from quelay.agent import session as session_mod
from quelay.agent.session import _Batches, _write_at
from quelay.transport.quic_ext import PACER_BURST_DATAGRAMS, CoarsePacer

DGRAM = 1350


def _burst(pacer: CoarsePacer, now: float) -> int:
    """Datagrams the pacer lets out at one instant, starting from a full bucket."""
    pacer.update_bucket(now=now - 10.0)
    pacer.bucket_time = pacer.bucket_max
    pacer.evaluation_time = now
    sent = 0
    while pacer.next_send_time(now) is None and sent < 10_000:
        pacer.update_after_send(now)
        sent += 1
    return sent


def test_uncapped_pacer_burst_is_64_datagrams_even_at_the_packet_time_floor() -> None:
    # Loopback, uncapped: a 40 MB window over 2 ms is far beyond the 1 µs packet-time
    # floor; the bucket must still hold a whole burst (it held ~4 datagrams before).
    pacer = CoarsePacer(max_datagram_size=DGRAM)
    pacer.update_rate(congestion_window=40_000_000, smoothed_rtt=0.002)
    assert pacer.packet_time == pytest.approx(1e-6)
    # (aioquic sends while the bucket is above zero: rounding may allow one more)
    assert _burst(pacer, 100.0) in (PACER_BURST_DATAGRAMS, PACER_BURST_DATAGRAMS + 1)


def test_pacer_bucket_is_unchanged_where_the_floor_does_not_bind() -> None:
    pacer = CoarsePacer(max_datagram_size=DGRAM)
    pacer.update_rate(congestion_window=1_400_000, smoothed_rtt=0.010)  # 140 MB/s
    rate = 1_400_000 / 0.010
    assert pacer.bucket_max == pytest.approx(PACER_BURST_DATAGRAMS * DGRAM / rate)
    assert _burst(pacer, 100.0) in (PACER_BURST_DATAGRAMS, PACER_BURST_DATAGRAMS + 1)
    capped = CoarsePacer(max_datagram_size=DGRAM)
    capped.cap_bytes_per_second = 250_000  # 2 Mbit/s: burst is 10 ms of the cap
    capped.update_rate(congestion_window=1_400_000, smoothed_rtt=0.5)
    assert capped.bucket_max == pytest.approx(max(2 * DGRAM, 2500) / 250_000)


def test_write_at_hashes_a_batch_only_once_it_is_durable(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "partial"
    hasher = hashlib.sha256()
    chunks = [b"a" * 70_000, b"b" * 5]

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    real_fsync = os.fsync
    monkeypatch.setattr(session_mod.os, "fsync", no_space)
    with pytest.raises(OSError):
        _write_at(path, 0, chunks, hasher)
    assert hasher.digest() == hashlib.sha256().digest()  # nothing durable, nothing hashed
    monkeypatch.setattr(session_mod.os, "fsync", real_fsync)
    _write_at(path, 0, chunks, hasher)  # the retry rewrites at the same offset
    _write_at(path, 70_005, [b"c"], hasher)
    assert path.read_bytes() == b"a" * 70_000 + b"bbbbb" + b"c"
    assert hasher.digest() == hashlib.sha256(path.read_bytes()).digest()


def test_batches_count_received_bytes_across_commits() -> None:
    batches = _Batches(1000)
    batches.add(b"x" * 10)
    batches.add(b"y" * 5)
    assert (batches.size, batches.received) == (15, 1015)
    chunks, size = batches.take()
    assert (chunks, size) == ([b"x" * 10, b"y" * 5], 15)
    assert (batches.size, batches.received) == (0, 1015)  # taken: being committed
    batches.add(b"z")
    batches.end()
    assert (batches.size, batches.received, batches.ended) == (1, 1016, True)
    assert not batches.committed


def test_endpoint_routes_short_header_datagrams_without_parsing_a_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aioquic.quic.configuration import QuicConfiguration

    from quelay.transport import endpoint as endpoint_mod
    from quelay.transport.udp import UdpSocket

    sock = UdpSocket(("127.0.0.1", 0))
    try:
        ep = endpoint_mod.QuicEndpoint(sock, make_connection=lambda *a: None,  # type: ignore[arg-type,return-value]
                                       configuration=QuicConfiguration(is_client=False),
                                       quic_kwargs={})
        conn = object()
        ep._by_cid[b"C" * endpoint_mod.CID_LENGTH] = conn  # type: ignore[assignment]

        def no_parsing(*args: object, **kwargs: object) -> None:
            raise AssertionError("header parsed")

        monkeypatch.setattr(endpoint_mod, "pull_quic_header", no_parsing)
        short = bytes([0x40]) + b"C" * endpoint_mod.CID_LENGTH + b"payload" * 10
        assert ep._route(short, ("127.0.0.1", 1), None) is conn  # type: ignore[arg-type]
        unknown = bytes([0x40]) + b"D" * endpoint_mod.CID_LENGTH + b"payload" * 10
        with pytest.raises(AssertionError):  # unknown CID: the full parse still decides
            ep._route(unknown, ("127.0.0.1", 1), None)  # type: ignore[arg-type]
    finally:
        sock.close()
