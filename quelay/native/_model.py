"""Pure-Python reference model of the hot path: :class:`Spool` and :class:`DrrTable`.

Same API, same results and same exceptions as the C module
(``native/*.c`` behind :mod:`quelay.native._cffi_backend`); the differential
tests drive both side by side.  It is written for clarity, not speed, and is
used by the agent only when ``QUELAY_PURE_PYTHON=1`` is set explicitly.

Spool
    A ring buffer addressed by absolute offsets A (acked) <= Q (queued) <=
    T (tail), T - A <= capacity.  The ring holds ``allocated`` bytes and the
    byte at offset X lives at ``ring[X % allocated]``.  The ring follows the
    bytes held, not the capacity: none at first; a write that needs room
    moves A..T into ``_ring_size(T - A + n)`` (SPOOL_MIN_RING << k, capped at
    the capacity); an ack that drains it frees it, one that leaves less than
    a quarter in use moves A..T into ``_ring_size(2 (T - A))``.  If memory
    runs out the ring stays: a write takes what fits (NativeMemoryError only
    if nothing does), a shrink does not happen.

DrrTable
    Deficit round robin.  Control streams are served first, by strict
    priority (higher first, ties in the order they were added), each
    getting min(backlog, remaining budget).  Bulk streams with a backlog
    wait in a ring in the order they became backlogged; a visit adds the
    stream's quantum, ``base_quantum * (priority + 1)``, to its deficit and
    grants min(deficit, backlog, remaining budget).  So bulk shares are
    proportional to priority + 1.  A stream whose backlog reaches zero
    leaves the ring and forfeits its deficit (idle streams bank no credit);
    a visit cut short by the budget resumes, without a new quantum, on the
    next call, so fairness holds across many small budgets.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType

from .errors import (
    DEFAULT_BASE_QUANTUM,
    MAX_STREAMS,
    PRIORITY_DEFAULT,
    SPOOL_MIN_RING,
    U64_MAX,
    BytesLike,
    DrrReleasedError,
    DuplicateStreamError,
    NativeMemoryError,
    SpoolClosedError,
    SpoolRangeError,
    SpoolReleasedError,
    UnknownStreamError,
    as_readable,
    as_writable,
    check_base_quantum,
    check_bytes,
    check_capacity,
    check_control,
    check_count,
    check_offset,
    check_priority,
    check_stream_id,
)

__all__ = ["Spool", "DrrTable", "BACKEND"]

BACKEND = "python"

_EMPTY = memoryview(b"")


def _allocate(size: int) -> bytearray:
    """A new zeroed ring (the one allocation the model makes; a test may fail it)."""
    return bytearray(size)


def _ring_size(capacity: int, need: int) -> int:
    """The ring size that holds ``need`` bytes: 0, or SPOOL_MIN_RING << k up to the capacity."""
    if need == 0:
        return 0
    size = SPOOL_MIN_RING
    while size < need and size < capacity:
        size <<= 1
    return min(size, capacity)


class Spool:
    """Ring buffer spool for one outbound stream (reference model)."""

    __slots__ = ("_capacity", "_ring", "_ro", "_acked", "_queued", "_tail", "_closed",
                 "_released")

    def __init__(self, capacity: int) -> None:
        self._capacity = check_capacity(capacity)
        self._ring: memoryview = _EMPTY  # writable view of the ring; its len is the size
        self._ro: memoryview = _EMPTY
        self._acked = 0
        self._queued = 0
        self._tail = 0
        self._closed = False
        self._released = False

    def _move(self, size: int) -> bool:
        """Replace the ring by one of ``size`` bytes holding A..T; False if out of memory."""
        if size:
            try:
                ring = memoryview(_allocate(size))
            except MemoryError:
                return False
            at = self._acked
            while at < self._tail:  # each run of the old ring to its offsets in the new one
                idx = at % len(self._ring)
                run = min(self._tail - at, len(self._ring) - idx)
                self._put(ring, at, self._ring[idx:idx + run])
                at += run
        else:
            ring = _EMPTY
        self._ring = ring
        self._ro = ring.toreadonly()
        return True

    @staticmethod
    def _put(ring: memoryview, at: int, src: memoryview) -> None:
        n = len(src)
        idx = at % len(ring)
        first = min(n, len(ring) - idx)
        ring[idx:idx + first] = src[:first]
        if n > first:
            ring[:n - first] = src[first:n]

    # ---- offsets and derived state ----

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def allocated(self) -> int:
        """Bytes of ring memory the spool holds now (it follows T - A, not the capacity)."""
        return len(self._ring)

    @property
    def acked(self) -> int:
        """A: every byte below A is safe at the far side."""
        return self._acked

    @property
    def queued(self) -> int:
        """Q: the next byte to hand to the transport."""
        return self._queued

    @property
    def tail(self) -> int:
        """T: the next byte the local client writes."""
        return self._tail

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def free(self) -> int:
        return self._capacity - (self._tail - self._acked)

    @property
    def pending(self) -> int:
        """Bytes written but not yet handed out: T - Q."""
        return self._tail - self._queued

    @property
    def unacked(self) -> int:
        return self._tail - self._acked

    @property
    def eof(self) -> bool:
        """Closed and nothing left to hand to the transport."""
        return self._closed and self._queued == self._tail

    @property
    def done(self) -> bool:
        """Closed and everything acknowledged."""
        return self._closed and self._acked == self._tail

    @property
    def released(self) -> bool:
        return self._released

    # ---- operations ----

    def _live(self) -> None:
        if self._released:
            raise SpoolReleasedError("spool buffer was released")

    def write(self, data: BytesLike) -> int:
        """Copy as much of ``data`` as fits at T; return the count (0 when full)."""
        view = as_readable(data)
        self._live()
        if self._closed:
            raise SpoolClosedError("write after close")
        held = self._tail - self._acked
        n = min(len(view), self._capacity - held)
        if n == 0:
            return 0
        if self._tail + n > U64_MAX:
            raise SpoolRangeError("64-bit offset space exhausted")
        size = len(self._ring)
        if held + n > size and not self._move(_ring_size(self._capacity, held + n)):
            if size == held:
                raise NativeMemoryError("cannot grow the spool's ring, and it is full")
            n = min(n, size - held)  # no memory for a bigger ring: take what fits
        self._put(self._ring, self._tail, view[:n])
        self._tail += n
        return n

    def peek(self, max_bytes: int) -> memoryview:
        """Read-only view of up to ``max_bytes`` pending bytes from Q, without advancing.

        Contiguous, so it may be shorter than asked where the ring wraps.  It
        shares memory with the spool: the bytes stay as they are until they
        are acknowledged (and then overwritten by later writes); take a copy
        if you keep it longer.
        """
        m = check_count("max_bytes", max_bytes)
        self._live()
        size = len(self._ring)
        if size == 0:
            return _EMPTY
        idx = self._queued % size
        n = min(m, self._tail - self._queued, size - idx)
        return self._ro[idx:idx + n]

    def read(self, max_bytes: int) -> bytes:
        """Copy of up to ``max_bytes`` pending bytes from Q (across the wrap); advances Q."""
        m = check_count("max_bytes", max_bytes)
        self._live()
        n = min(m, self._tail - self._queued)
        out = bytearray(n)
        self._gather(self._queued, memoryview(out))
        self._queued += n
        return bytes(out)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Copy pending bytes from Q straight into ``buf``; advances Q; returns the count."""
        dst = as_writable(buf)
        self._live()
        n = min(len(dst), self._tail - self._queued)
        self._gather(self._queued, dst[:n])
        self._queued += n
        return n

    def _gather(self, at: int, dst: memoryview) -> None:
        n = len(dst)
        if n == 0:
            return
        idx = at % len(self._ring)
        first = min(n, len(self._ring) - idx)
        dst[:first] = self._ring[idx:idx + first]
        if n > first:
            dst[first:] = self._ring[:n - first]

    def advance(self, n: int) -> None:
        """Q += n (the caller consumed a peek()); beyond T is a SpoolRangeError."""
        k = check_count("n", n)
        self._live()
        if k > self._tail - self._queued:
            pending = self._tail - self._queued
            raise SpoolRangeError(f"advance by {k} passes the tail ({pending} pending)")
        self._queued += k

    def ack(self, offset: int) -> None:
        """The receiver holds every byte below ``offset``.

        Below A: ignored (stale or duplicate).  Above T: SpoolRangeError.
        Otherwise A = offset, Q moves up to A if an ack overtook a rewound Q, and
        the ring shrinks (or is freed) once little of it is in use.
        """
        off = check_offset("offset", offset)
        self._live()
        if off > self._tail:
            raise SpoolRangeError(f"ack of offset {off} beyond the tail {self._tail}")
        if off <= self._acked:
            return
        self._acked = off
        if self._queued < off:
            self._queued = off
        held = self._tail - off
        if held < len(self._ring) // 4 or held == 0:
            size = _ring_size(self._capacity, 2 * held)
            if size < len(self._ring):
                self._move(size)  # out of memory: keep the bigger ring

    def rewind(self) -> None:
        """Link lost: Q = A, so every unacknowledged byte is handed out again."""
        self._live()
        self._queued = self._acked

    def close(self) -> None:
        """EOF at T (idempotent); later writes raise SpoolClosedError."""
        self._live()
        self._closed = True

    def release(self) -> None:
        """Free the buffer now (idempotent).  Offsets stay readable; every other
        operation raises SpoolReleasedError.  Views from peek() stay valid."""
        if self._released:
            return
        self._released = True
        self._ring = _EMPTY
        self._ro = _EMPTY

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"<Spool capacity={self._capacity} allocated={len(self._ring)} "
                f"A={self._acked} Q={self._queued} "
                f"T={self._tail}{' closed' if self._closed else ''}"
                f"{' released' if self._released else ''}>")


