"""The sans-IO peer protocol: two instances wired in memory, including hostile orders."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from quelay.core import messages as m
from quelay.core import peer as pp
from quelay.core.codes import Failure
from quelay.core.transfer import PeerNotice, State

from .conftest import examples
from .peer_harness import Link, Side

DATA = bytes(range(256)) * 40  # 10 240 bytes


def link() -> Link:
    lk = Link(Side("a"), Side("b"))
    lk.start_sessions()
    return lk


def test_file_end_to_end_in_memory() -> None:
    lk = link()
    t = lk.a.submit(DATA)
    lk.a.start(t)
    lk.deliver_all()  # open
    lk.pump(t.id)
    lk.deliver_all()  # acks, finish, final ack
    t_in = lk.b.table[t.id]
    assert t.state is State.DONE and t_in.state is State.DONE
    assert t_in.sha256 == hashlib.sha256(DATA).hexdigest() == t.sha256
    assert t_in.path == "/inbox/f.bin"
    assert lk.b.created == [t.id] and lk.a.completed == [t.id] and lk.b.completed == [t.id]


def test_finish_before_the_data_ends_is_verified_when_it_does() -> None:
    lk = link()
    t = lk.a.submit(DATA, kind="stream")
    lk.a.start(t)
    lk.deliver_all()
    lk.pump(t.id, upto=5000)
    # The sender's finish overtakes nothing here, but arrives before the last bytes.
    finish = m.Finish(t.id, len(DATA), hashlib.sha256(DATA).digest())
    lk.b.apply(lk.b.proto.receive(finish))
    assert lk.b.table[t.id].state is State.ACTIVE
    lk.pump(t.id)
    t.size, t.sha256 = len(DATA), hashlib.sha256(DATA).hexdigest()
    lk.deliver_all()
    assert lk.b.table[t.id].state is State.DONE and t.state is State.DONE


def test_open_lost_in_an_outage_is_created_on_resume() -> None:
    """The open is sent just as the link dies: the next session's resume creates it."""
    lk = link()
    t = lk.a.submit(DATA)
    lk.a.start(t)
    assert t.opened
    lk.a.outbox.clear()  # the outage eats the open
    lk.start_sessions()  # a new session: a re-announces (resume, offset 0)
    lk.deliver_all()
    assert t.id in lk.b.table and lk.b.table[t.id].state is State.ACTIVE
    lk.pump(t.id)
    lk.deliver_all()
    assert t.state is State.DONE and lk.b.table[t.id].state is State.DONE


def test_resume_of_unknown_transfer_with_acked_bytes_is_refused() -> None:
    lk = link()
    lk.b.apply(lk.b.proto.receive(m.Open(m.new_transfer_id(), "stream", None, 4, "s", {},
                                         True, 500)))
    [msg] = lk.b.outbox
    assert isinstance(msg, m.Error) and msg.code == "unknown_transfer"


def test_forged_ack_fails_only_that_transfer_at_both_ends() -> None:
    lk = link()
    t1, t2 = lk.a.submit(DATA), lk.a.submit(DATA)
    lk.a.start(t1)
    lk.a.start(t2)
    lk.deliver_all()
    lk.pump(t1.id, upto=1000)
    lk.a.apply(lk.a.proto.receive(m.Ack(t1.id, 5000)))  # beyond anything sent
    assert t1.state is State.FAILED and t1.error_code == "protocol_error"
    assert t1.id not in lk.a.sending
    lk.deliver_all()
    assert lk.b.table[t1.id].state is State.FAILED
    assert lk.b.table[t1.id].error_code == "protocol_error"
    lk.pump(t2.id)
    lk.deliver_all()
    assert t2.state is State.DONE  # the other transfer never noticed


def test_decreasing_ack_fails_the_transfer() -> None:
    lk = link()
    t = lk.a.submit(DATA)
    lk.a.start(t)
    lk.deliver_all()
    lk.pump(t.id, upto=4000)
    lk.deliver_all()
    assert t.delivered == 4000
    lk.a.apply(lk.a.proto.receive(m.Ack(t.id, 100)))
    assert t.state is State.FAILED and "outside" in (t.error_message or "")


