"""Explicit byte pipes between a local client and the session.

An outbound stream's bytes cross from the control server (which reads the
client's socket) to the session's pump (which hands them to QUIC) through
one :class:`OutboundPipe`: the spool (A/Q/T offsets), the SHA-256 of what
the writer gave, and the two waits — the writer waits for space, the pump
waits for bytes. An incoming stream's bytes cross from the session's sink to
the attached reader through an :class:`InboundPipe`. Nothing else carries
bytes between those two modules, so a reader can follow them here.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
from typing import Any

import trio

from ..errors import QuelayError
from ..native import NativeMemoryError, Spool

log = logging.getLogger("quelay.pipes")


class PipeAborted(QuelayError):
    """The transfer ended while a side of its pipe was waiting."""


class OutboundPipe:
    """Writer → spool → pump, with back-pressure on the writer when the spool is full."""

    def __init__(self, capacity: int) -> None:
        self.spool = Spool(capacity)  # holds no memory until the writer writes
        self.hasher = hashlib.sha256()
        self.accepted = 0  # bytes taken from the writer
        self.aborted = False
        # Two waits, each woken only by what can end it: the writer waits for space
        # (an ack frees it; the pump's reads do not), the pump for bytes or the end.
        self._space = trio.lowlevel.ParkingLot()
        self._data = trio.lowlevel.ParkingLot()

    # -- writer side (control server) ----------------------------------------------

    async def write(self, data: memoryview) -> int:
        """Take as much of ``data`` as fits, waiting for space if none does.

        The spool's memory grows with what it holds; if none can be had, bytes
        in flight will free some when acknowledged, so that is waited for too.
        """
        while True:
            if self.aborted:
                raise PipeAborted
            try:
                taken = self.spool.write(data)
            except NativeMemoryError:
                if not self.spool.unacked:
                    raise  # nothing in flight whose ack could make room
                taken = 0
            if taken:
                self.hasher.update(data[:taken])
                self.accepted += taken
                self._data.unpark_all()
                return taken
            await self._space.park()

    @property
    def room(self) -> int:
        """Bytes the writer may add before it waits (0 once aborted)."""
        return 0 if self.aborted else self.spool.free

    def end(self) -> None:
        """The writer half-closed: everything it wrote is the whole stream."""
        if not self.aborted:
            self.spool.close()
            self._data.unpark_all()

    # -- pump side (session) -----------------------------------------------------------

    @property
    def pending(self) -> int:
        return 0 if self.aborted else self.spool.pending

    @property
    def eof(self) -> bool:
        return not self.aborted and self.spool.eof

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes to send (their space stays taken until acknowledged)."""
        return self.spool.read(max_bytes)

    async def wait_readable(self) -> None:
        """Until there are bytes to send or the writer ended (raises once aborted)."""
        while not self.aborted and not self.spool.pending and not self.spool.eof:
            await self._data.park()
        if self.aborted:
            raise PipeAborted

    def acked(self, offset: int) -> None:
        """The receiver has ``offset`` bytes: their spool space is free for the writer."""
        if not self.aborted:
            self.spool.ack(offset)
            # (Not the pump: it waits only with Q at T, which no ack moves.)
            self._space.unpark_all()

    def rewind(self) -> None:
        """A new session replays from the last acknowledged byte."""
        if not self.aborted:
            self.spool.rewind()

    def digest(self) -> bytes:
        return self.hasher.digest()

    def abort(self) -> None:
        """The transfer ended: free the spool, wake both sides."""
        if self.aborted:
            return
        self.aborted = True
        self.spool.release()
        self._space.unpark_all()
        self._data.unpark_all()


class InboundPipe:
    """Sink → the attached reader's socket; the sink waits until a reader attaches."""

    def __init__(self) -> None:
        self.reader: trio.abc.Stream | None = None
        self._attached = trio.Event()
        self.aborted = False

    def attach(self, reader: trio.abc.Stream) -> None:
        self.reader = reader
        self._attached.set()

    async def wait_reader(self) -> trio.abc.Stream:
        await self._attached.wait()
        if self.aborted or self.reader is None:
            raise PipeAborted
        return self.reader

    def abort(self) -> None:
        """The transfer failed: the reader must see an error, never a clean EOF."""
        self.aborted = True
        if self.reader is not None:
            abort_stream(self.reader)
        self._attached.set()


def abort_stream(stream: Any) -> None:
    """Close a local socket with RST so the client sees an error, not a clean EOF."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        log.debug("could not set SO_LINGER on reader socket: %s", exc)
    sock.close()
