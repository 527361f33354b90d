"""The file-transfer journal: what must survive ``kill -9`` (SQLite in the state directory).

Only files are journaled — their bytes live on disk at both ends, so knowing
the transfer (id, path, size, name, priority) and the receiver's durable
offset is enough to resume after either agent restarts. Streams live in
memory and cannot survive a restart of their sender; they are not journaled.

Writes are small and happen at the same cadence as the receiver's fsync'd
acks. The receiver records an offset *before* acknowledging it, so an ack
always names bytes that are on disk and in the journal.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QuelayError

SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    name TEXT NOT NULL,
    path TEXT,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    attrs TEXT NOT NULL,
    offset INTEGER NOT NULL,
    opened INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    sha256 TEXT,
    resumed_from INTEGER,
    updated REAL NOT NULL,
    fetch TEXT,
    ttl INTEGER,
    expires REAL,
    expired INTEGER NOT NULL DEFAULT 0,
    peer TEXT NOT NULL DEFAULT ''
)
"""
#: Columns added after the first release, with their definitions (old journals migrate).
_ADDED_COLUMNS = {"fetch": "TEXT", "ttl": "INTEGER", "expires": "REAL",
                  "expired": "INTEGER NOT NULL DEFAULT 0",
                  "peer": "TEXT NOT NULL DEFAULT ''"}


class JournalError(QuelayError):
    """The journal on disk is unreadable or not ours (a local problem)."""

    code = "journal_error"


@dataclass(frozen=True)
class JournalRow:
    id: str
    direction: str
    name: str
    path: str | None
    size: int
    priority: int
    attrs: dict[str, str]
    offset: int
    opened: bool
    state: str
    sha256: str | None
    resumed_from: int | None
    fetch: tuple[str, str] | None = None  # in: a pull we asked for (export, name)
    peer: str = ""  # the link (a hub's peer name; "" on a single-peer agent)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if not path.exists():
                path.touch(mode=0o600)  # the journal names files and peers: owner only
            # One connection shared by the Trio thread and the worker thread that makes
            # a receiver's offsets durable; the lock serialises every statement.
            self._db = sqlite3.connect(str(path), isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(transfers)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in columns:  # a journal written by an older version
                    self._db.execute(f"ALTER TABLE transfers ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"journal {path} is unusable: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def record(self, *, id: str, direction: str, name: str, path: str | None, size: int,
               priority: int, attrs: dict[str, str], offset: int = 0, state: str = "pending",
               fetch: tuple[str, str] | None = None, peer: str = "") -> None:
        self._execute(
            "INSERT OR REPLACE INTO transfers (id, direction, name, path, size, priority, attrs,"
            " offset, opened, state, updated, fetch, peer)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (id, direction, name, path, size, priority, json.dumps(attrs), offset, state,
             time.time(), None if fetch is None else json.dumps(list(fetch)), peer),
        )

    def update(self, transfer_id: str, **fields: Any) -> None:
        allowed = {"offset", "opened", "state", "sha256", "path", "resumed_from", "ttl",
                   "expires", "expired", "peer"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update journal fields {sorted(set(fields) - allowed)}")
        names = ", ".join(f"{k} = ?" for k in fields)
        self._execute(
            f"UPDATE transfers SET {names}, updated = ? WHERE id = ?",  # noqa: S608 - fixed names
            (*fields.values(), time.time(), transfer_id),
        )

    def delete(self, transfer_ids: list[str]) -> None:
        """Forget finished transfers (history pruning)."""
        for start in range(0, len(transfer_ids), 500):
            chunk = transfer_ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            self._execute(f"DELETE FROM transfers WHERE id IN ({marks})", chunk)  # noqa: S608

    def due_to_expire(self, now: float) -> list[tuple[str, str]]:
        """(id, path) of received files whose time to live ended and that still exist."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, path FROM transfers WHERE direction = 'in' AND state = 'done'"
                " AND expired = 0 AND expires IS NOT NULL AND expires <= ? AND path IS NOT NULL",
                (now,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def get(self, transfer_id: str) -> JournalRow | None:
        rows = self._select("WHERE id = ?", (transfer_id,))
        return rows[0] if rows else None

    def unfinished(self) -> list[JournalRow]:
        return self._select("WHERE state IN ('pending', 'active') ORDER BY updated", ())

    def _select(self, where: str, args: tuple[Any, ...]) -> list[JournalRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, direction, name, path, size, priority, attrs, offset, opened, state,"
                f" sha256, resumed_from, fetch, peer FROM transfers {where}", args).fetchall()
        return [
            JournalRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], bool(r[8]),
                       r[9], r[10], r[11], None if r[12] is None else tuple(json.loads(r[12])),
                       r[13])
            for r in rows
        ]
