"""The agent-to-agent protocol of one session, sans-IO.

:class:`PeerProtocol` sits on a QUIC connection the way aioquic's
``H3Connection`` does: it takes decoded peer messages, data-stream events
and local decisions, updates the transfer records in its
:class:`~quelay.core.transfer.TransferTable`, and returns **actions** for
its driver (:mod:`quelay.agent.session`) to perform in order: send this
message, start or stop sending a transfer's bytes, persist this offset,
publish this completion. It never touches trio, sockets or files, so two
instances can be wired together in memory and driven through any message
order (``tests/test_peer_protocol.py``).

Rules that keep a fault where it starts:

* anything wrong with one transfer (a bad open, a forged ack, a gap, a
  digest mismatch) fails **that** transfer at both ends with a stable code;
  only a malformed message that names no transfer ends the session;
* a transfer ends exactly once, and a verdict is told to the peer exactly
  when the peer may know the transfer (``Transfer.peer_notice``), now or at
  the next session;
* a data stream's reset carries no verdict: only the control stream (which
  is reliable and ordered) says ``cancel`` or ``error``. A reset data stream
  just ends that session's copy of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RemoteProtocolError
from . import messages as m
from .codes import Failure, failure_from_peer
from .names import UnsafeNameError, safe_name_untrusted, safe_relative_path_untrusted
from .transfer import PeerTable, State, Transfer, TransferTable

# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send ``message`` on the control stream (ahead of any bulk data)."""

    message: m.Message


@dataclass(frozen=True)
class StartSending:
    """Open a data stream for an outbound transfer, starting at byte ``offset``."""

    transfer: Transfer
    offset: int


@dataclass(frozen=True)
class StopSending:
    """Abandon this session's data stream of an outbound transfer (if any)."""

    transfer: Transfer


@dataclass(frozen=True)
class Created:
    """A new incoming transfer: record it (journal), publish it."""

    transfer: Transfer


@dataclass(frozen=True)
class Persist:
    """Make these progress fields of a file transfer durable (journal) before going on."""

    transfer: Transfer
    fields: tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class Acked:
    """The peer confirmed ``transfer.delivered`` bytes: free what holds them."""

    transfer: Transfer


@dataclass(frozen=True)
class Finalize:
    """An incoming file verified: give it its final name, then call ``finalized``."""

    transfer: Transfer


@dataclass(frozen=True)
class Completed:
    """The transfer is done (already moved to ``done``): release it, publish."""

    transfer: Transfer


@dataclass(frozen=True)
class Ended:
    """The transfer failed or was canceled (already moved): release it, publish."""

    transfer: Transfer


@dataclass(frozen=True)
class Requeue:
    """The receiver refused an outbound transfer as busy: retry after ``delay`` seconds."""

    transfer: Transfer
    delay: float


@dataclass(frozen=True)
class ServeFetch:
    """The peer asks for a file of ours: resolve it in the exports, then send or refuse."""

    request: m.Fetch


@dataclass(frozen=True)
class ServeListing:
    """The peer asks for a page of our exported files."""

    request: m.ListExports


@dataclass(frozen=True)
class ListingArrived:
    """The answer to our own ``list_exports``."""

    reply: m.Exports


Action = Send | StartSending | StopSending | Created | Persist | Acked | Finalize | Completed \
    | Ended | Requeue | ServeFetch | ServeListing | ListingArrived


class SessionError(RemoteProtocolError):
    """The peer broke the protocol in a way that names no transfer: the session ends."""


@dataclass(frozen=True)
class Accept:
    """A data stream may be read: discard the first ``skip`` bytes (a replayed overlap)."""

    transfer: Transfer
    skip: int


@dataclass(frozen=True)
class WaitForOpen:
    """The data stream names a transfer whose ``open`` has not arrived yet."""


@dataclass(frozen=True)
class Refuse:
    """Do not read this data stream; perform ``actions``."""

    reason: str
    actions: list[Action]


DataDecision = Accept | WaitForOpen | Refuse

#: ``busy`` is an answer, not a failure: it travels as ``error {code: "busy"}`` and
#: never ends the transfer (the sender re-queues it and retries).
BUSY = "busy"
BUSY_RETRY_MIN = 1.0
BUSY_RETRY_MAX = 30.0


