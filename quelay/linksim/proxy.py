"""A Trio UDP proxy that applies a :class:`~quelay.linksim.impairment.LinkModel`.

Clients send to :attr:`LinkSim.address`; each client source address gets its
own upstream socket (a "mapping"), so the upstream sees one peer per client
and a client that comes back from a new port simply gets a new mapping. Idle
mappings expire. Replies from the upstream go back to the client from the
listen socket.

Timing uses ``trio.current_time()`` only: one scheduler task keeps a heap of
``(due, seq, ...)`` and sleeps until the earliest due time, then sends
everything due in one batch; with Trio's MockClock the whole proxy runs on
virtual time. A delivery that is already due (clean profile) is sent at once
by the task that received it, unless the heap is non-empty (FIFO).

Memory is bounded: the model limits each direction's in-flight bytes
(bottleneck queue plus delay line), and the number of mappings is capped.
"""

from __future__ import annotations

import heapq
import json
import os
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..transport.udp import resolve
from .impairment import BIN_S, Direction, DirectionStats, HistogramKey, LinkModel
from .profiles import CLEAN, Profile, parse_profile

Address = tuple[str, int]
IPV4_UDP_HEADER = 20 + 8
IPV6_UDP_HEADER = 40 + 8


def header_bytes_for(family: socket.AddressFamily, host: str) -> int:
    """IP + UDP header bytes of each datagram through a socket of ``family`` (an
    IPv4-mapped IPv6 address carries IPv4 packets)."""
    if family == socket.AF_INET6 and not host.lower().startswith("::ffff:"):
        return IPV6_UDP_HEADER
    return IPV4_UDP_HEADER

RECV_SIZE = 65535
RECV_BATCH = 256
BUFFER_BYTES = 4 * 1024 * 1024


@dataclass
class ProxyStats:
    """Live counters: per-direction model counters plus mapping bookkeeping."""

    up: DirectionStats
    down: DirectionStats
    mappings_active: int = 0
    mappings_opened: int = 0
    mappings_expired: int = 0
    mappings_refused: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "up": self.up.to_dict(),
            "down": self.down.to_dict(),
            "mappings": {
                "active": self.mappings_active,
                "opened": self.mappings_opened,
                "expired": self.mappings_expired,
                "refused": self.mappings_refused,
            },
        }


@dataclass(eq=False)
class _Mapping:
    client: Address
    sock: socket.socket
    last_active: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    in_flight: int = 0
    closed: bool = False