def test_gap_fails_and_overlap_is_skipped() -> None:
    lk = link()
    t = lk.a.submit(DATA, kind="stream")
    lk.a.start(t)
    lk.deliver_all()
    lk.pump(t.id, upto=3000)
    t_in = lk.b.table[t.id]
    decision = lk.b.proto.data_header(m.DataHeader(t.id, 1000))
    assert isinstance(decision, pp.Accept) and decision.skip == 2000
    decision = lk.b.proto.data_header(m.DataHeader(t.id, 3001))
    assert isinstance(decision, pp.Refuse)
    lk.b.apply(decision.actions)
    assert t_in.state is State.FAILED and "gap" in (t_in.error_message or "")
    lk.deliver_all()
    assert t.state is State.FAILED  # told to the sender


def test_digest_mismatch_fails_both_ends() -> None:
    lk = link()
    t = lk.a.submit(DATA)
    lk.a.start(t)
    lk.deliver_all()
    lk.a.content[t.id] = b"x" + DATA[1:]  # the bytes change after the digest was taken
    t_in = lk.b.table[t.id]
    lk.b.apply(lk.b.proto.delivered(t_in, len(DATA)))
    lk.b.apply(lk.b.proto.data_ended(t_in, hashlib.sha256(b"y" + DATA[1:]).digest()))
    lk.a.apply(lk.a.proto.sent_all(t, len(DATA), hashlib.sha256(DATA).digest()))
    lk.deliver_all()
    assert t_in.state is State.FAILED and "SHA-256" in (t_in.error_message or "")
    assert t.state is State.FAILED


def test_cancel_from_either_end_is_canceled_at_both() -> None:
    for canceller in ("a", "b"):
        lk = link()
        t = lk.a.submit(DATA, kind="stream")
        lk.a.start(t)
        lk.deliver_all()
        side = lk.a if canceller == "a" else lk.b
        record = side.table[t.id]
        side.apply(side.proto.fail(record, Failure.CANCELED, "operator said so"))
        lk.deliver_all()
        assert t.state is State.CANCELED and lk.b.table[t.id].state is State.CANCELED
        assert t.error_code == lk.b.table[t.id].error_code == "canceled"


def test_cancel_while_down_is_told_at_the_next_session() -> None:
    lk = link()
    t = lk.a.submit(DATA, kind="stream")
    lk.a.start(t)
    lk.deliver_all()
    record = lk.b.table[t.id]
    lk.b.apply(lk.b.proto.fail(record, Failure.CANCELED, "no link"))
    lk.b.outbox.clear()  # the link is down: the cancel is lost
    assert record.peer_notice is None  # it was handed to that session
    record.peer_notice = PeerNotice(Failure.CANCELED, "no link")  # as the book keeps it
    lk.start_sessions()
    lk.deliver_all()
    assert t.state is State.CANCELED


def test_sender_that_forgot_a_transfer_fails_it_at_the_receiver() -> None:
    lk = link()
    t = lk.a.submit(DATA, kind="stream")
    lk.a.start(t)
    lk.deliver_all()
    lk.a.table.remove(t.id)  # e.g. the sender restarted (streams are not journaled)
    lk.start_sessions()
    lk.deliver_all()
    t_in = lk.b.table[t.id]
    assert t_in.state is State.FAILED and t_in.error_code == "unknown_transfer"


def test_busy_receiver_requeues_instead_of_failing() -> None:
    lk = Link(Side("a"), Side("b", max_incoming=1))
    lk.start_sessions()
    t1, t2 = lk.a.submit(DATA), lk.a.submit(DATA)
    lk.a.start(t1)
    lk.a.start(t2)
    lk.deliver_all()
    assert t2.state is State.PENDING and lk.a.requeued == [t2.id]
    assert t2.id not in lk.b.table
    lk.pump(t1.id)
    lk.deliver_all()
    lk.a.start(t2)  # the retry, once its delay passed
    lk.deliver_all()
    lk.pump(t2.id)
    lk.deliver_all()
    assert t1.state is State.DONE and t2.state is State.DONE


