"""A non-blocking UDP socket tuned for bulk QUIC: big buffers, batching, GSO/GRO.

Receive drains many datagrams per wake-up (``recv_batch``); transmit coalesces
equal-sized datagrams into one ``sendmsg`` with ``UDP_SEGMENT`` where the
kernel supports it. Every datagram is counted here, because this is where
bytes meet the wire: its UDP payload, and side by side what the link carries
for it (payload + IP and UDP headers + the operator's ``link_overhead``).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from .pacing import IPV4_UDP_HEADER, IPV6_UDP_HEADER

SOL_UDP = 17
UDP_SEGMENT = 103  # missing from Python 3.11's socket module
UDP_GRO = 104
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65000
RECV_BUFFER = 65535

Address = tuple[str, int]


@dataclass
class WireCounters:
    """Bytes and datagrams that crossed the UDP socket.

    ``bytes_*`` count UDP payload; ``wire_bytes_*`` count what the link carries:
    payload + IP/UDP headers (28 bytes IPv4, 48 IPv6) + ``link_overhead``, per
    datagram (a GRO super-datagram counts as the datagrams it was made of).
    """

    bytes_sent: int = 0
    datagrams_sent: int = 0
    bytes_received: int = 0
    datagrams_received: int = 0
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0


def header_bytes_for(family: int, host: str | None = None) -> int:
    """IP + UDP header bytes of one datagram sent on a socket of ``family``.

    An IPv6 socket that talks to an IPv4-mapped address (``::ffff:a.b.c.d``, a
    dual-stack listener reached over IPv4) puts IPv4 packets on the link.
    """
    if family == socket.AF_INET6 and not (host or "").lower().startswith("::ffff:"):
        return IPV6_UDP_HEADER
    return IPV4_UDP_HEADER


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}:{port}")
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class UdpSocket:
    def __init__(
        self,
        bind: Address,
        *,
        family: socket.AddressFamily = socket.AF_INET,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        offload: bool = True,
        link_overhead: int = 0,
    ) -> None:
        if link_overhead < 0:
            raise ValueError("link_overhead must be >= 0")
        self.family = family
        self.link_overhead = link_overhead  # bytes the link adds per datagram (VPN, GSE)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
        self.sock.bind(bind)
        self.counters = WireCounters()
        self.gso = offload and self._probe_gso()
        self.gro = offload and self._enable_gro()
        self._cmsg_space = socket.CMSG_SPACE(4) if self.gro else 0

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def per_datagram(self, host: str | None = None) -> int:
        """Bytes the link adds to each datagram to or from ``host``: headers + overhead."""
        return header_bytes_for(self.family, host) + self.link_overhead

    def _probe_gso(self) -> bool:
        try:
            self.sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        except OSError:
            return False
        return True

    def _enable_gro(self) -> bool:
        try:
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def recv_batch(self, limit: int = 256) -> list[tuple[bytes, Address]]:
        """Drain up to ``limit`` reads without blocking; splits GRO super-datagrams."""
        out: list[tuple[bytes, Address]] = []
        counters = self.counters
        per_host, per = "", 0  # the last sender's header + overhead bytes
        for _ in range(limit):
            try:
                if self.gro:
                    data, ancdata, _flags, addr = self.sock.recvmsg(RECV_BUFFER, self._cmsg_space)
                else:
                    data, addr = self.sock.recvfrom(RECV_BUFFER)
                    ancdata = []
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                # ICMP port unreachable from an earlier send: the peer is not up yet.
                continue
            address = (str(addr[0]), int(addr[1]))
            segment = 0
            for level, kind, value in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    (segment,) = struct.unpack("=i", value[:4])
            count = 0
            if segment and len(data) > segment:
                for start in range(0, len(data), segment):
                    chunk = data[start : start + segment]
                    out.append((chunk, address))
                    count += 1
            else:
                out.append((data, address))
                count = 1
            counters.datagrams_received += count
            counters.bytes_received += len(data)
            if address[0] != per_host:
                per_host, per = address[0], self.per_datagram(address[0])
            counters.wire_bytes_received += len(data) + count * per
        return out

    async def send_batch(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        """Send datagrams in order, coalescing runs to one address with GSO (a run:
        equal sizes, the last one may be shorter)."""
        run: list[bytes] = []
        run_addr: Address | None = None
        run_bytes = size = last = 0
        for data, addr in datagrams:
            n = len(data)
            if run and (
                n > size
                or last != size
                or addr != run_addr
                or len(run) >= MAX_GSO_SEGMENTS
                or run_bytes + n > MAX_GSO_BYTES
            ):
                await self._send_run(run, run_addr, run_bytes)
                run, run_bytes = [], 0
            if not run:
                size, run_addr = n, addr
            run.append(data)
            run_bytes += n
            last = n
        if run:
            await self._send_run(run, run_addr, run_bytes)

    async def _send_run(self, run: list[bytes], addr: Address | None, run_bytes: int) -> None:
        assert addr is not None
        if len(run) > 1 and self.gso:
            payload = b"".join(run)
            cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(run[0])))]
            try:
                await self._retry_send(lambda: self.sock.sendmsg([payload], cmsg, 0, addr))
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    raise
                self.gso = False  # the NIC/kernel refused segmentation: plain sends from now on
            else:
                self._count_sent(len(run), run_bytes, addr)
                return
        for data in run:
            await self._retry_send(lambda data=data: self.sock.sendto(data, addr))  # type: ignore[misc]
            self._count_sent(1, len(data), addr)

    def _count_sent(self, datagrams: int, nbytes: int, addr: Address) -> None:
        counters = self.counters
        counters.bytes_sent += nbytes
        counters.wire_bytes_sent += nbytes + datagrams * self.per_datagram(addr[0])
        counters.datagrams_sent += datagrams

    async def _retry_send(self, send: object) -> None:
        assert callable(send)
        while True:
            try:
                send()
                return
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_writable(self.sock)
            except ConnectionRefusedError:
                return  # ICMP from a previous datagram; UDP is fire-and-forget
