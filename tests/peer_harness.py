"""Two sans-IO peer protocols wired together in memory (in the spirit of h11's helpers).

Each :class:`Side` owns a transfer table and, per session, a
:class:`~quelay.core.peer.PeerProtocol`. Messages an action sends are queued
for the other side; the test decides when (and whether) they are delivered,
so any order — including a session dying with messages in flight — can be
played. Data streams are modelled as "the sender's bytes from offset X": the
harness hands them to the receiver the way the session driver would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from quelay.core import messages as m
from quelay.core import peer as pp
from quelay.core.transfer import State, Transfer, TransferTable


@dataclass
class Side:
    name: str
    table: TransferTable = field(default_factory=TransferTable)
    protocol: pp.PeerProtocol | None = None
    outbox: list[m.Message] = field(default_factory=list)  # control messages in flight
    sending: dict[str, int] = field(default_factory=dict)  # out: data stream from offset
    content: dict[str, bytes] = field(default_factory=dict)  # out: the bytes to send
    created: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    persisted: list[tuple[str, tuple[tuple[str, object], ...]]] = field(default_factory=list)
    max_incoming: int = 4096

    def new_session(self) -> list[pp.Action]:
        self.protocol = pp.PeerProtocol(self.table, max_incoming=self.max_incoming)
        self.outbox.clear()
        self.sending.clear()
        return self.protocol.start()

    @property
    def proto(self) -> pp.PeerProtocol:
        assert self.protocol is not None
        return self.protocol

    def apply(self, actions: list[pp.Action]) -> None:
        for action in actions:
            if isinstance(action, pp.Send):
                self.outbox.append(action.message)
            elif isinstance(action, pp.StartSending):
                self.sending[action.transfer.id] = action.offset
            elif isinstance(action, pp.StopSending):
                self.sending.pop(action.transfer.id, None)
            elif isinstance(action, pp.Created):
                self.created.append(action.transfer.id)
            elif isinstance(action, pp.Persist):
                self.persisted.append((action.transfer.id, action.fields))
            elif isinstance(action, pp.Finalize):
                self.apply(self.proto.finalized(action.transfer, f"/inbox/{action.transfer.name}"))
            elif isinstance(action, pp.Completed):
                self.completed.append(action.transfer.id)
            elif isinstance(action, pp.Ended):
                self.ended.append(action.transfer.id)
            elif isinstance(action, pp.Requeue):
                self.requeued.append(action.transfer.id)
            elif isinstance(action, pp.Acked):
                pass  # a spool would free space here

    # -- outbound transfers -------------------------------------------------------

    def submit(self, data: bytes, *, kind: str = "file", tid: str | None = None) -> Transfer:
        t = Transfer(tid or m.new_transfer_id(), "out", kind,  # type: ignore[arg-type]
                     "f.bin", len(data) if kind == "file" else None, 4)
        self.table.add(t)
        self.content[t.id] = data
        return t

    def start(self, t: Transfer) -> None:
        t.move_to(State.ACTIVE)
        self.apply(self.proto.announce(t))


@dataclass
class Link:
    """Sender ``a`` and receiver ``b`` (messages flow both ways)."""

    a: Side
    b: Side

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def start_sessions(self) -> None:
        self.a.apply(self.a.new_session())
        self.b.apply(self.b.new_session())

    def deliver_one(self, side: Side) -> bool:
        """Deliver the oldest message ``side`` sent; False if none was in flight."""
        if not side.outbox:
            return False
        msg = side.outbox.pop(0)
        peer = self.other(side)
        peer.apply(peer.proto.receive(msg))
        return True

    def deliver_all(self) -> None:
        while self.deliver_one(self.a) or self.deliver_one(self.b):
            pass

    def pump(self, tid: str, *, upto: int | None = None) -> None:
        """Move ``a``'s bytes of ``tid`` (from its data stream's offset) into ``b``."""
        if tid not in self.a.sending:
            return
        t_out = self.a.table[tid]
        start = self.a.sending[tid]
        data = self.a.content[tid]
        end = len(data) if upto is None else min(upto, len(data))
        decision = self.b.proto.data_header(m.DataHeader(tid, start))
        if not isinstance(decision, pp.Accept):
            if isinstance(decision, pp.Refuse):
                self.b.apply(decision.actions)
            return
        t_in = decision.transfer
        chunk = data[start + decision.skip:end]
        t_out.sent = max(t_out.sent, end)
        t_out.sent_high = max(t_out.sent_high, end)
        if chunk:
            refused = self.b.proto.check_incoming(t_in, len(chunk))
            if refused:
                self.b.apply(refused)
                return
            self.b.apply(self.b.proto.delivered(t_in, t_in.delivered + len(chunk)))
        if end == len(data):
            del self.a.sending[tid]
            delivered = data[:t_in.delivered]
            self.b.apply(self.b.proto.data_ended(t_in, hashlib.sha256(delivered).digest()))
            self.a.apply(self.a.proto.sent_all(t_out, len(data), hashlib.sha256(data).digest()))
        else:
            self.a.sending[tid] = end
