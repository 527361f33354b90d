"""DrrTable: the C module, the pure-Python model and a naive reference, side by side.

The naive reference below visits streams one at a time exactly as the
algorithm is specified (no whole-round fast-forward), so it pins down the
semantics both backends must reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from quelay.native import _cffi_backend as cnative
from quelay.native import _model as pynative
from quelay.native.errors import (
    MAX_BYTES,
    PRIORITY_DEFAULT,
    U64_MAX,
    DrrError,
    DrrReleasedError,
    DuplicateStreamError,
    UnknownStreamError,
)

from .conftest import examples
from .test_native_spool import c_calls, outcome  # noqa: F401 - c_calls is a fixture

BACKENDS = [pytest.param(cnative, id="c"), pytest.param(pynative, id="python")]


class NaiveDrr:
    """The specification, executed literally: one visit at a time."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.max_base = base
        self.streams: dict[int, dict[str, Any]] = {}
        # Backlogged bulk streams; [0] is being visited. A stream with a deficit is in
        # the middle of a visit and resumes it (no new quantum) when it is [0] again.
        self.ring: list[int] = []
        self.seq = 0

    def add(self, sid: int, prio: int, control: bool) -> None:
        self.streams[sid] = {"prio": prio, "control": control, "backlog": 0, "deficit": 0,
                             "seq": self.seq, "fresh": not control}
        self.seq += 1

    def set_base_quantum(self, base: int) -> None:
        self.base = base
        self.max_base = max(self.max_base, base)

    def active_count(self) -> int:
        return len(self.ring)

    def _leave(self, sid: int) -> None:
        self.ring.remove(sid)
        self.streams[sid]["deficit"] = 0

    def remove(self, sid: int) -> None:
        if sid in self.ring:
            self._leave(sid)
        del self.streams[sid]

    def set_priority(self, sid: int, prio: int) -> None:
        self.streams[sid]["prio"] = prio

    def set_backlog(self, sid: int, n: int) -> None:
        s = self.streams[sid]
        s["backlog"] = n
        if not s["control"]:
            if n and sid not in self.ring:
                # A stream's first activation goes to the front: served next.
                self.ring.insert(0 if s["fresh"] else len(self.ring), sid)
                s["fresh"] = False
                s["deficit"] = 0
            elif not n and sid in self.ring:
                self._leave(sid)

    def quantum(self, sid: int) -> int:
        return int(self.base * (self.streams[sid]["prio"] + 1))

    def schedule(self, budget: int) -> list[tuple[int, int]]:
        grants: dict[int, int] = {}
        left = budget
        control = sorted((sid for sid, s in self.streams.items() if s["control"]),
                         key=lambda sid: (-self.streams[sid]["prio"], self.streams[sid]["seq"]))
        for sid in control:
            s = self.streams[sid]
            g = min(s["backlog"], left)
            if g:
                s["backlog"] -= g
                left -= g
                grants[sid] = grants.get(sid, 0) + g
        while left and self.ring:
            sid = self.ring[0]
            s = self.streams[sid]
            if s["deficit"] == 0:
                s["deficit"] += self.quantum(sid)
            g = min(s["deficit"], s["backlog"], left)
            s["deficit"] -= g
            s["backlog"] -= g
            left -= g
            grants[sid] = grants.get(sid, 0) + g
            if s["backlog"] == 0:
                self._leave(sid)
            elif s["deficit"] == 0:
                self.ring.append(self.ring.pop(0))
        return list(grants.items())


IDS = st.one_of(st.integers(0, 9), st.sampled_from([U64_MAX, 1 << 63, 123_456_789_012]))
# Few distinct priorities make ties (equal quanta, control order by age) common.
PRIOS = st.one_of(st.sampled_from([0, 4, 15]), st.integers(0, 15))


