"""An in-memory datagram network: the UDP socket's interface without sockets.

Tests run two real agents on it in one Trio run, on Trio's ``MockClock``
(``autojump_clock``): a 30 s outage costs no wall time, and nothing depends
on the host's scheduler. Each :class:`MemorySocket` has the methods the
transport uses on :class:`~quelay.transport.udp.UdpSocket` (``address``,
``wait_readable``, ``recv_batch``, ``send_batch``, ``counters``,
``per_datagram``, ``close``). The :class:`MemoryNetwork` delivers every
datagram after a one-way ``delay``, drops it with probability ``loss`` or
while ``down`` is set (or, for one site of several, while its host is in
``down_hosts``), and counts what it carried — the test's view from outside
the agents; with ``record`` set it also keeps when each datagram crossed and
its size on the link (IPv4 and UDP headers included), per pair of hosts.
"""

from __future__ import annotations

import heapq
import itertools
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from .udp import Address, WireCounters, header_bytes_for


@dataclass
class NetworkCounters:
    delivered: int = 0
    dropped_loss: int = 0
    dropped_down: int = 0
    bytes_delivered: int = 0


@dataclass
class MemoryNetwork:
    """Datagrams between :class:`MemorySocket`s, with delay, loss and outages."""

    delay: float = 0.0  # one-way, seconds
    loss: float = 0.0  # probability a datagram is lost
    seed: int = 0
    down: bool = False  # an outage: every datagram is dropped
    counters: NetworkCounters = field(default_factory=NetworkCounters)
    down_hosts: set[str] = field(default_factory=set)  # an outage of these hosts' links
    record: bool = False  # keep (time, wire bytes) of each datagram, per (src, dst) host

    def __post_init__(self) -> None:
        self._sockets: dict[Address, MemorySocket] = {}
        self._ports = itertools.count(40000)
        self._rng = random.Random(self.seed)
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._seq = itertools.count()
        self._wake = trio.Event()
        # (time, wire bytes) of each datagram delivered, by (source host, destination host)
        self.carried: dict[tuple[str, str], list[tuple[float, int]]] = {}

    def socket(self, bind: Address = ("10.0.0.1", 0), **_: object) -> MemorySocket:
        """A new socket (the keyword arguments of ``UdpSocket`` are accepted and ignored)."""
        host, port = bind
        if port == 0:
            port = next(self._ports)
        addr = (host if host not in ("0.0.0.0", "::") else "10.0.0.2", port)
        if addr in self._sockets:
            raise OSError(f"address {addr} in use")
        sock = MemorySocket(self, addr)
        self._sockets[addr] = sock
        return sock

    def _send(self, src: Address, dst: Address, data: bytes) -> None:
        if self.down or (self.down_hosts and (src[0] in self.down_hosts
                                              or dst[0] in self.down_hosts)):
            self.counters.dropped_down += 1
            return
        if self.loss and self._rng.random() < self.loss:
            self.counters.dropped_loss += 1
            return
        due = trio.current_time() + self.delay
        heapq.heappush(self._queue, (due, next(self._seq), src, dst, data))
        self._wake.set()

    async def run(self) -> None:
        """Deliver datagrams when due (start it in the test's nursery)."""
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            due = self._queue[0][0]
            if due > trio.current_time():
                with trio.move_on_at(due):
                    self._wake = trio.Event()
                    await self._wake.wait()
                continue
            _, _, src, dst, data = heapq.heappop(self._queue)
            target = self._sockets.get(dst)
            if target is None or target.closed:
                continue
            self.counters.delivered += 1
            self.counters.bytes_delivered += len(data)
            if self.record:
                self.carried.setdefault((src[0], dst[0]), []).append(
                    (trio.current_time(), len(data) + header_bytes_for(socket.AF_INET, dst[0])))
            target._deliver(data, src)


class MemorySocket:
    family = socket.AF_INET
    link_overhead = 0

    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        self.network = network
        self._address = address
        self.counters = WireCounters()
        self.closed = False
        self._inbox: list[tuple[bytes, Address]] = []
        self._readable = trio.Event()

    @property
    def address(self) -> Address:
        return self._address

    def per_datagram(self, host: str | None = None) -> int:
        return header_bytes_for(self.family, host) + self.link_overhead

    def _deliver(self, data: bytes, src: Address) -> None:
        self._inbox.append((data, src))
        self._readable.set()

    async def wait_readable(self) -> None:
        while not self._inbox:
            if self.closed:
                raise trio.ClosedResourceError("memory socket closed")
            self._readable = trio.Event()
            await self._readable.wait()

    def recv_batch(self, limit: int = 256) -> list[tuple[bytes, Address]]:
        batch, self._inbox = self._inbox[:limit], self._inbox[limit:]
        for data, src in batch:
            self.counters.bytes_received += len(data)
            self.counters.wire_bytes_received += len(data) + self.per_datagram(src[0])
            self.counters.datagrams_received += 1
        return batch

    async def send_batch(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        for data, dst in datagrams:
            self.counters.bytes_sent += len(data)
            self.counters.wire_bytes_sent += len(data) + self.per_datagram(dst[0])
            self.counters.datagrams_sent += 1
            self.network._send(self._address, (dst[0], dst[1]), bytes(data))
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        self.closed = True
        self._readable.set()
        if self.network._sockets.get(self._address) is self:  # the address is free again
            del self.network._sockets[self._address]
