"""The rendezvous relay: a Trio UDP server around :class:`~.protocol.RelayTable`.

One UDP socket. A datagram whose first byte is the rendezvous magic is a
registration (answered by the table); any other datagram is forwarded
unchanged to the other agent of the sender's session, or dropped. The relay
never holds QUIC keys: it sees ciphertext, sizes, timing and addresses.

Counters are readable over a Unix socket (``--control PATH``): connect, read
one JSON document, done (``quelay rendezvous-status``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import trio

from ..transport.udp import Address, UdpSocket, resolve
from .protocol import RelayLimits, RelayTable, is_rendezvous

log = logging.getLogger("quelay.rendezvous")

MIN_SECRET = 16


def read_secret(path: Path) -> bytes:
    """The shared secret from a file (surrounding whitespace stripped)."""
    secret = path.read_bytes().strip()
    if not secret:
        raise ValueError(f"rendezvous secret file {path} is empty")
    if len(secret) < MIN_SECRET:
        raise ValueError(f"rendezvous secret in {path} is shorter than {MIN_SECRET} bytes")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("rendezvous secret file %s is readable by group or others", path)
    return secret


class RendezvousServer:
    def __init__(self, listen: Address, secret: bytes, *, limits: RelayLimits | None = None,
                 control: Path | None = None, stats_interval: float = 0.0) -> None:
        self.listen = listen
        self.table = RelayTable(secret, limits)
        self.control = control
        self.stats_interval = stats_interval
        self.sock: UdpSocket | None = None
        self.started = time.time()
        self._cpu0 = time.process_time()

    @property
    def address(self) -> Address:
        assert self.sock is not None
        return self.sock.address

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"listen": list(self.address) if self.sock else None,
                               "uptime": round(time.time() - self.started, 3),
                               "cpu_seconds": round(time.process_time() - self._cpu0, 3)}
        out.update(self.table.snapshot())
        if self.sock is not None:
            c = self.sock.counters
            out["udp"] = {"datagrams_received": c.datagrams_received,
                          "bytes_received": c.bytes_received,
                          "datagrams_sent": c.datagrams_sent, "bytes_sent": c.bytes_sent}
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        family, addr = resolve(*self.listen)
        self.sock = UdpSocket(addr, family=family)
        try:
            async with trio.open_nursery() as nursery:
                if self.control is not None:
                    await nursery.start(self._serve_control, self.control)
                nursery.start_soon(self._expire_loop)
                if self.stats_interval > 0:
                    nursery.start_soon(self._stats_loop)
                log.info("rendezvous relay listening on udp %s:%d", *self.address)
                task_status.started()
                await self._receive_loop()
        finally:
            self.sock.close()

    async def _receive_loop(self) -> None:
        sock = self.sock
        assert sock is not None
        table = self.table
        while True:
            await sock.wait_readable()
            now, wall = trio.current_time(), time.time()
            out: list[tuple[bytes, Address]] = []
            for data, addr in sock.recv_batch():
                if is_rendezvous(data):
                    replies = table.handle_untrusted(data, addr, now, wall)
                    for reply, dst in replies:
                        out.append((reply, _for_socket(sock, dst)))
                    continue
                fwd = table.relay(data, addr, now, wall)
                if fwd is not None:
                    out.append((fwd[0], _for_socket(sock, fwd[1])))
            if out:
                await sock.send_batch(out)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            dropped = self.table.expire(trio.current_time())
            if dropped:
                log.info("rendezvous: %d idle agents expired", dropped)

    async def _stats_loop(self) -> None:
        while True:
            await trio.sleep(self.stats_interval)
            snap = self.status()
            log.info("rendezvous: %d sessions (%d paired), relayed %d datagrams / %d bytes, "
                     "refusals %s", snap["sessions"], snap["paired"],
                     snap["relayed_datagrams"], snap["relayed_bytes"],
                     {k: v for k, v in snap["refusals"].items() if v} or "none",
                     extra={"event": "rendezvous.stats", "stats": snap})

    async def _serve_control(self, path: Path, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
        try:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                with conn:
                    data = (json.dumps(self.status()) + "\n").encode()
                    with trio.move_on_after(2.0):
                        await conn.send(data)
        finally:
            listener.close()
            try:
                path.unlink()
            except FileNotFoundError:
                log.debug("control socket %s already removed", path)


def _for_socket(sock: UdpSocket, addr: Address) -> Address:
    """A normalised IPv4 address as a dual-stack IPv6 socket needs it."""
    if sock.family == trio.socket.AF_INET6 and "." in addr[0] and ":" not in addr[0]:
        return ("::ffff:" + addr[0], addr[1])
    return addr


async def read_status(control: Path) -> dict[str, Any]:
    """A running relay's counters, from its control socket."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(control))
        chunks = []
        while True:
            chunk = await sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
