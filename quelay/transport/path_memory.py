"""What we learned about a path, kept across connections and restarts (sans-IO + a file).

In the spirit of RFC 9959 (Careful Resume): a new connection to a peer we
talked to recently starts from that path's smoothed RTT and its variation
instead of aioquic's 100 ms guess, so on a 750 ms link the handshake's probe
timeout is about one RTT (no spurious Initials every 0.2–0.4 s, and a lost
one is resent after about one RTT). Only the RTT is reused: the congestion
window is not (``allotted`` derives it from the operator's cap and the first
RTT sample, and Reno/Cubic must probe again).

The file (``paths.json`` in the state directory) is ours but read as
untrusted: entries that are malformed, out of range or older than
``max_age`` are ignored, and a damaged file is treated as empty.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .quic_ext import MAX_SEED_RTT, PathStats

log = logging.getLogger("quelay.transport")

FILE_NAME = "paths.json"
DEFAULT_MAX_AGE = 7 * 24 * 3600.0
MAX_ENTRIES = 256


@dataclass(frozen=True)
class RememberedPath:
    rtt: float  # smoothed RTT, seconds
    rtt_var: float
    min_rtt: float
    saved_at: float  # wall-clock seconds (time.time())


def _valid_untrusted(raw: Any) -> RememberedPath | None:
    if not isinstance(raw, dict):
        return None
    try:
        entry = RememberedPath(float(raw["rtt"]), float(raw["rtt_var"]), float(raw["min_rtt"]),
                               float(raw["saved_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    values = (entry.rtt, entry.rtt_var, entry.min_rtt, entry.saved_at)
    if not all(math.isfinite(v) for v in values):
        return None
    if not (0 < entry.rtt <= MAX_SEED_RTT and entry.rtt_var >= 0 and entry.min_rtt > 0):
        return None
    return entry


class PathMemory:
    """Per-peer remembered paths, in memory and (with a ``state_dir``) on disk.

    Keys are strings chosen by the caller (the endpoint uses the peer's host).
    ``clock`` is wall-clock time, injectable for tests.
    """

    def __init__(self, state_dir: Path | None = None, *, max_age: float = DEFAULT_MAX_AGE,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir is not None else None
        self.max_age = max_age
        self.clock = clock
        self._entries: dict[str, RememberedPath] = {}
        self._loaded = False

    def _load_file(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None:
            return
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # missing or damaged: start without memory
        if not isinstance(raw, dict):
            return
        for key, value in raw.items():
            entry = _valid_untrusted(value)
            if isinstance(key, str) and entry is not None:
                self._entries[key] = entry

    def load(self, key: str) -> RememberedPath | None:
        """The remembered path for ``key``, if recent enough to trust."""
        self._load_file()
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self.clock() - entry.saved_at
        if not (-60 <= age <= self.max_age):
            return None
        return entry

    def remember(self, key: str, stats: PathStats) -> RememberedPath | None:
        """Keep what ``stats`` (from ``path_stats()``) says about the path; saved at once."""
        if stats.rtt is None or stats.min_rtt is None or not 0 < stats.rtt <= MAX_SEED_RTT:
            return None
        entry = RememberedPath(rtt=stats.rtt, rtt_var=stats.rtt_var or 0.0,
                               min_rtt=stats.min_rtt, saved_at=self.clock())
        self._load_file()
        self._entries[key] = entry
        if len(self._entries) > MAX_ENTRIES:
            oldest = min(self._entries, key=lambda k: self._entries[k].saved_at)
            del self._entries[oldest]
        self._save()
        return entry

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {key: asdict(entry) for key, entry in self._entries.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            # Memory is an optimisation: a read-only or full state dir costs the next
            # handshake a few spurious Initials, nothing else.
            log.warning("cannot save path memory to %s: %s", self.path, exc)