class PeerProtocol:
    """The protocol state of one session over the shared transfer table."""

    def __init__(self, table: TransferTable | PeerTable, *, max_incoming: int = 4096) -> None:
        self.table = table
        self.max_incoming = max_incoming
        self._finish: dict[str, m.Finish] = {}  # in: the sender's finish, this session
        self._ended: dict[str, bytes] = {}  # in: our digest once the bytes ended

    # -- session start: reconcile --------------------------------------------------

    def start(self) -> list[Action]:
        """Everything owed to the peer when a session starts.

        Verdicts the peer has not heard, then every live outbound transfer
        re-announced (a resume when the peer may know it), then every live
        incoming transfer's position, so a sender that forgot one says so.
        """
        actions: list[Action] = self.flush_notices()
        for t in self.table.active_outbound():
            actions += self.announce(t)
        for t in self.table.live("in"):
            if t.state is State.PENDING and t.fetch is not None:
                actions += self.request_fetch(t)  # asked while the link was down
            else:
                actions.append(Send(m.Resume(t.id, t.delivered)))
        return actions

    def request_fetch(self, t: Transfer) -> list[Action]:
        """Ask the peer to send us ``t`` (a pull); it arrives as an ordinary ``open``."""
        assert t.fetch is not None
        return [Send(m.Fetch(t.id, t.fetch[0], t.fetch[1], t.priority))]

    def flush_notices(self) -> list[Action]:
        """Every verdict the peer has not heard yet."""
        return [action for t in self.table for action in self._notice(t)]

    @staticmethod
    def _notice(t: Transfer) -> list[Action]:
        """``t``'s verdict for the peer, if it has one it did not hear yet (handed over once)."""
        notice, t.peer_notice = t.peer_notice, None
        if notice is None:
            return []
        if notice.code is Failure.CANCELED:
            return [Send(m.Cancel(t.id, notice.message))]
        return [Send(m.Error(t.id, notice.code.value, notice.message))]

    def announce(self, t: Transfer) -> list[Action]:
        """Open (or re-open) an active outbound transfer and start its bytes."""
        resume = t.opened
        start = t.delivered if resume else 0
        actions: list[Action] = [Send(m.Open(
            t.id, t.kind, t.size if t.kind in ("file", "dir") else None, t.priority, t.name,
            t.attrs, resume, t.delivered, t.ttl, t.group, t.mode,
            t.count if t.kind == "dir" else None, list(t.dirs)))]
        if not t.opened:
            t.opened = True
            actions.append(Persist(t, (("opened", 1), ("state", "active"))))
        if t.kind == "dir":
            return actions  # a directory has no bytes of its own: its files carry them
        if resume:
            t.resumes += 1
            t.resumed_from = start
        t.sent = start
        actions.append(StartSending(t, start))
        return actions

    # -- local decisions -------------------------------------------------------------

    def fail(self, t: Transfer, code: Failure, message: str, *, tell_peer: bool = True
             ) -> list[Action]:
        """End ``t`` here; the peer hears it (now) when it may know the transfer."""
        if not t.conclude(code, message, tell_peer=tell_peer):
            return []
        actions: list[Action] = [StopSending(t)] if t.direction == "out" else []
        actions.append(Ended(t))
        return actions + self._notice(t)

    def sent_all(self, t: Transfer, total: int, digest: bytes) -> list[Action]:
        """The pump handed the last byte to QUIC: tell the receiver what to verify."""
        if t.terminal:
            return []
        t.size = total
        t.sha256 = digest.hex()
        return [Send(m.Finish(t.id, total, digest))]

    # -- messages from the peer --------------------------------------------------------

    def receive(self, msg: m.Message) -> list[Action]:
        if isinstance(msg, m.Open):
            return self._on_open(msg)
        if isinstance(msg, m.Ack):
            return self._on_ack(msg)
        if isinstance(msg, m.Resume):
            return self._on_resume(msg)
        if isinstance(msg, m.Finish):
            return self._on_finish(msg)
        if isinstance(msg, m.Fetch):
            known = self.table.get(msg.id)
            if known is not None:
                # A repeated request (the first answer was lost): the transfer exists.
                return [] if known.direction == "out" else [Send(m.Error(
                    msg.id, Failure.DUPLICATE.value, "a transfer with this id exists"))]
            return [ServeFetch(msg)]
        if isinstance(msg, m.ListExports):
            return [ServeListing(msg)]
        if isinstance(msg, m.Exports):
            return [ListingArrived(msg)]
        if isinstance(msg, m.Cancel):
            t = self.table.get(msg.id)
            if t is None:
                return []
            return self.fail(t, Failure.CANCELED, f"canceled by peer: {msg.reason}",
                             tell_peer=False)
        if isinstance(msg, m.Error):
            if msg.id is None:
                raise SessionError(f"peer reported a session error: {msg.code}: {msg.message}")
            t = self.table.get(msg.id)
            if t is None:
                return []
            if msg.code == BUSY and t.direction == "out" and t.state is State.ACTIVE:
                return self._requeue(t)
            return self.fail(t, failure_from_peer(msg.code), f"peer: {msg.message}",
                             tell_peer=False)
        raise SessionError(f"unexpected {type(msg).__name__} on the control stream")

    def refused(self, transfer_id: str, problem: str) -> list[Action]:
        """A message naming ``transfer_id`` failed validation: that transfer only."""
        t = self.table.get(transfer_id)
        if t is not None and not t.terminal:
            return self.fail(t, Failure.PROTOCOL_ERROR, f"peer sent an invalid message: {problem}")
        return [Send(m.Error(transfer_id, Failure.BAD_OPEN.value if t is None
                             else Failure.PROTOCOL_ERROR.value, problem))]

    def _refuse_open(self, msg: m.Open, code: str, message: str) -> list[Action]:
        return [Send(m.Error(msg.id, str(code), message))]

    def _on_open(self, msg: m.Open) -> list[Action]:
        known = self.table.get(msg.id)
        if known is not None and known.state is State.PENDING and known.fetch is not None \
                and known.direction == "in":
            return self._fetched_open(known, msg)
        if known is not None:
            if known.direction != "in":
                return self._refuse_open(msg, Failure.DUPLICATE, "a transfer with this id exists")
            if known.terminal:
                return self._verdict_for(known)
            if not msg.resume:
                if (known.kind, known.size, known.name) == (msg.kind, msg.size, msg.name) \
                        and known.group == msg.group:
                    return []  # the same open again: it changes nothing (idempotent)
                return self._refuse_open(msg, Failure.DUPLICATE, "a transfer with this id exists")
            known.resumes += 1
            known.resumed_from = known.delivered
            actions: list[Action] = []
            if known.kind == "file":
                actions.append(Persist(known, (("resumed_from", known.delivered),)))
            actions.append(Send(m.Resume(msg.id, known.delivered)))
            return actions
        if msg.id in self.table:  # another link's transfer (a hub): not this peer's to use
            return self._refuse_open(msg, Failure.DUPLICATE, "a transfer with this id exists")
        if msg.kind == "dir":
            return self._open_directory(msg)
        if msg.group is not None:
            return self._open_member(msg)
        if msg.resume and msg.offset > 0:
            # The sender holds acks from us that we no longer remember: bytes were
            # delivered by a previous life of this agent and cannot be trusted now.
            return self._refuse_open(msg, Failure.UNKNOWN_TRANSFER,
                                     "the receiver has no record of this transfer")
        # A new transfer — or one announced just as a previous session died, whose
        # open never arrived: nothing was delivered, so it simply starts here.
        if msg.kind == "file":
            if msg.size is None:
                return self._refuse_open(msg, Failure.BAD_OPEN,
                                         "a file transfer must carry its size")
            try:
                safe_name_untrusted(msg.name)
            except UnsafeNameError as exc:
                return self._refuse_open(msg, Failure.UNSAFE_NAME, str(exc))
        if self.table.live_incoming() >= self.max_incoming:
            return self._refuse_open(msg, BUSY, f"the receiver holds {self.max_incoming} "
                                     "live incoming transfers; retry later")
        t = Transfer(msg.id, "in", msg.kind, msg.name, msg.size, msg.priority, dict(msg.attrs),
                     ttl=msg.ttl)
        t.move_to(State.ACTIVE)
        self.table.add(t)
        return [Created(t)]

    def _open_directory(self, msg: m.Open) -> list[Action]:
        """A directory transfer: its files follow as opens naming it as their group."""
        if msg.resume and msg.offset > 0:
            return self._refuse_open(msg, Failure.UNKNOWN_TRANSFER,
                                     "the receiver has no record of this directory")
        if msg.size is None or msg.count is None:
            return self._refuse_open(msg, Failure.BAD_OPEN,
                                     "a directory must carry its size and file count")
        if msg.count > self.max_incoming:
            return self._refuse_open(msg, Failure.BAD_OPEN, f"{msg.count} files exceed the "
                                     f"receiver's bound of {self.max_incoming}")
        try:
            safe_name_untrusted(msg.name)
            dirs = [safe_relative_path_untrusted(d) for d in msg.dirs]
        except UnsafeNameError as exc:
            return self._refuse_open(msg, Failure.UNSAFE_NAME, str(exc))
        t = Transfer(msg.id, "in", "dir", msg.name, msg.size, msg.priority, dict(msg.attrs),
                     ttl=msg.ttl, count=msg.count, dirs=dirs)
        t.move_to(State.ACTIVE)
        self.table.add(t)
        actions: list[Action] = [Created(t)]
        if t.count == 0:
            actions.append(Finalize(t))  # nothing but (empty) directories
        return actions

    def _open_member(self, msg: m.Open) -> list[Action]:
        """A file of a directory transfer: it lands in the directory's staging area."""
        assert msg.group is not None
        group = self.table.get(msg.group)
        if group is None or group.kind != "dir" or group.direction != "in" or group.terminal:
            return self._refuse_open(msg, Failure.BAD_OPEN,
                                     "a file of a directory this receiver does not hold")
        if msg.kind != "file" or msg.size is None:
            return self._refuse_open(msg, Failure.BAD_OPEN, "a directory holds files with sizes")
        try:
            path = safe_relative_path_untrusted(msg.name)
        except UnsafeNameError as exc:
            return self.fail(group, Failure.UNSAFE_NAME, str(exc))
        if self.table.has_member(group.id, path):
            return self.fail(group, Failure.DUPLICATE, f"{path!r} appears twice in the directory")
        t = Transfer(msg.id, "in", "file", path, msg.size, msg.priority, {}, group=group.id,
                     mode=msg.mode)
        t.move_to(State.ACTIVE)
        self.table.add(t)
        return [Created(t)]

    def _fetched_open(self, t: Transfer, msg: m.Open) -> list[Action]:
        """The peer answers our fetch by sending the file: it starts like any open."""
        if msg.kind != "file" or msg.size is None:
            return self.fail(t, Failure.BAD_OPEN, "a fetched transfer must be a file with a size")
        try:
            safe_name_untrusted(msg.name)
        except UnsafeNameError as exc:
            return self.fail(t, Failure.UNSAFE_NAME, str(exc))
        t.name, t.size, t.attrs, t.ttl = msg.name, msg.size, dict(msg.attrs), msg.ttl
        t.move_to(State.ACTIVE)
        return [Created(t)]

    def _verdict_for(self, t: Transfer) -> list[Action]:
        """The peer asks about a transfer that ended here: say how it ended."""
        if t.state is State.CANCELED:
            return [Send(m.Cancel(t.id, t.error_message or "canceled"))]
        if t.state is State.FAILED:
            return [Send(m.Error(t.id, t.error_code or Failure.FINISHED.value,
                                 t.error_message or "failed"))]
        if t.direction == "in":
            # Done here, but our final ack was lost (an outage): say it again.
            return [Send(m.Ack(t.id, t.delivered, True))]
        return [Send(m.Error(t.id, Failure.FINISHED.value, f"the transfer is {t.state.value}"))]

    def _on_resume(self, msg: m.Resume) -> list[Action]:
        """The receiver says where a transfer stands (answer to an open, or at session start)."""
        t = self.table.get(msg.id)
        if t is None or t.direction != "out":
            return [Send(m.Error(msg.id, Failure.UNKNOWN_TRANSFER.value,
                                 "the sender has no record of this transfer"))]
        if t.terminal:
            return [] if t.state is State.DONE else self._verdict_for(t)
        return []  # we replay from our last ack already; the receiver trims any overlap

    def _on_ack(self, msg: m.Ack) -> list[Action]:
        t = self.table.get(msg.id)
        if t is None or t.direction != "out" or t.terminal:
            return []  # late ack for a transfer that ended: harmless
        limit = (t.size or 0) if t.kind == "dir" else t.sent_high  # a directory: its files' bytes
        if msg.offset > limit or msg.offset < t.delivered:
            return self.fail(t, Failure.PROTOCOL_ERROR,
                             f"peer acked offset {msg.offset} outside {t.delivered}..{limit}")
        actions: list[Action] = []
        if msg.offset > t.delivered:
            t.delivered = msg.offset
            actions.append(Acked(t))
        if msg.final:
            # A stream is complete once we announced its end (finish); a file at its size
            # (after our restart the digest we sent before is not in memory: the
            # receiver checked it then).
            ended = t.sha256 is not None or t.kind == "dir" or (t.kind == "file" and t.resumes > 0)
            if t.size is not None and ended and msg.offset == t.size:
                t.move_to(State.DONE)
                actions.append(Completed(t))
            else:
                actions += self.fail(t, Failure.PROTOCOL_ERROR,
                                     f"final ack at {msg.offset} before the end")
        return actions

    def _on_finish(self, msg: m.Finish) -> list[Action]:
        t = self.table.get(msg.id)
        if t is None or t.direction != "in" or t.terminal:
            return []
        self._finish[t.id] = msg
        return self._maybe_verify(t)

    def _requeue(self, t: Transfer) -> list[Action]:
        t.busy_refusals += 1
        delay = min(BUSY_RETRY_MAX, BUSY_RETRY_MIN * 2 ** min(t.busy_refusals - 1, 5))
        t.move_to(State.PENDING)
        return [StopSending(t), Requeue(t, delay)]

    # -- data streams (incoming) --------------------------------------------------------

    def data_header(self, header: m.DataHeader) -> DataDecision:
        t = self.table.get(header.id)
        if t is None:
            return WaitForOpen()
        if t.kind == "dir":
            return Refuse("data for a directory", self.fail(
                t, Failure.PROTOCOL_ERROR, "a data stream for a directory itself"))
        if t.direction != "in":
            return Refuse("data for an outbound transfer",
                          [Send(m.Error(t.id, Failure.PROTOCOL_ERROR.value,
                                        "data stream for a transfer we send"))])
        if t.terminal:
            return Refuse(f"data for {t.state.value} transfer", [])
        if header.offset > t.delivered:
            return Refuse("gap", self.fail(
                t, Failure.PROTOCOL_ERROR,
                f"gap: data resumes at byte {header.offset}, only {t.delivered} were delivered"))
        self._ended.pop(t.id, None)
        return Accept(t, t.delivered - header.offset)

    def check_incoming(self, t: Transfer, nbytes: int) -> list[Action]:
        """Before writing ``nbytes`` more: a file may not grow past its announced size."""
        if t.size is not None and t.kind == "file" and t.delivered + nbytes > t.size:
            return self.fail(t, Failure.PROTOCOL_ERROR, "file data beyond its announced size")
        return []

    def delivered(self, t: Transfer, offset: int) -> list[Action]:
        """Bytes up to ``offset`` are safe at the local reader: persist (files), then ack."""
        if t.terminal or offset < t.delivered:
            return []
        t.delivered = offset
        actions: list[Action] = []
        if t.kind == "file":
            actions.append(Persist(t, (("offset", offset),)))
        actions.append(Send(m.Ack(t.id, offset, False)))
        return actions

    def data_ended(self, t: Transfer, digest: bytes) -> list[Action]:
        """The data stream ended cleanly; ``digest`` is the SHA-256 of every delivered byte."""
        if t.terminal:
            return []
        self._ended[t.id] = digest
        return self._maybe_verify(t)

    def data_failed(self, t: Transfer, problem: str) -> list[Action]:
        """The peer's bytes broke the protocol (e.g. ended inside a replayed overlap)."""
        return self.fail(t, Failure.PROTOCOL_ERROR, problem)

    def _maybe_verify(self, t: Transfer) -> list[Action]:
        finish = self._finish.get(t.id)
        digest = self._ended.get(t.id)
        if finish is None or digest is None:
            return []
        del self._finish[t.id], self._ended[t.id]
        if finish.total != t.delivered:
            return self.fail(t, Failure.PROTOCOL_ERROR,
                             f"peer sent {finish.total} bytes, we received {t.delivered}")
        if finish.sha256 != digest:
            return self.fail(t, Failure.PROTOCOL_ERROR,
                             "SHA-256 mismatch: the received bytes differ from the sent")
        t.size = finish.total
        t.sha256 = finish.sha256.hex()
        if t.kind == "file":
            return [Finalize(t)]
        return self._complete_incoming(t)

    def finalized(self, t: Transfer, path: str) -> list[Action]:
        """The verified file has its final name in the inbox."""
        t.path = path
        return self._complete_incoming(t)

    def _complete_incoming(self, t: Transfer) -> list[Action]:
        if t.kind == "dir":
            t.delivered = t.size or 0
        if not t.move_to(State.DONE):
            return []
        actions: list[Action] = [Completed(t), Send(m.Ack(t.id, t.delivered, True))]
        group = self.table.get(t.group) if t.group is not None else None
        if group is not None and not group.terminal:
            group.members_done += 1
            group.delivered = min(group.size or 0, group.delivered + t.delivered)
            if group.members_done == group.count:
                actions.append(Finalize(group))  # every file verified: publish the tree
        return actions
