"""The wire gate counts what the link carries: payload, IP+UDP headers, link overhead.

Explicit time only: every figure is a counted fact, never an elapsed time.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quelay.transport.pacing import (
    IPV4_UDP_HEADER,
    IPV6_UDP_HEADER,
    WireGate,
    payload_bytes_per_second,
    tick_interval,
    tiled_datagram,
)
from quelay.transport.udp import header_bytes_for

MDS = 1350


def test_header_sizes_follow_the_address_family() -> None:
    assert IPV4_UDP_HEADER == 28 and IPV6_UDP_HEADER == 48
    assert header_bytes_for(socket.AF_INET) == 28
    assert header_bytes_for(socket.AF_INET6) == 48
    assert header_bytes_for(socket.AF_INET6, "2001:db8::1") == 48
    # A dual-stack socket talking to an IPv4 peer sends IPv4 packets.
    assert header_bytes_for(socket.AF_INET6, "::ffff:192.0.2.1") == 28


@pytest.mark.parametrize(("header", "overhead"), [(28, 0), (48, 0), (28, 60), (48, 13)])
def test_every_datagram_is_counted_with_headers_and_overhead(header: int, overhead: int) -> None:
    gate = WireGate(2_000_000, 0.0, MDS, header_bytes=header, link_overhead=overhead)
    now = 0.0
    sizes = [MDS, 40, 700, MDS, 1]
    for size in sizes:
        now = gate.ready_at(size, now)
        assert gate.try_send(size, now)
    assert gate.total_payload == sum(sizes)
    assert gate.total_datagrams == len(sizes)
    assert gate.total_bytes == sum(sizes) + len(sizes) * (header + overhead)
    assert gate.window_bytes(now) == gate.total_bytes
    assert gate.window_payload(now) == gate.total_payload


def test_uncapped_gate_measures_wire_bytes_of_a_batch() -> None:
    gate = WireGate(0, 0.0, MDS, header_bytes=48, link_overhead=2)
    assert gate.try_send(10 * MDS, 0.0, datagrams=10)  # a GSO batch of ten
    assert gate.window_bytes(0.5) == 10 * (MDS + 50)
    assert gate.window_payload(0.5) == 10 * MDS
    assert gate.window_bytes(1.5) == 0 and gate.window_payload(1.5) == 0


def test_default_is_ipv4_headers_and_no_overhead() -> None:
    gate = WireGate(1_000_000, 0.0, MDS)  # the agent's positional construction
    assert (gate.header_bytes, gate.link_overhead, gate.per_datagram) == (28, 0, 28)


@given(
    rate=st.integers(min_value=8 * (MDS + 48 + 200), max_value=50_000_000),
    header=st.sampled_from([IPV4_UDP_HEADER, IPV6_UDP_HEADER]),
    overhead=st.integers(min_value=0, max_value=200),
    sizes=st.lists(st.integers(min_value=1, max_value=MDS), min_size=1, max_size=400),
    gaps=st.lists(st.floats(min_value=0, max_value=0.05), min_size=1, max_size=400),
)
@settings(max_examples=80, deadline=None)
def test_no_one_second_window_exceeds_the_cap_with_headers(
        rate: int, header: int, overhead: int, sizes: list[int], gaps: list[float]) -> None:
    gate = WireGate(rate, 0.0, MDS, header_bytes=header, link_overhead=overhead)
    now = 0.0
    sent: list[tuple[float, int]] = []
    for i, size in enumerate(sizes):
        now += gaps[i % len(gaps)]
        now = max(now, gate.ready_at(size, now))
        assert gate.try_send(size, now)
        sent.append((now, size + header + overhead))  # what the link carries
    for start, _ in sent:
        in_window = sum(n for t, n in sent if start <= t < start + 1.0)
        assert in_window <= rate / 8


@pytest.mark.parametrize("overhead", [0, 40])
def test_gate_uses_the_allotment_on_the_wire(overhead: int) -> None:
    rate = 2_000_000
    gate = WireGate(rate, 0.0, MDS, link_overhead=overhead)
    size = gate.datagram_size
    now = 0.0
    while now < 10.0:
        now = gate.ready_at(size, now)
        assert gate.try_send(size, now)
    wire_rate = gate.total_bytes * 8 / now
    assert 0.98 * rate <= wire_rate <= rate * 1.001
    # The payload share is what full-size datagrams leave after their headers.
    expected = payload_bytes_per_second(rate, size, 28 + overhead) * 8
    assert gate.total_payload * 8 / now == pytest.approx(expected, rel=0.02)
    assert gate.payload_bytes_per_second * 8 == pytest.approx(expected)


def test_closed_one_second_windows_stay_under_the_cap() -> None:
    """Full-size datagrams paced at the cap: a 1-s window can span ten send instants
    (nine gaps of 110 ms); the gate keeps even the closed window [t, t + 1] under the
    cap, with room for an observer's timestamps to be off by a few milliseconds."""
    rate = 100_000
    gate = WireGate(rate, 0.0, MDS)
    now, sent = 0.0, []
    while now < 20.0:
        now = gate.ready_at(MDS, now)
        assert gate.try_send(MDS, now)
        sent.append(now)
    wire = MDS + 28
    for i, start in enumerate(sent):
        in_window = sum(1 for t in sent[i:] if t <= start + 1.004) * wire
        assert in_window <= rate / 8
    assert len(sent) * wire * 8 / now >= 0.9 * rate  # nine per second still go out


