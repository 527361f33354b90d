"""The transfer table's indexes agree with a plain scan of every transfer it holds.

The table answers "what is live / active / queued / in this directory" from
indexes that follow each state change (so the scheduler's per-event work
does not grow with finished or idle transfers). A hypothesis state machine
drives random adds, transitions and removals and compares every answer with
the scan the table used to do.
"""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from quelay.core.transfer import State, Transfer, TransferTable
from quelay.errors import LocalProtocolError

from .conftest import examples

_IDS = itertools.count()


def _scan_queue(table: TransferTable) -> list[Transfer]:
    pending = [t for t in table if t.direction == "out" and t.state is State.PENDING]
    return sorted(pending, key=lambda t: (-t.priority, t.seq))


class TableIndexes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = TransferTable()
        self.groups: list[str] = []

    @rule(direction=st.sampled_from(["out", "in"]), kind=st.sampled_from(["file", "stream", "dir"]),
          priority=st.integers(0, 3), in_group=st.booleans(), name=st.sampled_from("abc"),
          state=st.sampled_from([State.PENDING, State.ACTIVE, State.DONE]),
          peer=st.sampled_from(["", "p"]))
    def add(self, direction: str, kind: str, priority: int, in_group: bool, name: str,
            state: State, peer: str) -> None:
        group = self.groups[-1] if in_group and self.groups and kind == "file" else None
        t = Transfer(f"t{next(_IDS)}", direction, kind, name, 1, priority,  # type: ignore[arg-type]
                     group=group, peer=peer)
        if state is State.ACTIVE or (state is State.PENDING and direction == "in"):
            t.move_to(State.ACTIVE)  # (only outbound transfers can be pending and re-queue)
        elif state is State.DONE:
            t.move_to(State.ACTIVE)
            t.move_to(State.DONE)
        self.table.add(t)
        if kind == "dir":
            self.groups.append(t.id)

    @precondition(lambda self: len(self.table) > 0)
    @rule(pick=st.integers(0, 10_000), to=st.sampled_from(list(State)))
    def move(self, pick: int, to: State) -> None:
        t = self.table.values()[pick % len(self.table)]
        before = t.state
        try:
            t.move_to(to)
        except LocalProtocolError:  # a transition the transfer refuses changes nothing
            assert t.state is before

    @precondition(lambda self: len(self.table) > 0)
    @rule(pick=st.integers(0, 10_000))
    def remove(self, pick: int) -> None:
        t = self.table.values()[pick % len(self.table)]
        self.table.remove(t.id)
        assert t.queue_position is None  # out of the table, out of the queue

    @invariant()
    def indexes_agree_with_a_scan(self) -> None:
        table = self.table
        every = list(table)
        assert table.live() == [t for t in every if not t.terminal]
        for direction in ("out", "in"):
            assert table.live(direction) == [  # type: ignore[arg-type]
                t for t in every if not t.terminal and t.direction == direction]
        assert table.live_incoming() == sum(1 for t in every
                                            if t.direction == "in" and not t.terminal)
        active = [t for t in every if t.direction == "out" and t.state is State.ACTIVE]
        assert table.active_outbound() == active
        assert table.active_outbound_count() == len(active)
        assert table.active_outbound_count(bytes_only=True) == sum(1 for t in active
                                                                   if t.kind != "dir")
        assert table.active_outbound_by_peer() == dict(Counter(t.peer for t in active))
        assert table.active_outbound_by_peer(bytes_only=True) == dict(
            Counter(t.peer for t in active if t.kind != "dir"))
        for peer in ("", "p"):
            assert table.live_incoming(peer) == sum(1 for t in every if t.direction == "in"
                                                    and not t.terminal and t.peer == peer)
        queue = _scan_queue(table)
        assert table.queue() == queue == list(table.waiting())
        assert table.queued() == len(queue)
        assert table.queued_dirs() == sum(1 for t in queue if t.kind == "dir")
        assert table.queue_head(2) == queue[:2]
        for position, t in enumerate(queue, 1):
            assert t.queue_position == position
        for t in every:
            if t not in queue:
                assert t.queue_position is None
        for group in self.groups:
            members = [t for t in every if t.group == group]
            assert table.members(group) == members
            for name in "abc":
                assert table.has_member(group, name) == any(t.name == name for t in members)


TableIndexes.TestCase.settings = settings(max_examples=examples(100), stateful_step_count=40,
                                          deadline=None)
TestTableIndexes = TableIndexes.TestCase


def test_a_state_change_outside_the_table_moves_nothing_in_it() -> None:
    """A transfer removed from the table no longer reports to it."""
    table = TransferTable()
    t = Transfer("x", "out", "stream", "s", None, 4)
    table.add(t)
    assert table.queued() == 1 and t.queue_position == 1
    table.remove("x")
    t.move_to(State.ACTIVE)
    assert table.active_outbound() == [] and table.queued() == 0
    table.add(t)
    assert table.active_outbound() == [t]
