"""Thin wrapper over the compiled C module ``quelay.native._quelay_native``.

Same API and semantics as :mod:`quelay.native._model` (see there for the
algorithms).  Arguments are checked here, in Python, before any call into
C; C status codes become the typed exceptions of :mod:`quelay.native.errors`.

Hot-path notes: one C call per operation, no per-call allocation except the
``ffi.from_buffer`` view of a non-``bytes`` argument; ``peek`` returns a
slice of one read-only memoryview of the current ring (made the first time
a ring is peeked at); ``read`` copies straight out of the ring; the spool's
offsets are read straight from the C struct.

Memory: the C side grows the ring on demand and shrinks or frees it as acks
drain it (see native/quelay_native.h).  A ring the wrapper made a view of is
*lent* to Python (``qn_spool_lend``): C stops owning it, and ``ffi.gc`` frees
it once no memoryview refers to it -- so a view from ``peek()`` can show
stale bytes after the ring moved or the spool was released, never freed
memory.  Rings never viewed are freed by C itself (``release()``, ``with``
exit, or ``ffi.gc`` of the struct when the Spool is collected).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, NoReturn

from . import errors as _e
from .errors import (
    DEFAULT_BASE_QUANTUM,
    PRIORITY_DEFAULT,
    U64_MAX,
    BytesLike,
    DrrReleasedError,
    DuplicateStreamError,
    NativeError,
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

try:
    from ._quelay_native import ffi, lib  # type: ignore[import-not-found,unused-ignore]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "quelay's C module (quelay.native._quelay_native) is not built. Build it by "
        "installing the package from the source tree: `pip install -e .` (needs a C "
        "compiler, e.g. `apt-get install gcc`). To run on the slow pure-Python "
        f"reference model instead, set QUELAY_PURE_PYTHON=1. ({exc})"
    ) from exc

__all__ = ["Spool", "DrrTable", "BACKEND"]

BACKEND = "c"


def _check_build() -> None:
    """Refuse a stale build whose limits disagree with the Python side."""
    expected = {
        "QN_SPOOL_MAX_CAPACITY": _e.SPOOL_MAX_CAPACITY,
        "QN_SPOOL_MIN_RING": _e.SPOOL_MIN_RING,
        "QN_DRR_PRIORITY_MIN": _e.PRIORITY_MIN,
        "QN_DRR_PRIORITY_MAX": _e.PRIORITY_MAX,
        "QN_DRR_MAX_BASE_QUANTUM": _e.MAX_BASE_QUANTUM,
        "QN_DRR_MAX_STREAMS": _e.MAX_STREAMS,
        "QN_DRR_MAX_BYTES": _e.MAX_BYTES,
    }
    for name, value in expected.items():
        if getattr(lib, name, None) != value:
            raise ImportError(
                f"quelay's C module is stale ({name} differs from quelay.native.errors); "
                "rebuild it with `pip install -e .`"
            )


_check_build()

_NULL = ffi.NULL
_from_buffer = ffi.from_buffer
_buffer = ffi.buffer
_EMPTY = memoryview(b"")

_spool_write = lib.qn_spool_write
_spool_read = lib.qn_spool_read
_spool_peek = lib.qn_spool_peek
_spool_advance = lib.qn_spool_advance
_spool_ack = lib.qn_spool_ack

_drr_schedule = lib.qn_drr_schedule
_drr_set_backlog = lib.qn_drr_set_backlog
_drr_info = lib.qn_drr_info


# ---- spool ----


def _spool_fail(rc: int, what: str) -> NoReturn:
    if rc == lib.QN_ERELEASED:
        raise SpoolReleasedError("spool buffer was released")
    if rc == lib.QN_ECLOSED:
        raise SpoolClosedError("write after close")
    if rc == lib.QN_ERANGE:
        raise SpoolRangeError(what)
    if rc == lib.QN_EOVERFLOW:
        raise SpoolRangeError("64-bit offset space exhausted")
    if rc == lib.QN_ENOMEM:
        raise NativeMemoryError("cannot allocate the spool buffer")
    raise NativeError(f"spool: unexpected C status {rc} ({what})")


class Spool:
    """Ring buffer spool for one outbound stream (C implementation)."""

    __slots__ = ("_p", "_ro", "_ro_moves", "_offp", "__weakref__")

    def __init__(self, capacity: int) -> None:
        cap = check_capacity(capacity)
        # qn_spool_fini frees the ring C still owns when the struct is collected.
        p = ffi.gc(ffi.new("qn_spool *"), lib.qn_spool_fini)
        rc = lib.qn_spool_init(p, cap)
        if rc != lib.QN_OK:
            _spool_fail(rc, "init")
        self._p = p
        self._ro: memoryview = _EMPTY  # view of the ring as of move number _ro_moves
        self._ro_moves = 0
        self._offp = ffi.new("uint64_t *")

    def _view(self) -> memoryview:
        """Read-only view of the current ring; the first view of a ring borrows it from C."""
        p = self._p
        if self._ro_moves != p.moves:
            ring = lib.qn_spool_lend(p)
            if ring == _NULL:
                self._ro = _EMPTY
            else:
                size: int = p.size
                owned = ffi.gc(ring, lib.qn_spool_free_ring, size=size)
                self._ro = memoryview(_buffer(owned, size)).toreadonly()
            self._ro_moves = p.moves
        return self._ro

    # ---- offsets and derived state (read from the C struct) ----

    @property
    def capacity(self) -> int:
        v: int = self._p.capacity
        return v

    @property
    def allocated(self) -> int:
        """Bytes of ring memory the spool holds now (it follows T - A, not the capacity)."""
        v: int = self._p.size
        return v

    @property
    def acked(self) -> int:
        """A: every byte below A is safe at the far side."""
        v: int = self._p.acked
        return v

    @property
    def queued(self) -> int:
        """Q: the next byte to hand to the transport."""
        v: int = self._p.queued
        return v

    @property
    def tail(self) -> int:
        """T: the next byte the local client writes."""
        v: int = self._p.tail
        return v

    @property
    def closed(self) -> bool:
        return bool(self._p.closed)

    @property
    def free(self) -> int:
        p = self._p
        v: int = p.capacity - (p.tail - p.acked)
        return v

    @property
    def pending(self) -> int:
        """Bytes written but not yet handed out: T - Q."""
        p = self._p
        v: int = p.tail - p.queued
        return v

    @property
    def unacked(self) -> int:
        p = self._p
        v: int = p.tail - p.acked
        return v

    @property
    def eof(self) -> bool:
        """Closed and nothing left to hand to the transport."""
        p = self._p
        return bool(p.closed) and p.queued == p.tail

    @property
    def done(self) -> bool:
        """Closed and everything acknowledged."""
        p = self._p
        return bool(p.closed) and p.acked == p.tail

    @property
    def released(self) -> bool:
        return bool(self._p.released)

    # ---- operations ----

    def write(self, data: BytesLike) -> int:
        """Copy as much of ``data`` as fits at T; return the count (0 when full)."""
        if type(data) is bytes:
            n: int = _spool_write(self._p, data, len(data))
        else:
            try:
                buf = _from_buffer(data)
            except (TypeError, BufferError, ValueError):
                as_readable(data)  # raises the precise TypeError
                raise
            n = _spool_write(self._p, buf, len(buf))
        if n < 0:
            _spool_fail(n, "write")
        return n

    def peek(self, max_bytes: int) -> memoryview:
        """Read-only view of up to ``max_bytes`` pending bytes from Q, without advancing.

        Contiguous, so it may be shorter than asked where the ring wraps.  It
        shares memory with the spool: the bytes stay as they are until they
        are acknowledged (and then overwritten by later writes); take a copy
        if you keep it longer.
        """
        m = max_bytes if type(max_bytes) is int and 0 <= max_bytes <= U64_MAX \
            else check_count("max_bytes", max_bytes)
        n: int = _spool_peek(self._p, m, self._offp)
        if n < 0:
            _spool_fail(n, "peek")
        off: int = self._offp[0]
        return self._view()[off:off + n]

    def read(self, max_bytes: int) -> bytes:
        """Copy of up to ``max_bytes`` pending bytes from Q (across the wrap); advances Q."""
        m = max_bytes if type(max_bytes) is int and 0 <= max_bytes <= U64_MAX \
            else check_count("max_bytes", max_bytes)
        p = self._p
        offp = self._offp
        n: int = _spool_peek(p, m, offp)
        if n < 0:
            _spool_fail(n, "read")
        if n == 0:
            return b""
        # Copied straight out of the ring (no view: the ring is not lent for this).
        buf = p.buf
        data: bytes = _buffer(buf + offp[0], n)[:]
        _spool_advance(p, n)
        if n < m and p.queued != p.tail:  # the pending bytes wrap around the ring's end
            n2: int = _spool_peek(p, m - n, offp)
            data += _buffer(buf + offp[0], n2)[:]
            _spool_advance(p, n2)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Copy pending bytes from Q straight into ``buf``; advances Q; returns the count."""
        try:
            dst = _from_buffer("char[]", buf, True)  # positional: keywords cost ~150 ns
        except (TypeError, BufferError, ValueError):
            as_writable(buf)  # raises the precise TypeError
            raise
        n: int = _spool_read(self._p, dst, len(dst))
        if n < 0:
            _spool_fail(n, "readinto")
        return n

    def advance(self, n: int) -> None:
        """Q += n (the caller consumed a peek()); beyond T is a SpoolRangeError."""
        k = check_count("n", n)
        rc: int = _spool_advance(self._p, k)
        if rc != 0:
            _spool_fail(rc, f"advance by {k} passes the tail ({self.pending} pending)")

    def ack(self, offset: int) -> None:
        """The receiver holds every byte below ``offset``.

        Below A: ignored (stale or duplicate).  Above T: SpoolRangeError.
        Otherwise A = offset, Q moves up to A if an ack overtook a rewound Q, and
        the ring shrinks (or is freed) once little of it is in use.
        """
        off = offset if type(offset) is int and 0 <= offset <= U64_MAX \
            else check_offset("offset", offset)
        p = self._p
        if off > U64_MAX:  # cannot be passed to C; necessarily beyond T
            if p.released:
                _spool_fail(lib.QN_ERELEASED, "ack")
            _spool_fail(lib.QN_ERANGE, f"ack of offset {off} beyond the tail {p.tail}")
        rc: int = _spool_ack(p, off)
        if rc != 0:
            _spool_fail(rc, f"ack of offset {off} beyond the tail {p.tail}")

    def rewind(self) -> None:
        """Link lost: Q = A, so every unacknowledged byte is handed out again."""
        rc: int = lib.qn_spool_rewind(self._p)
        if rc != 0:
            _spool_fail(rc, "rewind")

    def close(self) -> None:
        """EOF at T (idempotent); later writes raise SpoolClosedError."""
        rc: int = lib.qn_spool_close(self._p)
        if rc != 0:
            _spool_fail(rc, "close")

    def release(self) -> None:
        """Free the buffer now (idempotent).  Offsets stay readable; every other
        operation raises SpoolReleasedError.  Views from peek() stay valid (they
        keep the memory until they are gone)."""
        # C frees a ring it still owns; a lent one goes once no view refers to it.
        lib.qn_spool_fini(self._p)
        self._ro = _EMPTY

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        p = self._p
        return (f"<Spool capacity={p.capacity} allocated={p.size} A={p.acked} Q={p.queued} "
                f"T={p.tail}{' closed' if p.closed else ''}{' released' if p.released else ''}>")


