"""The transfer book: every transfer this agent knows, and what happens to it.

The book owns the registry (:class:`~quelay.core.transfer.TransferTable`),
the pending queue, the journal, recovery after a restart, the done / failed /
canceled transitions with their events, and the finished history and its
pruning. The session (which talks to the peer) and the control server (which
talks to local clients) both work through it; neither knows the agent.

What moves a transfer's bytes at run time — its pipe, its hasher, the lock
that keeps one pump or sink at a time, the event waiters block on — is its
:class:`Runtime`, kept here beside the plain record.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from ..core.codes import Failure, failure_from_peer
from ..core.transfer import State, Transfer, TransferTable
from .events import EventHub
from .filehash import hash_file
from .inbox import Inbox
from .journal import Journal
from .metrics import Stats
from .pipes import InboundPipe, OutboundPipe

log = logging.getLogger("quelay.book")

#: Failures after which an incoming file's partial bytes are kept (the operator may
#: want them: the disk filled up, the data itself was fine).
_KEEP_PARTIAL = frozenset({Failure.NO_SPACE.value, Failure.INBOX_UNAVAILABLE.value})


class LinkPort(Protocol):
    """What the book needs from the session that is up (if any)."""

    @property
    def ready(self) -> bool:
        """Whether new transfers may start on it: not while its connection is held
        through an outage (the queue keeps its order for the link's return)."""

    def transfer_started(self, t: Transfer) -> None:
        """Announce an outbound transfer to the peer and start its bytes."""

    def transfer_ended(self, t: Transfer) -> None:
        """Stop sending ``t`` and tell the peer what it must hear."""

    def fetch_requested(self, t: Transfer) -> None:
        """Ask the peer to send ``t`` (a pull)."""

    async def list_remote(self) -> list[dict[str, object]]:
        """Every file the peer exports."""


class FeedPort(Protocol):
    def add(self, priority: int) -> int: ...
    def remove(self, key: int) -> None: ...


@dataclass
class Runtime:
    """A transfer's run-time plumbing (never part of the public record)."""

    finished: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)  # one pump / one sink at a time
    hasher: Any = field(default_factory=hashlib.sha256)  # in: SHA-256 of delivered bytes
    out: OutboundPipe | None = None  # out streams
    inp: InboundPipe | None = None  # in streams
    feed_key: int | None = None  # out, active: its entry in the feed scheduler
    feed: FeedPort | None = None  # ... and that scheduler (its link's)
    claim: object | None = None  # in streams: the control connection that claimed it
    journaled: int = 0  # out files: the acked offset last written to the journal


@dataclass(frozen=True)
class HistoryPolicy:
    max_count: int = 1000  # finished transfers kept (memory and journal)
    max_age: float = 7 * 24 * 3600.0  # seconds a finished transfer is kept