def test_hostile_messages_for_unknown_ids_are_harmless() -> None:
    lk = link()
    tid = m.new_transfer_id()
    for msg in (m.Ack(tid, 10), m.Finish(tid, 1, b"\0" * 32), m.Cancel(tid, "x"),
                m.Error(tid, "protocol_error", "x")):
        assert lk.a.proto.receive(msg) == []
    actions = lk.a.proto.receive(m.Resume(tid, 0))
    assert [type(x) for x in actions] == [pp.Send]


def test_invalid_open_costs_only_its_transfer() -> None:
    lk = link()
    body = m.encode_message(m.Open(m.new_transfer_id(), "file", 10, 4, "x", {}))
    body["attrs"] = {"k": "v" * 5000}
    try:
        m.decode_message_untrusted(body)
    except m.TransferProtocolError as exc:
        actions = lk.b.proto.refused(exc.transfer_id, str(exc))
    else:
        raise AssertionError("oversized attrs accepted")
    [send] = actions
    assert isinstance(send, pp.Send) and isinstance(send.message, m.Error)
    assert send.message.code == "bad_open"


def test_a_repeated_open_changes_nothing_and_a_different_one_is_refused() -> None:
    """Found by the interleavings machine: an empty file's open arrived twice, the
    receiver answered the copy ``duplicate`` and the sender failed a transfer the
    receiver completed. The same open again is now ignored."""
    lk = link()
    t = lk.a.submit(b"", kind="file")
    lk.a.start(t)
    lk.a.outbox.insert(0, lk.a.outbox[0])  # the open, twice
    lk.deliver_one(lk.a)
    lk.pump(t.id)
    lk.deliver_all()
    assert lk.a.table[t.id].state is State.DONE and lk.b.table[t.id].state is State.DONE
    other = m.Open(t.id, "file", 5, 4, "other.bin")
    lk2 = link()
    t2 = lk2.a.submit(b"abc", kind="file")
    lk2.a.start(t2)
    lk2.deliver_one(lk2.a)
    [send] = lk2.b.proto.receive(m.Open(t2.id, "file", 5, 4, "other.bin"))
    assert isinstance(send, pp.Send) and isinstance(send.message, m.Error)
    assert send.message.code == "duplicate" and other.id == t.id


def test_unsafe_name_refused_at_open() -> None:
    lk = link()
    actions = lk.b.proto.receive(m.Open(m.new_transfer_id(), "file", 1, 4, "../etc", {}))
    [send] = actions
    assert isinstance(send, pp.Send) and isinstance(send.message, m.Error)
    assert send.message.code == "unsafe_name"


# -- random interleavings ------------------------------------------------------------


