"""Typed exceptions of the hot-path module, its limits, and the argument checks.

Both backends (the cffi wrapper and the pure-Python model) validate their
arguments with the functions below *before* doing anything, so a wrong type
raises :class:`TypeError` and a negative or oversized value raises
:class:`ValueError` identically, and nothing invalid ever crosses into C.

State errors are typed:

- :class:`SpoolClosedError` — write after :meth:`Spool.close`.
- :class:`SpoolRangeError` — :meth:`Spool.advance` or :meth:`Spool.ack`
  beyond the tail T (for an ack coming off the network this is the peer's
  fault: turn it into a protocol error).
- :class:`SpoolReleasedError` — use after :meth:`Spool.release`.
- :class:`UnknownStreamError` (a :class:`KeyError`) and
  :class:`DuplicateStreamError` (a :class:`ValueError`) for :class:`DrrTable`;
  :class:`DrrReleasedError` for use after :meth:`DrrTable.release`.
- :class:`NativeMemoryError` (a :class:`MemoryError`) when memory cannot be
  allocated (a spool write takes what fits instead, while anything does).
"""

from __future__ import annotations

from typing import NoReturn, TypeAlias

from ..errors import QuelayError

__all__ = [
    "NativeError", "NativeMemoryError", "SpoolError", "SpoolClosedError", "SpoolRangeError",
    "SpoolReleasedError", "DrrError", "UnknownStreamError", "DuplicateStreamError",
    "DrrReleasedError",
    "PRIORITY_MIN", "PRIORITY_MAX", "PRIORITY_DEFAULT", "DEFAULT_BASE_QUANTUM",
    "MAX_BASE_QUANTUM", "MAX_STREAMS", "SPOOL_MAX_CAPACITY", "SPOOL_MIN_RING", "U64_MAX",
    "MAX_BYTES",
    "BytesLike",
]

#: What Spool.write() accepts (any C-contiguous buffer works; these are the usual ones).
BytesLike: TypeAlias = bytes | bytearray | memoryview

# ---- limits (mirrored by native/quelay_native.h; the C wrapper checks they agree) ----

U64_MAX = (1 << 64) - 1
#: Largest byte count (backlog, budget) the DRR table accepts: 2**63 - 1.
MAX_BYTES = (1 << 63) - 1
#: Largest spool capacity: 1 TiB.
SPOOL_MAX_CAPACITY = 1 << 40
#: Smallest ring a spool allocates; rings are SPOOL_MIN_RING << k, capped at the capacity.
SPOOL_MIN_RING = 4096
PRIORITY_MIN = 0
PRIORITY_MAX = 15
PRIORITY_DEFAULT = 4
DEFAULT_BASE_QUANTUM = 16384
MAX_BASE_QUANTUM = 1 << 30
MAX_STREAMS = 1 << 26


# ---- exceptions ----


class NativeError(QuelayError):
    """Base class of errors raised by quelay.native."""

    code = "native_error"


class NativeMemoryError(NativeError, MemoryError):
    """Memory could not be allocated (the object is unchanged).

    A spool write raises it only when its ring could not grow and nothing fits
    in the ring it has; otherwise the write takes what fits (back-pressure)."""

    code = "out_of_memory"


class SpoolError(NativeError):
    """Base class of spool state errors."""

    code = "spool_error"


class SpoolClosedError(SpoolError):
    """write() after close(): the stream already ended at T."""

    code = "spool_closed"


class SpoolRangeError(SpoolError):
    """An offset or count beyond the tail T (or past the 64-bit offset space)."""

    code = "spool_range"


class SpoolReleasedError(SpoolError):
    """The spool's buffer was released; only its offsets can still be read."""

    code = "spool_released"


class DrrError(NativeError):
    """Base class of DRR table errors."""

    code = "drr_error"


class UnknownStreamError(DrrError, KeyError):
    """No stream with this id in the table."""

    code = "unknown_stream"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown stream"


class DuplicateStreamError(DrrError, ValueError):
    """A stream with this id is already in the table."""

    code = "duplicate_stream"


class DrrReleasedError(DrrError):
    """The table's memory was released."""

    code = "drr_released"


# ---- argument checks (shared by both backends) ----


def _type_error(name: str, expected: str, value: object) -> NoReturn:
    raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")


def check_int(name: str, value: object) -> int:
    """An int (bools rejected) or TypeError."""
    if type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    _type_error(name, "an int", value)


def check_count(name: str, value: object) -> int:
    """A non-negative int; values above 2**64-1 are clamped (they mean "all")."""
    n = value if type(value) is int else check_int(name, value)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n if n <= U64_MAX else U64_MAX


def check_offset(name: str, value: object) -> int:
    """A non-negative int; may exceed 2**64-1 (the caller maps that to a range error)."""
    n = value if type(value) is int else check_int(name, value)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def check_capacity(value: object) -> int:
    n = check_int("capacity", value)
    if not 0 < n <= SPOOL_MAX_CAPACITY:
        raise ValueError(f"capacity must be in 1..{SPOOL_MAX_CAPACITY}, got {n}")
    return n


def check_stream_id(value: object) -> int:
    n = value if type(value) is int else check_int("stream_id", value)
    if not 0 <= n <= U64_MAX:
        raise ValueError(f"stream_id must be in 0..2**64-1, got {n}")
    return n


def check_priority(value: object) -> int:
    n = check_int("priority", value)
    if not PRIORITY_MIN <= n <= PRIORITY_MAX:
        raise ValueError(f"priority must be in {PRIORITY_MIN}..{PRIORITY_MAX}, got {n}")
    return n


def check_bytes(name: str, value: object) -> int:
    """A byte count for the DRR table: 0..2**63-1."""
    n = value if type(value) is int else check_int(name, value)
    if not 0 <= n <= MAX_BYTES:
        raise ValueError(f"{name} must be in 0..2**63-1, got {n}")
    return n


def check_base_quantum(value: object) -> int:
    n = check_int("base_quantum", value)
    if not 0 < n <= MAX_BASE_QUANTUM:
        raise ValueError(f"base_quantum must be in 1..{MAX_BASE_QUANTUM}, got {n}")
    return n


def check_control(value: object) -> bool:
    if not isinstance(value, bool):
        _type_error("control", "a bool", value)
    return value


def as_readable(data: object) -> memoryview:
    """A flat byte view of a C-contiguous buffer (bytes, bytearray, memoryview...)."""
    if isinstance(data, str):
        _type_error("data", "a bytes-like object", data)
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        _type_error("data", "a bytes-like object", data)
    if not view.c_contiguous:
        raise TypeError("data must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def as_writable(buf: object) -> memoryview:
    """A flat writable byte view of a C-contiguous buffer, or TypeError."""
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        _type_error("buf", "a writable bytes-like object", buf)
    if view.readonly:
        raise TypeError("buf must be a writable bytes-like object, got a read-only buffer")
    if not view.c_contiguous:
        raise TypeError("buf must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
