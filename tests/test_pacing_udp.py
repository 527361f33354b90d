"""The UDP socket counts payload and wire bytes (headers + link overhead) side by side."""

from __future__ import annotations

import socket

import trio

from quelay.transport.udp import UdpSocket


async def test_counters_keep_payload_and_wire_side_by_side() -> None:
    a = UdpSocket(("127.0.0.1", 0), offload=False, link_overhead=10)
    b = UdpSocket(("127.0.0.1", 0), offload=False)
    try:
        sizes = [1200, 1200, 50]
        await a.send_batch([(b"x" * n, b.address) for n in sizes])
        got: list[bytes] = []
        with trio.fail_after(5):
            while len(got) < len(sizes):
                await b.wait_readable()
                got.extend(data for data, _ in b.recv_batch())
        sent, recv = a.counters, b.counters
        assert (sent.bytes_sent, sent.datagrams_sent) == (sum(sizes), 3)
        assert sent.wire_bytes_sent == sum(sizes) + 3 * (28 + 10)
        assert (recv.bytes_received, recv.datagrams_received) == (sum(sizes), 3)
        assert recv.wire_bytes_received == sum(sizes) + 3 * 28
    finally:
        a.close()
        b.close()


def test_per_datagram_follows_the_family() -> None:
    v4 = UdpSocket(("127.0.0.1", 0), offload=False, link_overhead=4)
    try:
        assert v4.per_datagram("127.0.0.1") == 32
    finally:
        v4.close()
    try:
        v6 = UdpSocket(("::1", 0), family=socket.AF_INET6, offload=False)
    except OSError:
        return  # no IPv6 on this host: the family rule is covered in test_pacing
    try:
        assert v6.per_datagram("::1") == 48
        assert v6.per_datagram("::ffff:127.0.0.1") == 28
    finally:
        v6.close()
