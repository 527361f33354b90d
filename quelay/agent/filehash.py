"""One SHA-256 file hasher: the sender's digest, recovery after a restart, tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def hash_file(path: str | Path, hasher: Any = None, limit: int | None = None) -> Any:
    """Feed a file (or its first ``limit`` bytes) to a SHA-256 hasher and return the hasher."""
    h = hasher if hasher is not None else hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h