class Interleavings(RuleBasedStateMachine):
    """Random deliveries, duplicates, pumps, cancels and session drops.

    Invariant: a transfer that is done at the receiver holds exactly the sent
    bytes; anything that ended carries a reason; at the end, after a clean
    session with everything delivered, every transfer is either done at both
    ends or ended (failed/canceled) at both ends.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lk = link()
        self.ids: list[str] = []

    @rule(kind=st.sampled_from(["file", "stream"]), size=st.integers(0, 3000))
    def submit(self, kind: str, size: int) -> None:
        if len(self.ids) < 4:
            t = self.lk.a.submit(DATA[:size], kind=kind)
            self.lk.a.start(t)
            self.ids.append(t.id)

    @rule(side=st.sampled_from(["a", "b"]))
    def deliver(self, side: str) -> None:
        self.lk.deliver_one(self.lk.a if side == "a" else self.lk.b)

    @rule(side=st.sampled_from(["a", "b"]))
    def duplicate(self, side: str) -> None:
        s = self.lk.a if side == "a" else self.lk.b
        if s.outbox:
            s.outbox.insert(0, s.outbox[0])

    @rule(i=st.integers(0, 3), upto=st.integers(0, 3000))
    def pump(self, i: int, upto: int) -> None:
        if i < len(self.ids):
            self.lk.pump(self.ids[i], upto=upto)

    @rule(i=st.integers(0, 3), side=st.sampled_from(["a", "b"]))
    def cancel(self, i: int, side: str) -> None:
        if i < len(self.ids):
            s = self.lk.a if side == "a" else self.lk.b
            t = s.table.get(self.ids[i])
            if t is not None:
                s.apply(s.proto.fail(t, Failure.CANCELED, "random cancel"))

    @rule()
    def drop_session(self) -> None:
        self.lk.start_sessions()  # whatever was in flight is lost

    @invariant()
    def done_means_exact(self) -> None:
        for tid in self.ids:
            t_in = self.lk.b.table.get(tid)
            if t_in is not None and t_in.state is State.DONE:
                assert t_in.sha256 == hashlib.sha256(self.lk.a.content[tid]).hexdigest()
            for s in (self.lk.a, self.lk.b):
                t = s.table.get(tid)
                if t is not None and t.state in (State.FAILED, State.CANCELED):
                    assert t.error_code and t.error_message

    def teardown(self) -> None:
        # A quiet, lossless session at the end: everything must settle.
        lk = self.lk
        for _ in range(3):
            lk.start_sessions()
            lk.deliver_all()
            for tid in self.ids:
                lk.pump(tid)
            lk.deliver_all()
        for tid in self.ids:
            t_out = lk.a.table[tid]
            t_in = lk.b.table.get(tid)
            if t_out.state is State.DONE:
                assert t_in is not None and t_in.state is State.DONE
            elif t_in is not None:
                assert t_out.terminal and t_in.terminal, (t_out, t_in)
                assert (t_out.state is State.DONE) == (t_in.state is State.DONE)
            else:
                assert t_out.terminal


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(max_examples=examples(100), stateful_step_count=40,
                                      deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


def test_lost_final_ack_is_repeated_when_the_sender_reopens() -> None:
    lk = link()
    t = lk.a.submit(DATA)
    lk.a.start(t)
    lk.deliver_all()
    lk.pump(t.id)
    lk.deliver_one(lk.a)  # the finish reaches the receiver ...
    while lk.a.outbox:
        lk.deliver_one(lk.a)
    assert lk.b.table[t.id].state is State.DONE
    lk.b.outbox.clear()  # ... but its acks, the final one included, die in an outage
    assert t.state is State.ACTIVE
    lk.start_sessions()
    lk.deliver_all()
    assert t.state is State.DONE, t.error_message


def test_directory_completes_when_every_file_is_done() -> None:
    from quelay.core.transfer import Transfer

    lk = link()
    group = Transfer(m.new_transfer_id(), "out", "dir", "tree", 2 * len(DATA), 4, count=2,
                     dirs=["empty"])
    lk.a.table.add(group)
    members = []
    for rel in ("a/x.bin", "b.bin"):
        t = lk.a.submit(DATA)
        t.name, t.group, t.mode = rel, group.id, 0o640
        members.append(t)
    lk.a.start(group)
    for t in members:
        lk.a.start(t)
    lk.deliver_all()
    g_in = lk.b.table[group.id]
    assert g_in.kind == "dir" and g_in.count == 2 and g_in.dirs == ["empty"]
    lk.pump(members[0].id)
    lk.deliver_all()
    assert g_in.state is State.ACTIVE and g_in.members_done == 1
    lk.pump(members[1].id)
    lk.deliver_all()
    assert g_in.state is State.DONE and group.state is State.DONE
    assert {lk.b.table[t.id].name for t in members} == {"a/x.bin", "b.bin"}


def test_unsafe_path_in_a_directory_fails_the_directory() -> None:
    from quelay.core.transfer import Transfer

    lk = link()
    group = Transfer(m.new_transfer_id(), "out", "dir", "tree", 10, 4, count=1)
    lk.a.table.add(group)
    t = lk.a.submit(b"x" * 10)
    t.name, t.group = "a/../../etc/passwd", group.id
    lk.a.start(group)
    lk.a.start(t)
    lk.deliver_all()
    assert lk.b.table[group.id].state is State.FAILED
    assert lk.b.table[group.id].error_code == "unsafe_name"
    assert group.state is State.FAILED  # told to the sender


def test_a_cancel_after_the_finish_is_refused_so_both_ends_agree() -> None:
    lk = link()
    t = lk.a.submit(b"")  # a 0-byte file: finished the moment it is pumped
    lk.a.start(t)
    lk.deliver_all()
    lk.pump(t.id)
    assert t.sha256 is not None and not t.cancelable
    assert lk.a.proto.fail(t, Failure.CANCELED, "too late") == []
    lk.deliver_all()
    assert t.state is State.DONE and lk.b.table[t.id].state is State.DONE