class DrrComparison(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c: Any = None

    @initialize(base=st.one_of(st.integers(1, 64), st.sampled_from([100, 1000])))
    def init(self, base: int) -> None:
        self.c = cnative.DrrTable(base)
        self.m = pynative.DrrTable(base)
        self.n = NaiveDrr(base)
        self.seen: set[int] = set()

    def both(self, name: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        rc = outcome(lambda: getattr(self.c, name)(*args, **kwargs))
        rm = outcome(lambda: getattr(self.m, name)(*args, **kwargs))
        assert rc == rm, (name, args, rc, rm)
        return rc

    @rule(sid=IDS, prio=PRIOS, control=st.booleans())
    def add(self, sid: int, prio: int, control: bool) -> None:
        self.seen.add(sid)
        result = self.both("add", sid, prio, control=control)
        if sid in self.n.streams:
            assert result == ("err", DuplicateStreamError)
        else:
            assert result == ("ok", None)
            self.n.add(sid, prio, control)

    @rule(sid=IDS)
    def remove(self, sid: int) -> None:
        result = self.both("remove", sid)
        if sid in self.n.streams:
            assert result == ("ok", None)
            self.n.remove(sid)
        else:
            assert result == ("err", UnknownStreamError)

    @rule(sid=IDS, prio=PRIOS)
    def set_priority(self, sid: int, prio: int) -> None:
        result = self.both("set_priority", sid, prio)
        if sid in self.n.streams:
            assert result == ("ok", None)
            self.n.set_priority(sid, prio)
        else:
            assert result == ("err", UnknownStreamError)

    @rule(sid=IDS, n=st.one_of(st.integers(0, 40), st.integers(0, 3000), st.just(0)))
    def set_backlog(self, sid: int, n: int) -> None:
        result = self.both("set_backlog", sid, n)
        if sid in self.n.streams:
            assert result == ("ok", None)
            self.n.set_backlog(sid, n)
        else:
            assert result == ("err", UnknownStreamError)

    @rule(base=st.one_of(st.integers(1, 64), st.sampled_from([100, 1000])))
    def set_base_quantum(self, base: int) -> None:
        """The cap changed: every quantum follows the new base."""
        assert self.both("set_base_quantum", base) == ("ok", None)
        self.n.set_base_quantum(base)

    @rule(base=st.integers(1, 400), step=st.integers(0, 97))
    def backlog_everything(self, base: int, step: int) -> None:
        """Make every stream busy at once: the interesting interactions need several."""
        for i, sid in enumerate(sorted(self.n.streams)):
            n = base + i * step
            assert self.both("set_backlog", sid, n) == ("ok", None)
            self.n.set_backlog(sid, n)

    @rule(budget=st.one_of(st.integers(0, 100), st.integers(0, 4000)))
    def schedule(self, budget: int) -> None:
        before = {sid: s["backlog"] for sid, s in self.n.streams.items()}
        result = self.both("schedule", budget)
        expected = self.n.schedule(budget)
        assert result == ("ok", expected)
        grants = expected
        assert sum(g for _, g in grants) <= budget
        assert len({sid for sid, _ in grants}) == len(grants)  # one grant per stream
        assert all(0 < g <= before[sid] for sid, g in grants)
        # control grants come first
        kinds = [self.n.streams[sid]["control"] for sid, _ in grants]
        assert kinds == sorted(kinds, reverse=True)
        # work conservation: budget left over only if nothing is backlogged
        if sum(g for _, g in grants) < budget:
            assert all(s["backlog"] == 0 for s in self.n.streams.values())

    @invariant()
    def tables_agree(self) -> None:
        if self.c is None:
            return
        assert len(self.c) == len(self.m) == len(self.n.streams)
        for sid in self.seen:
            known = sid in self.n.streams
            assert (sid in self.c) == (sid in self.m) == known
            for query in ("backlog", "deficit", "quantum", "priority", "is_control"):
                rc = self.both(query, sid)
                if not known:
                    assert rc == ("err", UnknownStreamError)
            if known:
                s = self.n.streams[sid]
                assert self.c.backlog(sid) == s["backlog"]
                assert self.c.deficit(sid) == s["deficit"]
                assert self.c.quantum(sid) == self.n.quantum(sid)
                assert self.c.priority(sid) == s["prio"]
                assert self.c.is_control(sid) == s["control"]
                # a visit keeps the credit it started with if the priority (or the base
                # quantum) drops mid-visit
                assert 0 <= s["deficit"] <= self.n.max_base * 16
        assert self.c.active_count() == self.m.active_count() == self.n.active_count()
        assert self.c.base_quantum == self.m.base_quantum == self.n.base


DrrComparison.TestCase.settings = settings(
    max_examples=examples(80), stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDrrComparison = DrrComparison.TestCase


class HugeDrrComparison(RuleBasedStateMachine):
    """Huge backlogs and budgets (whole-round fast-forward): C and model only."""

    def __init__(self) -> None:
        super().__init__()
        self.c: Any = None

    @initialize(base=st.integers(1, 1 << 20))
    def init(self, base: int) -> None:
        self.c = cnative.DrrTable(base)
        self.m = pynative.DrrTable(base)
        self.ids: list[int] = []

    def both(self, name: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        rc = outcome(lambda: getattr(self.c, name)(*args, **kwargs))
        rm = outcome(lambda: getattr(self.m, name)(*args, **kwargs))
        assert rc == rm, (name, args, rc, rm)
        return rc

    @rule(sid=st.integers(0, 30), prio=st.integers(0, 15), control=st.booleans())
    def add(self, sid: int, prio: int, control: bool) -> None:
        if self.both("add", sid, prio, control=control)[0] == "ok":
            self.ids.append(sid)

    @rule(data=st.data())
    def set_backlog(self, data: st.DataObject) -> None:
        if self.ids:
            sid = data.draw(st.sampled_from(self.ids))
            n = data.draw(st.one_of(st.integers(0, MAX_BYTES), st.integers(0, 1 << 24)))
            self.both("set_backlog", sid, n)

    @rule(data=st.data())
    def set_priority(self, data: st.DataObject) -> None:
        if self.ids:
            self.both("set_priority", data.draw(st.sampled_from(self.ids)),
                      data.draw(st.integers(0, 15)))

    @rule(base=st.integers(1, 1 << 20))
    def set_base_quantum(self, base: int) -> None:
        assert self.both("set_base_quantum", base) == ("ok", None)

    @rule(budget=st.one_of(st.integers(0, MAX_BYTES), st.integers(0, 1 << 26)))
    def schedule(self, budget: int) -> None:
        kind, grants = self.both("schedule", budget)
        assert kind == "ok"
        assert sum(g for _, g in grants) <= budget

    @invariant()
    def tables_agree(self) -> None:
        if self.c is None:
            return
        for sid in self.ids:
            assert self.both("backlog", sid) == ("ok", self.m.backlog(sid))
            assert self.both("deficit", sid) == ("ok", self.m.deficit(sid))


HugeDrrComparison.TestCase.settings = settings(
    max_examples=examples(40), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHugeDrrComparison = HugeDrrComparison.TestCase


# ---- fairness properties, both backends -------------------------------------------------


INFINITE = MAX_BYTES


def run(table: Any, calls: int, budget: Callable[[int], int],
        totals: dict[int, int] | None = None) -> dict[int, int]:
    totals = {} if totals is None else totals
    for i in range(calls):
        for sid, g in table.schedule(budget(i)):
            totals[sid] = totals.get(sid, 0) + g
    return totals


@pytest.mark.parametrize("mod", BACKENDS)
def test_equal_priorities_equal_shares(mod: Any) -> None:
    q = 1000
    t = mod.DrrTable(q)
    for sid in range(5):
        t.add(sid)
        t.set_backlog(sid, INFINITE)
    quantum = t.quantum(0)
    assert quantum == q * (PRIORITY_DEFAULT + 1)
    totals: dict[int, int] = dict.fromkeys(range(5), 0)
    for i in range(3000):  # small, uneven budgets: visits are cut mid-way all the time
        for sid, g in t.schedule(1 + (i * 7919) % 3000):
            totals[sid] += g
        assert max(totals.values()) - min(totals.values()) <= quantum


@pytest.mark.parametrize("mod", BACKENDS)
def test_weighted_shares_follow_priority_plus_one(mod: Any) -> None:
    t = mod.DrrTable(512)
    prios = {10: 0, 11: 1, 12: 3, 13: 7, 14: 15}
    for sid, prio in prios.items():
        t.add(sid, prio)
        t.set_backlog(sid, INFINITE)
    totals = run(t, 4000, lambda i: 100 + (i * 104729) % 20000)
    grand = sum(totals.values())
    weight = sum(p + 1 for p in prios.values())
    for sid, prio in prios.items():
        fair = grand * (prio + 1) / weight
        assert abs(totals[sid] - fair) <= t.quantum(14), (sid, totals[sid], fair)


@pytest.mark.parametrize("mod", BACKENDS)
def test_idle_stream_banks_no_credit(mod: Any) -> None:
    t = mod.DrrTable(1000)
    t.add(1)
    t.add(2)
    q = t.quantum(1)
    t.set_backlog(1, INFINITE)
    run(t, 500, lambda i: 700)  # stream 2 idle all along
    assert t.deficit(2) == 0
    t.set_backlog(2, INFINITE)
    totals = run(t, 2000, lambda i: 300)
    assert abs(totals[1] - totals[2]) <= q  # no catching up for the idle time
    # A stream that runs dry mid-visit forfeits the rest of its deficit.
    t.set_backlog(1, 0)
    t.set_backlog(2, 0)
    t.set_backlog(1, 10)
    assert t.schedule(q) == [(1, 10)]
    assert t.deficit(1) == 0 and 1 in t and t.backlog(1) == 0


@pytest.mark.parametrize("mod", BACKENDS)
def test_control_first_under_saturation(mod: Any) -> None:
    t = mod.DrrTable(100)
    for sid in range(10):
        t.add(sid, 15)
        t.set_backlog(sid, INFINITE)
    t.add(100, 2, control=True)
    t.add(101, 9, control=True)
    t.add(102, 9, control=True)
    t.set_backlog(100, 500)
    t.set_backlog(101, 300)
    t.set_backlog(102, 300)
    assert t.schedule(400) == [(101, 300), (102, 100)]  # priority, then order of addition
    assert t.schedule(400) == [(102, 200), (100, 200)]
    grants = t.schedule(1000)
    assert grants[0] == (100, 300)
    assert sum(g for _, g in grants) == 1000
    assert t.deficit(100) == 0
    t.set_priority(100, 12)
    t.set_backlog(100, 5)
    t.set_backlog(101, 5)
    assert t.schedule(1)[0] == (100, 1)


@pytest.mark.parametrize("mod", BACKENDS)
def test_no_starvation(mod: Any) -> None:
    t = mod.DrrTable(100)
    for sid in range(20):
        t.add(sid, 15)
        t.set_backlog(sid, INFINITE)
    t.add(99, 0)
    t.set_backlog(99, INFINITE)
    totals = run(t, 200, lambda i: 1000)  # one full round is 20*1600 + 100 bytes
    assert totals.get(99, 0) >= 100


@pytest.mark.parametrize("mod", BACKENDS)
def test_huge_budget_drains_everything_at_once(mod: Any) -> None:
    t = mod.DrrTable(1)  # the smallest quantum: one-by-one visiting would take forever
    sizes = {1: 10**15, 2: 3 * 10**14, 3: 7}
    for sid, n in sizes.items():
        t.add(sid, 0)
        t.set_backlog(sid, n)
    grants = t.schedule(MAX_BYTES)
    assert dict(grants) == sizes
    assert t.schedule(MAX_BYTES) == []
    assert [t.backlog(s) for s in sizes] == [0, 0, 0]


@pytest.mark.parametrize("mod", BACKENDS)
def test_remove_and_reuse(mod: Any) -> None:
    t = mod.DrrTable()
    for sid in range(2000):  # grows the C table several times
        t.add(sid * 7919, sid % 16, control=sid % 50 == 0)
    assert len(t) == 2000
    for sid in range(0, 2000, 2):
        t.remove(sid * 7919)
    assert len(t) == 1000 and 7919 in t and 0 not in t
    for sid in range(0, 2000, 2):
        t.add(sid * 7919 + 1)
        t.set_backlog(sid * 7919 + 1, 5)
    assert len(t) == 2000
    assert sum(g for _, g in t.schedule(MAX_BYTES)) == 5000


@pytest.mark.parametrize("mod", BACKENDS)
def test_release(mod: Any) -> None:
    t = mod.DrrTable()
    t.add(1)
    t.release()
    t.release()
    assert len(t) == 0 and 1 not in t
    for call in (lambda: t.add(2), lambda: t.remove(1), lambda: t.set_backlog(1, 1),
                 lambda: t.schedule(10), lambda: t.backlog(1), lambda: t.set_priority(1, 2)):
        with pytest.raises(DrrReleasedError):
            call()
    with mod.DrrTable() as t2:
        t2.add(3)
    assert len(t2) == 0


# ---- argument validation: typed errors, raised before any C call --------------------


def _bad_calls() -> list[tuple[str, Callable[[Any], Any], type[Exception]]]:
    return [
        ("add id -1", lambda t: t.add(-1), ValueError),
        ("add id 2**64", lambda t: t.add(U64_MAX + 1), ValueError),
        ("add id str", lambda t: t.add("1"), TypeError),
        ("add id bool", lambda t: t.add(True), TypeError),
        ("add id float", lambda t: t.add(1.0), TypeError),
        ("add priority 16", lambda t: t.add(5, 16), ValueError),
        ("add priority -1", lambda t: t.add(5, -1), ValueError),
        ("add priority str", lambda t: t.add(5, "high"), TypeError),
        ("add control str", lambda t: t.add(5, control="yes"), TypeError),
        ("set_priority 99", lambda t: t.set_priority(1, 99), ValueError),
        ("set_backlog -1", lambda t: t.set_backlog(1, -1), ValueError),
        ("set_backlog 2**63", lambda t: t.set_backlog(1, MAX_BYTES + 1), ValueError),
        ("set_backlog float", lambda t: t.set_backlog(1, 2.0), TypeError),
        ("set_backlog id -5", lambda t: t.set_backlog(-5, 1), ValueError),
        ("schedule -1", lambda t: t.schedule(-1), ValueError),
        ("schedule 2**63", lambda t: t.schedule(MAX_BYTES + 1), ValueError),
        ("schedule None", lambda t: t.schedule(None), TypeError),
        ("remove str", lambda t: t.remove("1"), TypeError),
        ("backlog -1", lambda t: t.backlog(-1), ValueError),
    ]


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize(("call", "exc"), [pytest.param(c, e, id=i) for i, c, e in _bad_calls()])
def test_bad_arguments(mod: Any, call: Callable[[Any], Any], exc: type[Exception],
                       c_calls: list[str]) -> None:  # noqa: F811 - fixture
    t = mod.DrrTable()
    t.add(1)
    c_calls.clear()
    with pytest.raises(exc):
        call(t)
    assert c_calls == []
    assert len(t) == 1
    t.set_backlog(1, 5)
    assert c_calls == (["qn_drr_count", "_drr_set_backlog"] if mod is cnative else [])


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize(("base", "exc"), [(0, ValueError), (-5, ValueError),
                                           ((1 << 30) + 1, ValueError), ("1", TypeError),
                                           (1.5, TypeError)])
def test_bad_base_quantum(mod: Any, base: Any, exc: type[Exception],
                          c_calls: list[str]) -> None:  # noqa: F811 - fixture
    with pytest.raises(exc):
        mod.DrrTable(base)
    assert c_calls == []


@pytest.mark.parametrize("mod", BACKENDS)
def test_state_errors_are_typed(mod: Any) -> None:
    t = mod.DrrTable()
    t.add(1)
    with pytest.raises(DuplicateStreamError):
        t.add(1, 3)
    with pytest.raises(UnknownStreamError):
        t.remove(2)
    with pytest.raises(KeyError):  # UnknownStreamError is a KeyError
        t.set_backlog(2, 1)
    with pytest.raises(DrrError):
        t.deficit(2)
    assert "x" not in t and -1 not in t and U64_MAX + 1 not in t and True not in t
    assert str(UnknownStreamError("unknown stream 2")) == "unknown stream 2"


# ---- a new stream is served next; the quantum follows the cap ----------------------------


@pytest.mark.parametrize("mod", BACKENDS)
def test_new_stream_is_served_by_the_next_call(mod: Any) -> None:
    t = mod.DrrTable(1000)
    t.add(1, 15)  # bulk, quantum 16000
    t.set_backlog(1, INFINITE)
    assert t.schedule(500) == [(1, 500)]  # its visit is in progress (15500 credit left)
    t.add(2, 0)
    t.set_backlog(2, 5000)  # first activation: ahead of the unfinished visit
    assert t.schedule(500) == [(2, 500)]
    assert t.schedule(600) == [(2, 500), (1, 100)]  # 2's quantum spent: 1 resumes
    assert t.deficit(1) == 15400  # the preempted visit kept its credit
    t.schedule(15400)
    assert t.deficit(1) == 0
    # A later activation (after going idle) joins at the tail like any other.
    t.set_backlog(2, 0)
    t.schedule(100)
    t.set_backlog(2, 5000)
    assert t.schedule(100) == [(1, 100)]


@pytest.mark.parametrize("mod", BACKENDS)
def test_base_quantum_change_keeps_weights(mod: Any) -> None:
    t = mod.DrrTable(16384)
    for sid, prio in ((1, 0), (2, 4)):
        t.add(sid, prio)
        t.set_backlog(sid, INFINITE)
    t.set_base_quantum(1350)
    assert (t.quantum(1), t.quantum(2), t.base_quantum) == (1350, 6750, 1350)
    assert t.active_count() == 2
    totals = run(t, 600, lambda i: 1000)
    assert totals[2] == pytest.approx(5 * totals[1], rel=0.02)
    with pytest.raises(ValueError):
        t.set_base_quantum(0)
    t.release()
    assert t.active_count() == 0
    with pytest.raises(DrrReleasedError):
        t.set_base_quantum(10)