# ---- DRR ----


class DrrTable:
    """Deficit-round-robin accounting for the scheduler (C implementation)."""

    __slots__ = ("_d", "_base", "_gp", "_info", "__weakref__")

    def __init__(self, base_quantum: int = DEFAULT_BASE_QUANTUM) -> None:
        self._base = check_base_quantum(base_quantum)
        out = ffi.new("qn_drr **")
        rc = lib.qn_drr_create(self._base, out)
        if rc != lib.QN_OK:
            if rc == lib.QN_ENOMEM:
                raise NativeMemoryError("cannot allocate the DRR table")
            raise NativeError(f"qn_drr_create: unexpected C status {rc}")
        self._d = ffi.gc(out[0], lib.qn_drr_destroy)
        self._gp = ffi.new("uint64_t **")
        self._info = ffi.new("qn_drr_stream_info *")

    @property
    def base_quantum(self) -> int:
        return self._base

    def _fail(self, rc: int, sid: int) -> NoReturn:
        if self._d == _NULL:
            raise DrrReleasedError("DRR table was released")
        if rc == lib.QN_ENOENT:
            raise UnknownStreamError(f"unknown stream {sid}")
        if rc == lib.QN_EEXIST:
            raise DuplicateStreamError(f"stream {sid} is already scheduled")
        if rc == lib.QN_ENOMEM:
            raise NativeMemoryError("cannot grow the DRR table")
        if rc == lib.QN_EOVERFLOW:
            raise NativeMemoryError(f"DRR table is limited to {_e.MAX_STREAMS} streams")
        raise NativeError(f"DRR: unexpected C status {rc}")

    # ---- table maintenance ----

    def add(self, stream_id: int, priority: int = PRIORITY_DEFAULT, *,
            control: bool = False) -> None:
        sid = check_stream_id(stream_id)
        prio = check_priority(priority)
        ctl = check_control(control)
        rc: int = lib.qn_drr_add(self._d, sid, prio, ctl)
        if rc != 0:
            self._fail(rc, sid)

    def remove(self, stream_id: int) -> None:
        sid = check_stream_id(stream_id)
        rc: int = lib.qn_drr_remove(self._d, sid)
        if rc != 0:
            self._fail(rc, sid)

    def set_priority(self, stream_id: int, priority: int) -> None:
        """New quantum from the stream's next visit (a visit in progress keeps its credit)."""
        sid = check_stream_id(stream_id)
        prio = check_priority(priority)
        rc: int = lib.qn_drr_set_priority(self._d, sid, prio)
        if rc != 0:
            self._fail(rc, sid)

    def set_base_quantum(self, base_quantum: int) -> None:
        """New base quantum for every stream; an unfinished visit keeps its credit."""
        base = check_base_quantum(base_quantum)
        if self._d == _NULL:
            raise DrrReleasedError("DRR table was released")
        rc: int = lib.qn_drr_set_base_quantum(self._d, base)
        if rc != 0:
            self._fail(rc, -1)
        self._base = base

    def active_count(self) -> int:
        """Bulk streams with backlog (in the ring)."""
        return 0 if self._d == _NULL else int(lib.qn_drr_active(self._d))

    def set_backlog(self, stream_id: int, nbytes: int) -> None:
        """Bytes the stream has ready to send now (replaces the previous figure)."""
        sid = stream_id if type(stream_id) is int and 0 <= stream_id <= U64_MAX \
            else check_stream_id(stream_id)
        n = nbytes if type(nbytes) is int and 0 <= nbytes <= _e.MAX_BYTES \
            else check_bytes("nbytes", nbytes)
        rc: int = _drr_set_backlog(self._d, sid, n)
        if rc != 0:
            self._fail(rc, sid)

    # ---- queries ----

    def _get(self, stream_id: int) -> Any:
        sid = check_stream_id(stream_id)
        info = self._info
        rc: int = _drr_info(self._d, sid, info)
        if rc != 0:
            self._fail(rc, sid)
        return info

    def backlog(self, stream_id: int) -> int:
        return int(self._get(stream_id).backlog)

    def deficit(self, stream_id: int) -> int:
        """Unused credit of a visit the budget cut short (0 otherwise, and for control)."""
        return int(self._get(stream_id).deficit)

    def quantum(self, stream_id: int) -> int:
        """base_quantum * (priority + 1)."""
        return int(self._get(stream_id).quantum)

    def priority(self, stream_id: int) -> int:
        return int(self._get(stream_id).priority)

    def is_control(self, stream_id: int) -> bool:
        return bool(self._get(stream_id).control)

    def __len__(self) -> int:
        return int(lib.qn_drr_count(self._d))

    def __contains__(self, stream_id: object) -> bool:
        if type(stream_id) is bool or not isinstance(stream_id, int):
            return False
        if not 0 <= stream_id <= U64_MAX:
            return False
        return bool(lib.qn_drr_contains(self._d, stream_id))

    # ---- scheduling ----

    def schedule(self, budget: int) -> list[tuple[int, int]]:
        """Hand out at most ``budget`` bytes: [(stream_id, nbytes), ...].

        At most one grant per stream; control streams first, then bulk streams
        in the order they were first served.  Each grant is deducted from the
        backlog the table knows (set_backlog() replaces it with the truth).
        """
        b = budget if type(budget) is int and 0 <= budget <= _e.MAX_BYTES \
            else check_bytes("budget", budget)
        n: int = _drr_schedule(self._d, b, self._gp)
        if n <= 0:
            if n == 0:
                return []
            self._fail(n, -1)
        # One C-level conversion to ints, one to pairs: Python object creation
        # dominates for large n (1000 grants ~ 50 us here, the C part ~ 5 us).
        it = iter(memoryview(_buffer(self._gp[0], 16 * n)).cast("Q").tolist())
        return list(zip(it, it))  # noqa: B905 - pairs of one even-length list

    # ---- lifetime ----

    def release(self) -> None:
        """Free the table now (idempotent); later calls raise DrrReleasedError."""
        d = self._d
        if d == _NULL:
            return
        self._d = _NULL
        ffi.release(d)

    def __enter__(self) -> DrrTable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DrrTable streams={len(self)} base_quantum={self._base}>"
