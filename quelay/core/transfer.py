"""Transfer records, their one transition table, and the table that holds them.

A transfer is one file or one open-ended stream, in one direction. Its life is
``pending → active → done``, or ``failed`` / ``canceled`` from any live state;
an outbound transfer the receiver refused as ``busy`` goes back from
``active`` to ``pending`` to be retried. Every state change goes through
:meth:`Transfer.move_to`, which rejects transitions the table does not allow,
so a late ack can't resurrect a failed transfer and a cancel can't undo a
completion.

A :class:`Transfer` is a plain record: no Trio objects, no files. What moves
bytes (spools, hashers, sockets) lives in :mod:`quelay.agent.pipes`.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left, insort
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from ..errors import LocalProtocolError
from .codes import Failure, StallReason

Direction = Literal["out", "in"]
Kind = Literal["file", "stream", "dir"]
_SEQ = itertools.count(1)  # 0 is no cursor (ls)


class State(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({State.DONE, State.FAILED, State.CANCELED})
_ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.ACTIVE, State.FAILED, State.CANCELED}),
    # back to PENDING only when the receiver answered ``busy`` (admission): retried later
    State.ACTIVE: frozenset({State.PENDING, State.DONE, State.FAILED, State.CANCELED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELED: frozenset(),
}


@dataclass(frozen=True)
class PeerNotice:
    """A verdict the peer must hear (sent now, or when the link returns)."""

    code: Failure
    message: str


@dataclass
class Transfer:
    id: str
    direction: Direction
    kind: Kind
    name: str
    size: int | None
    priority: int
    attrs: dict[str, str] = field(default_factory=dict)
    state: State = State.PENDING
    #: Bytes safe at the receiving end, in order: handed to the local reader (a
    #: socket write, or a file write + fsync). Outbound, what the peer acked.
    delivered: int = 0
    sent: int = 0  # out: bytes handed to QUIC in the current session
    sent_high: int = 0  # out: the most bytes ever handed to QUIC: no valid ack exceeds it
    error_code: str | None = None
    error_message: str | None = None
    sha256: str | None = None
    path: str | None = None  # out: source file; in: final inbox path once done
    created: float = field(default_factory=time.time)
    finished_at: float | None = None
    claimed: bool = False  # in streams: a local reader has taken it
    attached: bool = False  # a raw data connection is attached
    opened: bool = False  # out: the peer may have heard of it (a later Open is a resume)
    resumes: int = 0  # how many times this transfer continued after a reconnect
    resumed_from: int | None = None  # the offset of the latest resume
    not_before: float = 0.0  # out, pending: refused as busy; retry after this (monotonic)
    busy_refusals: int = 0
    stall: StallReason | None = None  # in files: why bytes are not being written
    stalled_since: float | None = None  # monotonic time the stall began
    peer_notice: PeerNotice | None = None  # a verdict the peer has not heard yet
    source: tuple[int, int, int] | None = None  # out files: (size, mtime_ns, inode) at submit
    fetch: tuple[str, str] | None = None  # in files we asked for: (export, name)
    ttl: int | None = None  # files: seconds the received file stays in the inbox
    expires: float | None = None  # in files, done: Unix time the inbox copy is deleted
    expired: bool = False  # in files: the inbox copy was deleted at expiry
    group: str | None = None  # a file of a directory transfer: the directory's id
    mode: int | None = None  # a file of a directory transfer: its permission bits
    count: int = 0  # a directory: how many files it holds
    members_done: int = 0  # a directory: how many of them are done
    dirs: list[str] = field(default_factory=list)  # a directory: its empty subdirectories
    seq: int = field(default_factory=lambda: next(_SEQ))  # FIFO order within a priority
    peer: str = ""  # the link it travels on (a hub's peer name; "" on a single-peer agent)
    # Live statistics, sampled at the progress interval (never journaled): delivered
    # bytes per second (smoothed); out: bytes in QUIC packets not yet acknowledged, and
    # bytes sent again (lost, or copied at a tail) over every connection so far.
    rate: float = 0.0
    in_flight: int = 0
    retransmitted: int = 0
    retransmitted_earlier: int = 0  # the part from connections that ended
    #: The table holding it, told of every state change (so it keeps its indexes).
    _table: TransferTable | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def queue_position(self) -> int | None:
        """Out, pending: 1 = starts next (priority order, FIFO within a priority)."""
        if self._table is None or self.direction != "out" or self.state is not State.PENDING:
            return None
        return self._table.position(self)

    def move_to(self, new: State) -> bool:
        """Apply a transition; ``False`` if already terminal (late events are ignored)."""
        if new is self.state:
            return True
        if self.state in TERMINAL:
            return False
        if new not in _ALLOWED[self.state]:
            raise LocalProtocolError(f"transfer {self.id}: {self.state.value} -> {new.value}")
        if new is State.PENDING and self.direction != "out":
            raise LocalProtocolError(f"transfer {self.id}: only outbound transfers re-queue")
        old, self.state = self.state, new
        if new in TERMINAL:
            self.finished_at = time.time()
            self.stall = None
        if self._table is not None:
            self._table.moved(self, old)
        return True

    def fail(self, code: str, message: str, *, canceled: bool = False) -> bool:
        if self.terminal:
            return False
        self.error_code, self.error_message = str(code), message
        return self.move_to(State.CANCELED if canceled else State.FAILED)

    @property
    def journaled(self) -> bool:
        """Whether the journal keeps it: single files (streams live in memory; the files of
        a directory transfer do not survive a restart)."""
        return self.kind == "file" and self.group is None

    def conclude(self, code: Failure, message: str, *, tell_peer: bool = True) -> bool:
        """End it by a decision of this agent (``tell_peer``) or of the peer's.

        ``False`` if nothing changed: already ended, or a local cancel that comes too
        late (see :attr:`cancelable`). A verdict the peer may not have heard is kept in
        ``peer_notice`` until a session delivers it.
        """
        canceled = code is Failure.CANCELED
        if canceled and tell_peer and not self.cancelable:
            return False
        if not self.fail(code, message, canceled=canceled):
            return False
        if tell_peer and self.peer_may_know:
            self.peer_notice = PeerNotice(code, message)
        return True

    @property
    def cancelable(self) -> bool:
        """Whether a local cancel can still end it the same way at both ends.

        Once a sender has announced the end of the bytes (``finish``) the receiver
        may complete at any moment: a cancel then would cross its final ack, and
        the two ends would disagree. So from there the transfer completes or
        fails on its own.
        """
        return not self.terminal and not (self.direction == "out" and self.sha256 is not None)

    @property
    def peer_may_know(self) -> bool:
        """Whether the peer may hold a record of this transfer (so must hear its end)."""
        return self.direction == "in" or self.opened

    def info(self) -> dict[str, Any]:
        """The public view, as documented in docs/control-protocol.md."""
        state = self.state.value
        if self.state is State.ACTIVE and self.stall is not None:
            state = "stalled"
        out: dict[str, Any] = {
            "id": self.id,
            "peer": self.peer,
            "direction": self.direction,
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "priority": self.priority,
            "attrs": dict(self.attrs),
            "state": state,
            "bytes": self.delivered,
            "sent": self.sent if self.direction == "out" else self.delivered,
            "created": self.created,
            "finished": self.finished_at,
            "sha256": self.sha256,
            "path": self.path,
            "error": None,
            "resumes": self.resumes,
            "resumed_from": self.resumed_from,
            "queue_position": self.queue_position,
            "stall": None if self.stall is None else {"reason": self.stall.value},
            "fetch": None if self.fetch is None else {"export": self.fetch[0],
                                                      "name": self.fetch[1]},
            "ttl": self.ttl,
            "group": self.group,
            "files": self.count if self.kind == "dir" else None,
            "files_done": self.members_done if self.kind == "dir" else None,
            "expires": self.expires,
            "expired": self.expired,
            "rate": round(self.rate),
            "in_flight": self.in_flight if self.direction == "out" else None,
            "retransmitted": self.retransmitted if self.direction == "out" else None,
        }
        if self.error_code is not None:
            out["error"] = {"code": self.error_code, "message": self.error_message}
        return out


class _Queue:
    """Pending outbound transfers in start order: higher priority first, FIFO (seq) within.

    Kept sorted as transfers come and go, so the head and a transfer's position cost
    O(priorities + log n), not a sort of the whole queue.
    """

    def __init__(self) -> None:
        self._keys: dict[int, list[tuple[int, str]]] = {}  # priority -> sorted (seq, id)
        self._items: dict[str, Transfer] = {}
        self.dirs = 0  # directories among them

    def __len__(self) -> int:
        return len(self._items)

    def add(self, t: Transfer) -> None:
        insort(self._keys.setdefault(t.priority, []), (t.seq, t.id))
        self._items[t.id] = t
        self.dirs += t.kind == "dir"

    def remove(self, t: Transfer) -> None:
        if self._items.pop(t.id, None) is None:
            return
        self.dirs -= t.kind == "dir"
        keys = self._keys[t.priority]
        del keys[bisect_left(keys, (t.seq, t.id))]
        if not keys:
            del self._keys[t.priority]

    def __iter__(self) -> Iterator[Transfer]:
        for priority in sorted(self._keys, reverse=True):
            for _, tid in self._keys[priority]:
                yield self._items[tid]

    def position(self, t: Transfer) -> int:
        ahead = sum(len(keys) for p, keys in self._keys.items() if p > t.priority)
        return ahead + bisect_left(self._keys[t.priority], (t.seq, t.id)) + 1


class TransferTable:
    """Every transfer this agent knows, by id (no I/O: the book adds that).

    Besides the registry it keeps indexes that follow every state change (a
    transfer tells its table from :meth:`Transfer.move_to`): the live transfers
    by direction, the active outbound ones, the queue of pending outbound ones
    and the files of each directory. So what the scheduler and the protocol ask
    per event costs what is live or active, not what the table ever held.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Transfer] = {}
        self._order: dict[str, int] = {}  # id -> when it was added (the registry's order)
        self._added = itertools.count()
        self._live: dict[Direction, dict[str, Transfer]] = {"out": {}, "in": {}}
        self._live_all: dict[str, Transfer] = {}  # both directions, in the order added
        # Live incoming streams no reader was attached to yet, oldest first: what
        # accept_incoming offers (attached ones are dropped as a scan meets them).
        self._streams_in: OrderedDict[str, Transfer] = OrderedDict()
        self._active_out: dict[str, Transfer] = {}
        self._active_dirs = 0  # directories among them (no bytes of their own)
        # Per link (the peer each had when it became active): all, and those with bytes.
        self._active_peer: dict[str, str] = {}
        self._active_by_peer: Counter[str] = Counter()
        self._active_bytes_by_peer: Counter[str] = Counter()
        self._queue = _Queue()
        self._members: dict[str, dict[str, Transfer]] = {}  # directory id -> its files
        self._member_names: dict[str, Counter[str]] = {}  # directory id -> their names
        self._live_in_by_peer: Counter[str] = Counter()  # admission is per peer (a hub)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Transfer]:
        return iter(list(self._by_id.values()))

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._by_id

    def get(self, transfer_id: str) -> Transfer | None:
        return self._by_id.get(transfer_id)

    def __getitem__(self, transfer_id: str) -> Transfer:
        return self._by_id[transfer_id]

    def values(self) -> list[Transfer]:
        return list(self._by_id.values())

    def add(self, t: Transfer) -> None:
        if t.id in self._by_id:
            raise LocalProtocolError(f"transfer {t.id} exists")
        self._by_id[t.id] = t
        self._order[t.id] = next(self._added)
        t._table = self
        if not t.terminal:
            self._live[t.direction][t.id] = t
            self._live_all[t.id] = t
            if t.direction == "in":
                self._live_in_by_peer[t.peer] += 1
                if t.kind == "stream" and not t.attached:
                    self._streams_in[t.id] = t
        if t.direction == "out":
            if t.state is State.ACTIVE:
                self._set_active(t)
            elif t.state is State.PENDING:
                self._queue.add(t)
        if t.group is not None:
            self._members.setdefault(t.group, {})[t.id] = t
            self._member_names.setdefault(t.group, Counter())[t.name] += 1

    def remove(self, transfer_id: str) -> None:
        t = self._by_id.pop(transfer_id, None)
        if t is None:
            return
        del self._order[transfer_id]
        t._table = None
        self._unset_live(t)
        self._unset_active(t)
        self._queue.remove(t)
        if t.group is not None:
            members = self._members[t.group]
            del members[transfer_id]
            names = self._member_names[t.group]
            names[t.name] -= 1
            if not names[t.name]:
                del names[t.name]
            if not members:
                del self._members[t.group], self._member_names[t.group]

    def moved(self, t: Transfer, old: State) -> None:
        """``t`` went from ``old`` to its state now: follow it in the indexes."""
        if t.terminal:
            self._unset_live(t)
        if t.direction != "out":
            return
        if old is State.ACTIVE:
            self._unset_active(t)
        elif old is State.PENDING:
            self._queue.remove(t)
        if t.state is State.ACTIVE:
            self._set_active(t)
        elif t.state is State.PENDING:
            self._queue.add(t)

    def _unset_live(self, t: Transfer) -> None:
        if self._live[t.direction].pop(t.id, None) is not None:
            del self._live_all[t.id]
            if t.direction == "in":
                self._live_in_by_peer[t.peer] -= 1
                self._streams_in.pop(t.id, None)

    def any_live(self) -> bool:
        """Whether any transfer has not ended yet (without copying them)."""
        return bool(self._live_all)

    def live(self, direction: Direction | None = None) -> list[Transfer]:
        """Transfers not yet ended (in the order they were added; a copy, no sort)."""
        if direction is not None:
            return list(self._live[direction].values())
        return list(self._live_all.values())

    def first_unattached_stream(self, accept: Callable[[Transfer], bool]) -> Transfer | None:
        """The oldest live incoming stream without a reader attached that ``accept``
        takes (``accept_incoming``), or ``None``.

        It looks only at the streams no reader was attached to when it last looked
        (an attachment lasts the stream's life: the ones it meets attached are
        dropped then), so a claim costs what is unclaimed or claimed and not yet
        attached, not every stream that is open.
        """
        stale: list[str] = []
        found = None
        for t in self._streams_in.values():
            if t.attached:
                stale.append(t.id)
            elif accept(t):
                found = t
                break
        for tid in stale:
            del self._streams_in[tid]
        return found

    def pending_fetches(self) -> list[Transfer]:
        return [t for t in self._live["in"].values()
                if t.state is State.PENDING and t.fetch is not None]

    def live_incoming(self, peer: str | None = None) -> int:
        """Live incoming transfers (from ``peer`` only, if given)."""
        if peer is None:
            return len(self._live["in"])
        return self._live_in_by_peer[peer]

    def active_outbound(self) -> list[Transfer]:
        """Active outbound transfers (in the order they were added)."""
        return sorted(self._active_out.values(), key=lambda t: self._order[t.id])

    def active_outbound_count(self, *, bytes_only: bool = False) -> int:
        """How many outbound transfers are active; ``bytes_only``: not counting directories
        (which have no bytes of their own)."""
        if not bytes_only:
            return len(self._active_out)
        return len(self._active_out) - self._active_dirs

    def active_outbound_by_peer(self, *, bytes_only: bool = False) -> dict[str, int]:
        """:meth:`active_outbound_count` per link (peer name): kept as transfers start
        and stop, so ``fill`` under a ``max_concurrent`` costs the links, not the
        active transfers."""
        counts = self._active_bytes_by_peer if bytes_only else self._active_by_peer
        return {peer: n for peer, n in counts.items() if n}

    def _set_active(self, t: Transfer) -> None:
        if t.id not in self._active_out:
            self._active_out[t.id] = t
            self._active_dirs += t.kind == "dir"
            self._active_peer[t.id] = t.peer
            self._active_by_peer[t.peer] += 1
            self._active_bytes_by_peer[t.peer] += t.kind != "dir"

    def _unset_active(self, t: Transfer) -> None:
        if self._active_out.pop(t.id, None) is not None:
            self._active_dirs -= t.kind == "dir"
            peer = self._active_peer.pop(t.id)
            self._active_by_peer[peer] -= 1
            self._active_bytes_by_peer[peer] -= t.kind != "dir"

    def members(self, group_id: str) -> list[Transfer]:
        return list(self._members.get(group_id, {}).values())

    def has_member(self, group_id: str, name: str) -> bool:
        """Whether directory ``group_id`` already holds a file named ``name``."""
        names = self._member_names.get(group_id)
        return names is not None and name in names

    def queue(self) -> list[Transfer]:
        """Outbound transfers waiting to start: priority order, FIFO within a priority."""
        return list(self._queue)

    def waiting(self) -> Iterator[Transfer]:
        """:meth:`queue` lazily (no state may change while it is walked)."""
        return iter(self._queue)

    def queued_dirs(self) -> int:
        """How many of the queued transfers are directories."""
        return self._queue.dirs

    def queue_head(self, count: int) -> list[Transfer]:
        """The first ``count`` of :meth:`queue`, without listing the rest."""
        return list(itertools.islice(self._queue, count))

    def queued(self) -> int:
        """How many outbound transfers wait to start."""
        return len(self._queue)

    def position(self, t: Transfer) -> int:
        """``t``'s place in the queue (1 = starts next); ``t`` must be in it."""
        return self._queue.position(t)

    def newest_first(self, before: int | None = None) -> list[Transfer]:
        """Newest first (by ``seq``: the order this agent learned of them); with
        ``before``, only those learned before the transfer whose ``seq`` it is — a
        cursor that stays valid while transfers are added or pruned."""
        items = (t for t in self._by_id.values() if before is None or t.seq < before)
        return sorted(items, key=lambda t: -t.seq)