def _udp_socket(family: socket.AddressFamily, buffer_bytes: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with suppress(OSError):  # capped by the kernel's limits; best effort
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
    return sock


class LinkSim:
    """A running proxy; create it with :func:`open_linksim`."""

    def __init__(
        self,
        model: LinkModel,
        listen_sock: socket.socket,
        upstream: Address,
        upstream_family: socket.AddressFamily,
        *,
        mapping_idle_s: float,
        max_mappings: int,
        buffer_bytes: int,
    ) -> None:
        self.model = model
        self.upstream = upstream
        self._listen = listen_sock
        host, port = listen_sock.getsockname()[:2]
        self._address: Address = (str(host), int(port))  # still readable after the block
        self._upstream_family = upstream_family
        self._mapping_idle_s = mapping_idle_s
        self._max_mappings = max_mappings
        self._buffer_bytes = buffer_bytes
        self._mappings: dict[Address, _Mapping] = {}
        self._heap: list[tuple[float, int, Direction, _Mapping, bytes]] = []
        self._seq = 0
        self._wake = trio.Event()
        self._send_locks: dict[int, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = ProxyStats(up=model.up.stats, down=model.down.stats)

    # --- public API ---------------------------------------------------------

    @property
    def address(self) -> Address:
        """The bound listen address: point the client agent here."""
        return self._address

    @property
    def outage(self) -> bool:
        """True while datagrams are being dropped (manual or scheduled outage)."""
        return self.model.outage_active(trio.current_time())

    def set_outage(self, on: bool) -> None:
        """Start/stop a manual outage; also drops what is in flight when it is due."""
        self.model.set_outage(on, trio.current_time())

    def histogram(self) -> list[dict[str, Any]]:
        return self.model.histogram()

    def histogram_json(self) -> str:
        return self.model.histogram_json()

    def peak_rate_bps(self, key: HistogramKey, window_s: float = 1.0) -> float:
        """Highest rate (bits/s) of a histogram column over aligned windows of ``window_s``."""
        n = max(1, round(window_s / BIN_S))
        return self.model.peak_bytes(key, window_s) * 8 / (n * BIN_S)

    def snapshot(self) -> dict[str, Any]:
        snap = self.model.snapshot(trio.current_time())
        snap["listen"] = list(self.address)
        snap["upstream"] = list(self.upstream)
        snap["mappings"] = self.stats.to_dict()["mappings"]
        return snap

    def write_stats(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`snapshot` as JSON, atomically (readers never see half a file)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1) + "\n")
        os.replace(tmp, target)

    def summary(self) -> str:
        """One line for logs: rates are not computed here, only totals."""
        def part(name: str, s: DirectionStats) -> str:
            return (f"{name} in={s.datagrams_in}/{s.bytes_in}B fwd={s.datagrams_forwarded}/"
                    f"{s.bytes_forwarded}B drop[loss={s.dropped_loss} queue={s.dropped_queue} "
                    f"outage={s.dropped_outage} overflow={s.dropped_overflow}] "
                    f"dup={s.duplicated} corrupt={s.corrupted}")
        t = trio.current_time() - self.model.start
        return (f"t={t:.1f}s outage={'on' if self.outage else 'off'} "
                f"mappings={self.stats.mappings_active} | {part('up', self.stats.up)} | "
                f"{part('down', self.stats.down)}")

    # --- tasks --------------------------------------------------------------

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._listen_loop)
        nursery.start_soon(self._scheduler)
        nursery.start_soon(self._janitor)

    def _close(self) -> None:
        for m in self._mappings.values():
            m.closed = True
            m.sock.close()
        self._mappings.clear()
        self._listen.close()

    def _route(self, direction: Direction, m: _Mapping, data: bytes, now: float,
               immediate: list[tuple[Direction, _Mapping, bytes]]) -> None:
        m.last_active = now
        heap = self._heap
        for due, out in self.model.submit(direction, data, now):
            m.in_flight += 1
            if due <= now and not heap:
                immediate.append((direction, m, out))
            else:
                self._seq += 1
                if not heap or due < heap[0][0]:
                    self._wake.set()
                heapq.heappush(heap, (due, self._seq, direction, m, out))

    async def _emit(self, batch: Iterable[tuple[Direction, _Mapping, bytes]]) -> None:
        now = trio.current_time()
        for direction, m, data in batch:
            m.in_flight -= 1
            if m.closed:
                self.model.discard(direction, len(data))
                continue
            if not self.model.deliver(direction, len(data), now):
                continue
            if direction == "up":
                await self._send(m.sock, data, None)
            else:
                await self._send(self._listen, data, m.client)

    async def _send(self, sock: socket.socket, data: bytes, addr: Address | None) -> None:
        while True:
            try:
                if addr is None:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                lock = self._send_locks.setdefault(sock.fileno(), trio.Lock())
                async with lock:
                    await trio.lowlevel.wait_writable(sock)
            except OSError:
                # ICMP unreachable from an earlier datagram, or the peer is gone:
                # UDP is fire-and-forget, and so is the simulated link.
                return

    def _mapping_for(self, client: Address, now: float) -> _Mapping | None:
        m = self._mappings.get(client)
        if m is not None:
            return m
        if len(self._mappings) >= self._max_mappings:
            self.stats.mappings_refused += 1
            return None
        sock = _udp_socket(self._upstream_family, self._buffer_bytes)
        try:
            sock.bind(("::" if self._upstream_family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.connect(self.upstream)
        except OSError:
            sock.close()
            raise
        m = _Mapping(client=client, sock=sock, last_active=now)
        self._mappings[client] = m
        self.stats.mappings_opened += 1
        self.stats.mappings_active = len(self._mappings)
        assert self._nursery is not None
        self._nursery.start_soon(self._upstream_loop, m)
        return m

    async def _listen_loop(self) -> None:
        sock = self._listen
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            immediate: list[tuple[Direction, _Mapping, bytes]] = []
            for _ in range(RECV_BATCH):
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # ICMP error queued on the socket
                client = (str(addr[0]), int(addr[1]))
                m = self._mapping_for(client, now)
                if m is not None:
                    self._route("up", m, data, now, immediate)
            if immediate:
                await self._emit(immediate)

    async def _upstream_loop(self, m: _Mapping) -> None:
        sock = m.sock
        try:
            with m.scope:
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    now = trio.current_time()
                    immediate: list[tuple[Direction, _Mapping, bytes]] = []
                    for _ in range(RECV_BATCH):
                        try:
                            data = sock.recv(RECV_SIZE)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            continue  # upstream not listening (yet): ICMP refused
                        self._route("down", m, data, now, immediate)
                    if immediate:
                        await self._emit(immediate)
        finally:
            if not m.closed:
                m.closed = True
                sock.close()

    async def _scheduler(self) -> None:
        heap = self._heap
        while True:
            if heap:
                with trio.move_on_at(heap[0][0]):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            batch: list[tuple[Direction, _Mapping, bytes]] = []
            while heap and heap[0][0] <= now:
                _, _, direction, m, data = heapq.heappop(heap)
                batch.append((direction, m, data))
            if batch:
                await self._emit(batch)

    async def _janitor(self) -> None:
        """Expire mappings idle for ``mapping_idle_s`` with nothing in flight."""
        idle = self._mapping_idle_s
        while True:
            await trio.sleep(max(idle / 4, 0.05))
            now = trio.current_time()
            for client, m in list(self._mappings.items()):
                if now - m.last_active >= idle and m.in_flight == 0:
                    del self._mappings[client]
                    m.scope.cancel()  # the mapping's task closes its socket
                    self.stats.mappings_expired += 1
            self.stats.mappings_active = len(self._mappings)


@asynccontextmanager
async def open_linksim(
    listen: Address = ("127.0.0.1", 0),
    upstream: Address | None = None,
    profile: Profile | str = CLEAN,
    seed: int | None = 0,
    outages: Iterable[tuple[float, float]] = (),
    *,
    mapping_idle_s: float = 120.0,
    max_mappings: int = 256,
    buffer_bytes: int = BUFFER_BYTES,
    trace: bool = False,
) -> AsyncIterator[LinkSim]:
    """Run an impairing UDP proxy from ``listen`` to ``upstream`` for the block's duration.

    ``upstream`` is required. ``profile`` is a :class:`Profile` or a spec
    string (``"LOS-250ms,loss=1%"``). ``outages`` are ``(start_s,
    duration_s)`` relative to entering the block. All tasks live in a nursery
    inside the block and are cancelled on exit. Every datagram is counted with
    its IP+UDP headers (28 B over IPv4, 48 B over IPv6) in the ``wire_bytes_*``
    counters, the histogram and the peak rates: the figures are what the link
    carries. ``trace=True`` records every datagram's fate (``LinkModel.events``).
    """
    if upstream is None:
        raise ValueError("open_linksim needs upstream=(host, port)")
    if isinstance(profile, str):
        profile = parse_profile(profile)
    family, listen_addr = resolve(*listen)
    up_family, upstream_addr = resolve(*upstream)
    sock = _udp_socket(family, buffer_bytes)
    try:
        sock.bind(listen_addr)
    except OSError:
        sock.close()
        raise
    model = LinkModel(profile, seed=seed, start=trio.current_time(), outages=outages,
                      header_bytes=header_bytes_for(family, listen_addr[0]), trace=trace)
    sim = LinkSim(model, sock, upstream_addr, up_family, mapping_idle_s=mapping_idle_s,
                  max_mappings=max_mappings, buffer_bytes=buffer_bytes)
    try:
        async with trio.open_nursery() as nursery:
            sim._start(nursery)
            try:
                yield sim
            finally:
                nursery.cancel_scope.cancel()
    finally:
        sim._close()
