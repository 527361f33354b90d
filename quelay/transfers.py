"""Transfer records and their one transition table.

A transfer is one file or one open-ended stream, in one direction. Its life is
``pending → active → done``, or ``failed`` / ``canceled`` from any live state.
Every state change goes through :meth:`Transfer.move_to`, which rejects
transitions the table does not allow, so a late ack can't resurrect a failed
transfer and a cancel can't undo a completion.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import trio

from .errors import LocalProtocolError

Direction = Literal["out", "in"]
_SEQ = itertools.count()


class State(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({State.DONE, State.FAILED, State.CANCELED})
_ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.ACTIVE, State.FAILED, State.CANCELED}),
    State.ACTIVE: frozenset({State.DONE, State.FAILED, State.CANCELED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELED: frozenset(),
}


@dataclass
class Transfer:
    id: str
    direction: Direction
    kind: Literal["file", "stream"]
    name: str
    size: int | None
    priority: int
    attrs: dict[str, str] = field(default_factory=dict)
    state: State = State.PENDING
    offset: int = 0  # out: bytes acked by the peer; in: bytes handed to the local reader
    sent: int = 0  # out: bytes handed to QUIC
    accepted: int = 0  # out stream: bytes taken from the local writer
    error_code: str | None = None
    error_message: str | None = None
    sha256: str | None = None
    path: str | None = None  # out: source file; in: final inbox path once done
    created: float = field(default_factory=time.time)
    finished_at: float | None = None
    hasher: Any = field(default_factory=hashlib.sha256, repr=False)
    finished: trio.Event = field(default_factory=trio.Event, repr=False)
    claimed: bool = False  # in streams: a local reader has taken it
    attached: bool = False  # a raw data connection is attached
    # Runtime plumbing (not part of the public view).
    spool: Any = field(default=None, repr=False)  # out streams: quelay.native.Spool
    space: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot, repr=False)
    reader: Any = field(default=None, repr=False)  # in streams: the attached trio stream
    reader_ready: trio.Event = field(default_factory=trio.Event, repr=False)
    finish: Any = field(default=None, repr=False)  # in: the peer's wire.Finish
    finish_seen: trio.Event = field(default_factory=trio.Event, repr=False)
    data_stream: int | None = None  # QUIC stream id carrying the bytes, this session
    sched_key: int | None = None  # out: this transfer's entry in the feed scheduler
    opened: bool = False  # out: the peer has heard of it (a later Open is a resume)
    # One pump / one sink at a time: a new session's task waits for the old one to exit.
    busy: trio.Lock = field(default_factory=trio.Lock, repr=False)
    resumes: int = 0  # how many times this transfer continued after a reconnect
    resumed_from: int | None = None  # the offset of the latest resume
    queue_position: int | None = None  # out, pending: 1 = starts next
    seq: int = field(default_factory=lambda: next(_SEQ))  # FIFO order within a priority

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def move_to(self, new: State) -> bool:
        """Apply a transition; ``False`` if already terminal (late events are ignored)."""
        if new is self.state:
            return True
        if self.state in TERMINAL:
            return False
        if new not in _ALLOWED[self.state]:
            raise LocalProtocolError(f"transfer {self.id}: {self.state.value} -> {new.value}")
        self.state = new
        if new in TERMINAL:
            self.finished_at = time.time()
            self.finished.set()
        return True

    def fail(self, code: str, message: str, *, canceled: bool = False) -> bool:
        if self.terminal:
            return False
        self.error_code, self.error_message = code, message
        return self.move_to(State.CANCELED if canceled else State.FAILED)

    def info(self) -> dict[str, Any]:
        """The public view, as documented in docs/control-protocol.md."""
        out: dict[str, Any] = {
            "id": self.id,
            "direction": self.direction,
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "priority": self.priority,
            "attrs": dict(self.attrs),
            "state": self.state.value,
            "bytes": self.offset,
            "sent": self.sent,
            "created": self.created,
            "finished": self.finished_at,
            "sha256": self.sha256,
            "path": self.path,
            "error": None,
            "resumes": self.resumes,
            "resumed_from": self.resumed_from,
            "queue_position": self.queue_position,
        }
        if self.error_code is not None:
            out["error"] = {"code": self.error_code, "message": self.error_message}
        return out


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
