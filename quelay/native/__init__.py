"""quelay's hot path: the spool ring buffer and the DRR scheduler's accounting.

::

    from quelay.native import Spool, DrrTable, SpoolError, BACKEND

Two backends with one API:

- ``"c"`` (default): a small C module compiled with cffi when the package is
  installed (``native/*.c``, ``build_native.py``).  If it is missing, importing
  this package raises ImportError telling how to build it -- there is no
  silent fallback.
- ``"python"``: the pure-Python reference model (:mod:`quelay.native._model`),
  chosen only explicitly with the environment variable ``QUELAY_PURE_PYTHON=1``.

``BACKEND`` says which one is in use.  Tests that compare the two import
:mod:`quelay.native._cffi_backend` and :mod:`quelay.native._model` directly.

Spool (one per outbound stream)
    Absolute 64-bit offsets A (acked) <= Q (queued) <= T (tail),
    T - A <= capacity.  ``write`` copies what fits at T (back-pressure: 0 when
    full); ``peek``/``advance``, ``read`` or ``readinto`` hand bytes from Q to
    the transport; ``ack`` moves A (stale acks are ignored, acks beyond T raise
    SpoolRangeError); ``rewind`` sets Q = A after a link loss; ``close`` marks
    EOF at T.  ``eof``: closed and Q == T; ``done``: closed and A == T.
    Memory follows the bytes held, not the capacity: ``allocated`` starts at
    0, the ring grows on demand (4 KiB, doubling, up to the capacity) and
    shrinks as acks drain it (freed when A == T).  If it cannot grow, a
    write takes what fits.  ``release()`` (or ``with``) frees the buffer;
    otherwise ffi.gc does.

DrrTable
    Control streams first (strict priority), then bulk streams by deficit
    round robin with quantum = base_quantum * (priority + 1), so a bulk
    stream's share is proportional to priority + 1.  ``schedule(budget)``
    returns ``[(stream_id, nbytes), ...]`` summing to at most ``budget``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import (
    DEFAULT_BASE_QUANTUM,
    MAX_BYTES,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SPOOL_MAX_CAPACITY,
    SPOOL_MIN_RING,
    DrrError,
    DrrReleasedError,
    DuplicateStreamError,
    NativeError,
    NativeMemoryError,
    SpoolClosedError,
    SpoolError,
    SpoolRangeError,
    SpoolReleasedError,
    UnknownStreamError,
)

__all__ = [
    "BACKEND", "Spool", "DrrTable",
    "NativeError", "NativeMemoryError", "SpoolError", "SpoolClosedError", "SpoolRangeError",
    "SpoolReleasedError", "DrrError", "UnknownStreamError", "DuplicateStreamError",
    "DrrReleasedError",
    "PRIORITY_MIN", "PRIORITY_MAX", "PRIORITY_DEFAULT", "DEFAULT_BASE_QUANTUM",
    "SPOOL_MAX_CAPACITY", "SPOOL_MIN_RING", "MAX_BYTES", "pure_python_requested",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def pure_python_requested(environ: dict[str, str] | None = None) -> bool:
    """True if QUELAY_PURE_PYTHON asks for the pure-Python model."""
    value = (os.environ if environ is None else environ).get("QUELAY_PURE_PYTHON", "")
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImportError(
        f"QUELAY_PURE_PYTHON={value!r} is not understood: set it to 1 for the "
        "pure-Python model, or unset it (or 0) for the C module"
    )


BACKEND: str

if TYPE_CHECKING:
    from ._model import DrrTable, Spool
else:
    if pure_python_requested():
        from ._model import DrrTable, Spool

        BACKEND = "python"
    else:
        # ImportError (with build instructions) if the C module is not built.
        from ._cffi_backend import DrrTable, Spool

        BACKEND = "c"