class PeerTable:
    """One peer's part of a shared :class:`TransferTable` (a hub's session sees this).

    Lookups answer only for that peer's transfers, so a peer can neither name,
    ack, cancel nor resume another link's transfer — an id it does not own is
    unknown to it — and what it adds is its own. ``in`` still answers for any
    peer's id: a new transfer may not take an id that exists on another link.
    """

    def __init__(self, table: TransferTable, peer: str) -> None:
        self.table = table
        self.peer = peer

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self.table

    def __iter__(self) -> Iterator[Transfer]:
        return (t for t in self.table if t.peer == self.peer)

    def get(self, transfer_id: str) -> Transfer | None:
        t = self.table.get(transfer_id)
        return t if t is not None and t.peer == self.peer else None

    def add(self, t: Transfer) -> None:
        t.peer = self.peer
        self.table.add(t)

    def live(self, direction: Direction | None = None) -> list[Transfer]:
        return [t for t in self.table.live(direction) if t.peer == self.peer]

    def live_incoming(self, peer: str | None = None) -> int:
        return self.table.live_incoming(self.peer)

    def active_outbound(self) -> list[Transfer]:
        return [t for t in self.table.active_outbound() if t.peer == self.peer]

    def pending_fetches(self) -> list[Transfer]:
        return [t for t in self.table.pending_fetches() if t.peer == self.peer]

    def members(self, group_id: str) -> list[Transfer]:
        return self.table.members(group_id) if self.get(group_id) is not None else []

    def has_member(self, group_id: str, name: str) -> bool:
        return self.get(group_id) is not None and self.table.has_member(group_id, name)