def test_cap_below_one_wire_datagram_per_second_is_refused() -> None:
    with pytest.raises(ValueError, match="minimum"):
        WireGate(8 * (MDS + 28) - 1, 0.0, MDS)
    WireGate(8 * (MDS + 28), 0.0, MDS)
    with pytest.raises(ValueError, match="minimum"):
        WireGate(8 * (MDS + 28), 0.0, MDS, header_bytes=48)
    gate = WireGate(8 * (MDS + 28), 0.0, MDS)
    with pytest.raises(ValueError, match="minimum"):
        gate.set_link(link_overhead=1)
    assert gate.per_datagram == 28  # a refused change leaves the gate as it was
    with pytest.raises(ValueError):
        gate.set_link(link_overhead=-1)


def test_set_link_applies_to_the_next_datagram() -> None:
    gate = WireGate(0, 0.0, MDS)
    gate.try_send(100, 0.0)
    gate.set_link(header_bytes=48, link_overhead=10)
    gate.try_send(100, 0.0)
    assert gate.total_bytes == 128 + 158


def test_tick_interval_is_clamped() -> None:
    assert tick_interval(0) == 0.005
    assert tick_interval(10_000_000_000) == 0.005
    assert tick_interval(100_000) == 0.1
    assert 0.005 < tick_interval(2_000_000) < 0.1


def test_tiled_datagrams_divide_the_allotment() -> None:
    # 100 kbit/s: 12,500 bytes a second; 1378-byte datagrams fit nine times (12,402).
    assert tiled_datagram(100_000, MDS, 28) == 1222  # ten of 1250 on the wire: 12,500
    assert tiled_datagram(500_000, MDS, 28) == 1330  # 46 of 1358 (62,468); 45 whole ones
    assert tiled_datagram(100_000, 1472, 28) == 1360
    assert tiled_datagram(0, MDS, 28) == MDS  # uncapped: as configured
    assert tiled_datagram(12_000, MDS, 28) == MDS  # 750 bytes: below QUIC's 1200
    for rate in (20_000, 100_000, 333_333, 2_000_000, 20_000_000):
        for per in (28, 48, 108):
            size = tiled_datagram(rate, MDS, per)
            assert 1200 <= size <= MDS
            if size == MDS and rate / 8 % (MDS + per):
                continue  # tiling would go below 1200 bytes: the configured size stays
            count = int(rate / 8 // (size + per))
            # As many datagrams as it takes whole full-size ones to cover the allotment,
            # and together within a byte each of it.
            assert count == -(-rate / 8 // (MDS + per))
            assert rate / 8 - count * (size + per) < count + 1


@pytest.mark.parametrize("rate", [100_000, 500_000])
def test_tiled_datagrams_use_the_whole_window_whole_ones_do_not(rate: int) -> None:
    """Back to back at the gate's pace for 30 s: full-size datagrams leave a fraction
    of one unsent every second (the window admits only whole ones); tiled ones use
    all of it but the 5-ms guard."""

    def share(size: int) -> float:
        gate = WireGate(rate, 0.0, MDS)
        now = 0.0
        while now < 30.0:
            now = gate.ready_at(size, now)
            assert gate.try_send(size, now)
        return gate.total_bytes * 8 / now / rate

    tiled = WireGate(rate, 0.0, MDS).datagram_size
    assert tiled < MDS
    assert share(tiled) >= 0.994
    assert share(MDS) <= 0.988