class TransferBook:
    def __init__(self, *, journal: Journal, events: EventHub, inbox: Inbox,
                 feed: FeedPort | None,
                 feeds: dict[str, FeedPort] | None = None,
                 label: str = "", max_concurrent: int = 0,
                 history: HistoryPolicy | None = None, inbox_ttl: float = 0.0,
                 clock: Callable[[], float] = trio.current_time,
                 wall: Callable[[], float] = time.time) -> None:
        self.table = TransferTable()
        self.journal = journal
        self.events = events
        self.inbox = inbox
        self.feed = feed  # the scheduler of a link without its own (a single-peer agent)
        self.feeds = feeds if feeds is not None else {}  # a hub: one per link, by peer name
        self.label = label
        self.max_concurrent = max_concurrent
        self.history = history or HistoryPolicy()
        self.links: dict[str, LinkPort] = {}  # the sessions that are up, by peer name
        self.added = trio.lowlevel.ParkingLot()  # a transfer was added or unclaimed
        self.activity = trio.lowlevel.ParkingLot()  # any transfer event (see publish)
        self._clock = clock
        self._wall = wall  # Unix time, for expiry (a test passes its own)
        self.inbox_ttl = inbox_ttl  # seconds a received file stays (0: until removed)
        self._runtime: dict[str, Runtime] = {}
        self._queue_snapshot: tuple[int, tuple[str, ...]] = (0, ())
        self.stats = Stats()  # event counters for the metrics endpoint

    # -- lookups -------------------------------------------------------------------

    def get(self, transfer_id: str) -> Transfer | None:
        return self.table.get(transfer_id)

    def runtime(self, t: Transfer) -> Runtime:
        rt = self._runtime.get(t.id)
        if rt is None:
            rt = self._runtime[t.id] = Runtime()
            if t.terminal:
                rt.finished.set()
        return rt

    async def wait_finished(self, t: Transfer) -> None:
        await self.runtime(t).finished.wait()

    # -- outbound ---------------------------------------------------------------------

    def submit(self, t: Transfer, pipe: OutboundPipe | None = None) -> None:
        """Accept a new outbound transfer; it starts now or when the link is up."""
        if t.journaled:
            self.journal.record(id=t.id, direction="out", name=t.name, path=t.path,
                                size=t.size or 0, priority=t.priority, attrs=t.attrs,
                                peer=t.peer)
        self.table.add(t)
        self.runtime(t).out = pipe
        self.added.unpark_all()
        self.fill()
        if t.state is State.PENDING:
            self.publish("transfer.queued", t)

    def fill(self) -> None:
        """Start queued transfers while the link is up and ``max_concurrent`` allows.

        Called on every submit and ending, so it costs what starts (plus the queue's
        head), not the whole queue: with the slots taken and no directory waiting (a
        directory takes no slot) the walk stops at once; positions are the queue's
        own (``Transfer.queue_position``)."""
        table = self.table
        links = {peer: link for peer, link in self.links.items() if link.ready}
        if links and table.queued():
            now = self._clock()
            limit = self.max_concurrent  # per link
            # A directory has no bytes of its own: it never takes a max_concurrent slot.
            active = table.active_outbound_by_peer(bytes_only=True) if limit else {}
            full = {p for p in links if limit and active.get(p, 0) >= limit}
            dirs = table.queued_dirs()  # directories not visited yet
            start: list[Transfer] = []
            starting: set[str] = set()  # directories starting now: their files may follow
            for t in table.waiting():  # (states change only after the walk)
                if len(full) == len(links) and not dirs:
                    break  # nothing more can start
                if t.kind == "dir":
                    dirs -= 1
                    if t.peer in links and t.not_before <= now:
                        start.append(t)  # announced first: its files name it
                        starting.add(t.id)
                elif t.peer not in links or t.peer in full:
                    continue  # its link is down, or has its max_concurrent
                elif t.not_before > now or self._group_waits(t, starting):
                    continue  # refused as busy (or its directory was): retried later
                else:
                    start.append(t)
                    if limit:
                        active[t.peer] = active.get(t.peer, 0) + 1
                        if active[t.peer] >= limit:
                            full.add(t.peer)
            for t in start:
                self._start(t)
        head = table.queue_head(100)
        snapshot = (table.queued(), tuple(t.id for t in head))
        if snapshot != self._queue_snapshot:
            self._queue_snapshot = snapshot
            self.events.publish("queue.status", {"pending": [
                {"id": t.id, "name": t.name, "priority": t.priority, "position": position}
                for position, t in enumerate(head, 1)], "count": snapshot[0]})

    def _group_waits(self, t: Transfer, starting: set[str]) -> bool:
        """A file of a directory that is still queued (and not starting now) waits for it."""
        if t.group is None or t.group in starting:
            return False
        group = self.table.get(t.group)
        return group is not None and group.state is State.PENDING

    def _start(self, t: Transfer) -> None:
        link = self.links[t.peer]
        t.move_to(State.ACTIVE)
        rt = self.runtime(t)
        if rt.feed_key is None and t.kind != "dir":
            feed = self.feeds.get(t.peer, self.feed)
            assert feed is not None, f"no scheduler for link {t.peer!r}"
            rt.feed = feed
            rt.feed_key = feed.add(t.priority)
        log.info("transfer %s started: %s %s %r, priority %d", t.id, t.kind, t.direction, t.name,
                 t.priority, extra={"event": "transfer.started", "agent": self.label,
                                    "transfer": t.id, "kind": t.kind, "direction": t.direction,
                                    "transfer_name": t.name, "priority": t.priority})
        self.publish("transfer.started", t)
        link.transfer_started(t)

    def requeue(self, t: Transfer, delay: float) -> None:
        """The receiver refused ``t`` as busy (already moved back to pending): retry later."""
        t.not_before = self._clock() + delay
        rt = self.runtime(t)
        if rt.feed_key is not None and rt.feed is not None:
            rt.feed.remove(rt.feed_key)
            rt.feed_key = None
        log.info("transfer %s: the receiver is busy; retrying in %.0f s", t.id, delay)
        self.publish("transfer.queued", t)
        self.fill()

    # -- incoming -------------------------------------------------------------------------

    def add_incoming(self, t: Transfer) -> None:
        """The peer opened ``t`` (the protocol already added the record)."""
        if t.kind == "dir":
            self.inbox.create_staging(t.id, t.dirs)
        elif t.journaled:
            assert t.size is not None
            self.journal.record(id=t.id, direction="in", name=t.name, path=None, size=t.size,
                                priority=t.priority, attrs=t.attrs, state="active",
                                peer=t.peer)
        else:
            self.runtime(t).inp = InboundPipe()
        self.added.unpark_all()
        self.publish("transfer.incoming", t)

    def request_fetch(self, t: Transfer) -> None:
        """A pull: ``t`` (incoming, pending, ``fetch`` set) is asked for now or at link-up."""
        self.journal.record(id=t.id, direction="in", name=t.name, path=None, size=0,
                            priority=t.priority, attrs=t.attrs, state="pending", fetch=t.fetch,
                            peer=t.peer)
        self.table.add(t)
        self.runtime(t)
        self.added.unpark_all()
        self.publish("transfer.queued", t)
        link = self.links.get(t.peer)
        if link is not None:
            link.fetch_requested(t)

    def unclaim(self, owner: object) -> None:
        """A control connection that claimed incoming streams went away before attaching."""
        for t in self.table.live("in"):
            rt = self._runtime.get(t.id)
            if rt is not None and rt.claim is owner and not t.attached:
                rt.claim = None
                t.claimed = False
                self.added.unpark_all()

    # -- endings ----------------------------------------------------------------------------

    def completed(self, t: Transfer) -> None:
        """``t`` moved to done: release, record, publish."""
        group = self.table.get(t.group) if t.group is not None else None
        if group is not None and t.direction == "out":
            group.members_done += 1  # (the receiving side counts in the protocol)
        ttl = t.ttl or self.inbox_ttl
        if t.direction == "in" and ttl and (t.kind == "dir" or (t.kind == "file"
                                                                and t.group is None)):
            t.expires = self._wall() + ttl  # journaled with the ending: a restart keeps it
            if t.kind == "dir":  # (directories are journaled only for their expiry)
                self.journal.record(id=t.id, direction="in", name=t.name, path=t.path,
                                    size=t.size or 0, priority=t.priority, attrs=t.attrs,
                                    state="done", peer=t.peer)
        self._release(t)
        self._journal_end(t)
        self.stats.transfer_ended(t.direction, t.state.value, None)
        log.info("transfer %s done: %s, %d bytes, sha256 %s", t.id, t.name, t.delivered,
                 t.sha256, extra={"event": "transfer.done", "agent": self.label,
                                  "transfer": t.id, "direction": t.direction,
                                  "transfer_name": t.name, "bytes": t.delivered,
                                  "sha256": t.sha256})
        self.publish("transfer.done", t)
        self.runtime(t).finished.set()
        self.fill()

    def ended(self, t: Transfer) -> None:
        """``t`` moved to failed or canceled: release, record, publish."""
        log.warning("transfer %s %s: %s: %s", t.id, t.state.value, t.error_code,
                    t.error_message,
                    extra={"event": f"transfer.{t.state.value}", "agent": self.label,
                           "transfer": t.id, "direction": t.direction, "state": t.state.value,
                           "code": t.error_code, "reason": t.error_message})
        rt = self.runtime(t)
        self._release(t)
        self._journal_end(t)
        self.stats.transfer_ended(t.direction, t.state.value, t.error_code)
        if rt.inp is not None:
            rt.inp.abort()
        if t.direction == "in" and t.kind == "file" and t.error_code not in _KEEP_PARTIAL:
            self.inbox.discard(self.inbox.partial_path(t.id))  # the bytes are garbage now
        if t.direction == "in" and t.kind == "dir":
            self.inbox.discard_staging(t.id)
        self.publish("transfer.canceled" if t.state is State.CANCELED else "transfer.failed", t)
        rt.finished.set()
        self._cascade(t)
        self.fill()

    def _cascade(self, t: Transfer) -> None:
        """A directory transfer ends as a whole: a failed file fails it, and its files."""
        code = failure_from_peer(t.error_code or "")
        if t.group is not None:
            group = self.table.get(t.group)
            if group is not None and not group.terminal:
                self.fail(group, code, f"{t.name}: {t.error_message}")
        if t.kind == "dir":
            for member in self.table.members(t.id):
                if not member.terminal:
                    self.fail(member, code, f"its directory ended: {t.error_message}")

    def fail(self, t: Transfer, code: Failure, message: str, *, tell_peer: bool = True) -> bool:
        """End ``t`` by a local decision; the peer hears it now or when the link returns.

        ``False`` if nothing changed (see :meth:`Transfer.conclude`)."""
        if not t.conclude(code, message, tell_peer=tell_peer):
            return False
        self.ended(t)
        link = self.links.get(t.peer)
        if link is not None:
            link.transfer_ended(t)
        return True

    def cancel(self, t: Transfer, reason: str = "canceled by local client") -> bool:
        """Cancel at both ends; ``False`` if it is too late (see ``Transfer.cancelable``)."""
        return self.fail(t, Failure.CANCELED, reason)

    def _release(self, t: Transfer) -> None:
        """Give back what a finished transfer held: scheduler entry, spool memory."""
        rt = self.runtime(t)
        if rt.feed_key is not None and rt.feed is not None:
            rt.feed.remove(rt.feed_key)
            rt.feed_key = None
        if rt.out is not None:
            rt.out.abort()
        rt.hasher = None

    def _journal_end(self, t: Transfer) -> None:
        if t.journaled or (t.kind == "dir" and t.expires):
            self.journal.update(t.id, state=t.state.value, offset=t.delivered, sha256=t.sha256,
                                path=t.path, expires=t.expires)

    def sweep_expired(self) -> int:
        """Delete received files whose time to live ended (from the journal: restarts too).

        Only a completed file that is still inside the inbox is deleted — never a
        partial one, never anything the operator moved elsewhere.
        """
        removed = 0
        for tid, path in self.journal.due_to_expire(self._wall()):
            try:
                if self.inbox.remove_published(path):
                    removed += 1
                    log.info("transfer %s expired: deleted %s", tid, path)
            except OSError as exc:
                log.warning("transfer %s: cannot delete expired %s: %s", tid, path, exc)
                continue
            self.journal.update(tid, expired=1)
            t = self.table.get(tid)
            if t is not None:
                t.expired = True
                self.publish("transfer.expired", t)
            else:
                self.events.publish("transfer.expired", {"id": tid, "path": path})
        return removed

    # -- stalls (incoming files) ----------------------------------------------------------

    def stalled(self, t: Transfer) -> None:
        self.publish("transfer.stalled", t)

    # -- recovery and history -----------------------------------------------------------------

    def recover(self) -> None:
        """Reload unfinished file transfers from the journal (after a restart or crash)."""
        for row in self.journal.unfinished():
            t = Transfer(row.id, row.direction, "file", row.name, row.size,  # type: ignore[arg-type]
                         row.priority, row.attrs)
            t.resumed_from = row.resumed_from
            t.peer = row.peer
            if row.direction == "in" and row.state == "pending" and row.fetch is not None:
                t.fetch = row.fetch  # a pull the peer never answered: ask again at link-up
                t.size = None
                self.table.add(t)
                continue
            if row.direction == "out":
                t.path, t.delivered, t.opened = row.path, row.offset, row.opened
                t.sent = row.offset
                # What the previous life sent is unknown: any ack up to the size is valid.
                t.sent_high = row.size
                t.source = source_stat(row.path)
                if t.source is None:
                    t.fail(Failure.IO_ERROR, f"source {row.path} is gone after a restart")
                    self._journal_end(t)
                    continue
            else:
                partial = self.inbox.partial_path(row.id)
                have = partial.stat().st_size if partial.exists() else 0
                t.delivered = min(have, row.offset)
                with open(partial, "ab") as f:
                    f.truncate(t.delivered)
                t.move_to(State.ACTIVE)
                hash_file(partial, self.runtime(t).hasher, t.delivered)
            self.table.add(t)
            log.info("%s: recovered %s file transfer %s (%s) at byte %d of %d", self.label,
                     "outbound" if t.direction == "out" else "inbound", t.id, t.name,
                     t.delivered, row.size)

    def clean_stale_staging(self) -> None:
        """Directory transfers do not survive a restart: drop their half-built trees."""
        for staging in self.inbox.stale_staging():
            log.warning("%s: removing the unfinished directory transfer %s (restart)",
                        self.label, staging.name)
            try:
                shutil.rmtree(staging)
            except OSError as exc:
                log.warning("%s: cannot remove %s: %s", self.label, staging, exc)

    def prune(self, now: float | None = None) -> int:
        """Forget finished transfers beyond the history bound (count and age)."""
        now = time.time() if now is None else now
        finished = [t for t in self.table.newest_first() if t.terminal]
        drop = [t for i, t in enumerate(finished)
                if i >= self.history.max_count
                or (t.finished_at or t.created) < now - self.history.max_age]
        for t in drop:
            rt = self._runtime.get(t.id)
            if rt is not None and rt.finished.is_set():
                del self._runtime[t.id]
            self.table.remove(t.id)
        if drop:
            # A received file still waiting for its expiry keeps its journal row.
            self.journal.delete([t.id for t in drop if (t.journaled or t.kind == "dir")
                                 and (t.expires is None or t.expired)])
        return len(drop)

    def publish(self, name: str, t: Transfer) -> None:
        self.events.publish(name, t.info())
        self.activity.unpark_all()  # (the agent's housekeeping parks while nothing is live)


def source_stat(path: str | None) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of a regular file, or None if it is not one."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)