class _Stream:
    __slots__ = ("id", "priority", "control", "quantum", "backlog", "deficit", "seq", "active",
                 "fresh")

    def __init__(self, sid: int, priority: int, control: bool, quantum: int, seq: int) -> None:
        self.id = sid
        self.priority = priority
        self.control = control
        self.quantum = quantum
        self.backlog = 0
        self.deficit = 0
        self.seq = seq
        self.active = False
        self.fresh = not control  # never backlogged yet: first activation at the front


class DrrTable:
    """Deficit-round-robin accounting for the scheduler (reference model)."""

    __slots__ = ("_base", "_streams", "_control", "_active", "_qsum", "_seq", "_released")

    def __init__(self, base_quantum: int = DEFAULT_BASE_QUANTUM) -> None:
        self._base = check_base_quantum(base_quantum)
        self._streams: dict[int, _Stream] = {}
        self._control: list[_Stream] = []  # sorted by (-priority, seq)
        # [0] is the head being visited; a stream with deficit > 0 is in the middle of a
        # visit the budget cut short and resumes it, without a new quantum, at the head.
        self._active: deque[_Stream] = deque()
        self._qsum = 0  # sum of the quanta in the active ring
        self._seq = 0
        self._released = False

    @property
    def base_quantum(self) -> int:
        return self._base

    def _get(self, stream_id: object) -> _Stream:
        sid = check_stream_id(stream_id)
        if self._released:
            raise DrrReleasedError("DRR table was released")
        try:
            return self._streams[sid]
        except KeyError:
            raise UnknownStreamError(f"unknown stream {sid}") from None

    def _sort_control(self) -> None:
        self._control.sort(key=lambda s: (-s.priority, s.seq))

    def _activate(self, s: _Stream) -> None:
        """Join the ring at the tail; a stream's first activation joins at the front,
        ahead of the head's unfinished visit (which keeps its deficit and resumes next)."""
        s.active = True
        s.deficit = 0
        if s.fresh:
            s.fresh = False
            self._active.appendleft(s)
        else:
            self._active.append(s)
        self._qsum += s.quantum

    def _deactivate(self, s: _Stream) -> None:
        self._active.remove(s)
        s.active = False
        s.deficit = 0
        self._qsum -= s.quantum

    # ---- table maintenance ----

    def add(self, stream_id: int, priority: int = PRIORITY_DEFAULT, *,
            control: bool = False) -> None:
        sid = check_stream_id(stream_id)
        prio = check_priority(priority)
        ctl = check_control(control)
        if self._released:
            raise DrrReleasedError("DRR table was released")
        if sid in self._streams:
            raise DuplicateStreamError(f"stream {sid} is already scheduled")
        if len(self._streams) >= MAX_STREAMS:
            raise NativeMemoryError(f"DRR table is limited to {MAX_STREAMS} streams")
        s = _Stream(sid, prio, ctl, self._base * (prio + 1), self._seq)
        self._seq += 1
        self._streams[sid] = s
        if ctl:
            self._control.append(s)
            self._sort_control()

    def remove(self, stream_id: int) -> None:
        s = self._get(stream_id)
        if s.active:
            self._deactivate(s)
        if s.control:
            self._control.remove(s)
        del self._streams[s.id]

    def set_priority(self, stream_id: int, priority: int) -> None:
        """New quantum from the stream's next visit (a visit in progress keeps its credit)."""
        sid = check_stream_id(stream_id)
        prio = check_priority(priority)
        s = self._get(sid)
        quantum = self._base * (prio + 1)
        if s.active:
            self._qsum += quantum - s.quantum
        s.priority = prio
        s.quantum = quantum
        if s.control:
            self._sort_control()

    def set_base_quantum(self, base_quantum: int) -> None:
        """New base quantum for every stream; an unfinished visit keeps its credit."""
        base = check_base_quantum(base_quantum)
        if self._released:
            raise DrrReleasedError("DRR table was released")
        self._base = base
        for s in self._streams.values():
            s.quantum = base * (s.priority + 1)
        self._qsum = sum(s.quantum for s in self._active)

    def active_count(self) -> int:
        """Bulk streams with backlog (in the ring)."""
        return 0 if self._released else len(self._active)

    def set_backlog(self, stream_id: int, nbytes: int) -> None:
        """Bytes the stream has ready to send now (replaces the previous figure)."""
        sid = check_stream_id(stream_id)
        n = check_bytes("nbytes", nbytes)
        s = self._get(sid)
        s.backlog = n
        if not s.control:
            if n > 0 and not s.active:
                self._activate(s)
            elif n == 0 and s.active:
                self._deactivate(s)

    # ---- queries ----

    def backlog(self, stream_id: int) -> int:
        return self._get(stream_id).backlog

    def deficit(self, stream_id: int) -> int:
        """Unused credit of a visit the budget cut short (0 otherwise, and for control)."""
        return self._get(stream_id).deficit

    def quantum(self, stream_id: int) -> int:
        """base_quantum * (priority + 1)."""
        return self._get(stream_id).quantum

    def priority(self, stream_id: int) -> int:
        return self._get(stream_id).priority

    def is_control(self, stream_id: int) -> bool:
        return self._get(stream_id).control

    def __len__(self) -> int:
        return 0 if self._released else len(self._streams)

    def __contains__(self, stream_id: object) -> bool:
        if self._released or type(stream_id) is bool or not isinstance(stream_id, int):
            return False
        return stream_id in self._streams

    # ---- scheduling ----

    def schedule(self, budget: int) -> list[tuple[int, int]]:
        """Hand out at most ``budget`` bytes: [(stream_id, nbytes), ...].

        At most one grant per stream; control streams first, then bulk streams
        in the order they were first served.  Each grant is deducted from the
        backlog the table knows (set_backlog() replaces it with the truth).
        """
        remaining = check_bytes("budget", budget)
        if self._released:
            raise DrrReleasedError("DRR table was released")
        grants: dict[int, int] = {}

        for s in self._control:
            if remaining == 0:
                break
            g = min(s.backlog, remaining)
            if g:
                s.backlog -= g
                remaining -= g
                grants[s.id] = grants.get(s.id, 0) + g

        active = self._active
        until_check = 0
        while remaining and active:
            s = active[0]
            if s.deficit == 0:  # a new visit (else: resume an unfinished one)
                if until_check == 0:
                    if remaining >= self._qsum:
                        remaining = self._fast_forward(remaining, grants)
                        if remaining == 0:
                            break
                    until_check = len(active)
                until_check -= 1
                s.deficit += s.quantum
            g = min(s.deficit, s.backlog, remaining)
            s.deficit -= g
            s.backlog -= g
            remaining -= g
            grants[s.id] = grants.get(s.id, 0) + g
            if s.backlog == 0:
                self._deactivate(s)
            elif s.deficit == 0:
                active.rotate(-1)
        return list(grants.items())

    def _fast_forward(self, remaining: int, grants: dict[int, int]) -> int:
        """Apply k whole rounds at once, k being the largest number of rounds the
        budget pays in full and in which no backlog can run dry: each stream gets
        k quanta and the ring returns to the same head, exactly as k single rounds."""
        k = remaining // self._qsum
        for s in self._active:
            if s.deficit:
                return remaining  # a preempted visit resumes in this round: one by one
            k = min(k, (s.backlog - 1) // s.quantum)
            if k == 0:
                return remaining
        for s in self._active:
            g = k * s.quantum
            s.backlog -= g
            grants[s.id] = grants.get(s.id, 0) + g
        return remaining - k * self._qsum

    # ---- lifetime ----

    def release(self) -> None:
        """Drop the table (idempotent); later calls raise DrrReleasedError."""
        self._released = True
        self._streams.clear()
        self._control.clear()
        self._active.clear()
        self._qsum = 0

    def __enter__(self) -> DrrTable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DrrTable streams={len(self)} base_quantum={self._base}>"
