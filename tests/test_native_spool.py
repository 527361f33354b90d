"""Spool: the C module and the pure-Python model, side by side.

The differential tests import both backends explicitly, so they run (and need
the C module) in both CI passes, including QUELAY_PURE_PYTHON=1.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import quelay.native as native
from quelay.native import _cffi_backend as cnative
from quelay.native import _model as pynative
from quelay.native.errors import (
    SPOOL_MAX_CAPACITY,
    U64_MAX,
    NativeError,
    SpoolClosedError,
    SpoolError,
    SpoolRangeError,
    SpoolReleasedError,
)

from .conftest import examples

BACKENDS = [pytest.param(cnative, id="c"), pytest.param(pynative, id="python")]


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("err", exception type); memoryviews compared as bytes."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the type is what we compare
        return ("err", type(exc))
    if isinstance(result, memoryview):
        result = result.tobytes()
    return ("ok", result)


# ---- differential state machine ------------------------------------------------------


class SpoolComparison(RuleBasedStateMachine):
    """Drive C, model and a plain-bytes reference with the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.c: Any = None
        self.m: Any = None

    @initialize(capacity=st.one_of(st.integers(1, 64),
                                   st.sampled_from([100, 257, 4096, 5000, 9001, 20000])))
    def init(self, capacity: int) -> None:
        self.c = cnative.Spool(capacity)
        self.m = pynative.Spool(capacity)
        self.cap = capacity
        self.history = bytearray()  # every byte ever written, by absolute offset
        self.a = self.q = self.t = 0
        self.closed = False
        self.released = False

    def both(self, name: str, *args: Any) -> tuple[str, Any]:
        rc = outcome(lambda: getattr(self.c, name)(*args))
        rm = outcome(lambda: getattr(self.m, name)(*args))
        assert rc == rm, (name, args, rc, rm)
        return rc

    def expect_live(self, result: tuple[str, Any]) -> bool:
        if self.released:
            assert result == ("err", SpoolReleasedError)
            return False
        return True

    @rule(data=st.binary(max_size=150), kind=st.sampled_from(["bytes", "bytearray", "view"]))
    def write(self, data: bytes, kind: str) -> None:
        arg: Any = {"bytes": data, "bytearray": bytearray(data), "view": memoryview(data)}[kind]
        result = self.both("write", arg)
        if not self.expect_live(result):
            return
        if self.closed:
            assert result == ("err", SpoolClosedError)
            return
        n = min(len(data), self.cap - (self.t - self.a))
        assert result == ("ok", n)
        self.history += data[:n]
        self.t += n

    @rule(extra=st.integers(0, 2))
    def write_to_the_brim(self, extra: int) -> None:
        """Exactly the free space (or a little more): exercises full rings and wraps."""
        free = self.cap - (self.t - self.a)
        data = bytes((self.t + i) % 251 for i in range(free + extra))
        result = self.both("write", data)
        if self.expect_live(result) and not self.closed:
            assert result == ("ok", free)
            self.history += data[:free]
            self.t += free

    @rule(n=st.integers(0, 200))
    def read(self, n: int) -> None:
        result = self.both("read", n)
        if self.expect_live(result):
            k = min(n, self.t - self.q)
            assert result == ("ok", bytes(self.history[self.q:self.q + k]))
            self.q += k

    @rule(n=st.integers(0, 200), kind=st.sampled_from(["bytearray", "view"]))
    def readinto(self, n: int, kind: str) -> None:
        bufs = [bytearray(b"\xee" * n), bytearray(b"\xee" * n)]
        args = bufs if kind == "bytearray" else [memoryview(b) for b in bufs]
        rc = outcome(lambda: self.c.readinto(args[0]))
        rm = outcome(lambda: self.m.readinto(args[1]))
        assert rc == rm
        assert bufs[0] == bufs[1]
        if self.expect_live(rc):
            k = min(n, self.t - self.q)
            assert rc == ("ok", k)
            assert bufs[0][:k] == self.history[self.q:self.q + k]
            assert bufs[0][k:] == b"\xee" * (n - k)
            self.q += k

    @rule(n=st.integers(0, 200))
    def peek(self, n: int) -> None:
        size = self.c.allocated  # (the invariant checks both backends agree on it)
        result = self.both("peek", n)
        if self.expect_live(result):
            k = min(n, self.t - self.q, size - self.q % size) if size else 0
            assert result == ("ok", bytes(self.history[self.q:self.q + k]))

    @rule(delta=st.integers(-3, 3))
    def advance(self, delta: int) -> None:
        n = max(0, self.t - self.q + delta)
        result = self.both("advance", n)
        if self.expect_live(result):
            if n > self.t - self.q:
                assert result == ("err", SpoolRangeError)
            else:
                assert result == ("ok", None)
                self.q += n

    @rule(n=st.integers(0, 20))
    def advance_small(self, n: int) -> None:
        result = self.both("advance", n)
        if self.expect_live(result):
            if n > self.t - self.q:
                assert result == ("err", SpoolRangeError)
            else:
                self.q += n

    @rule(where=st.sampled_from(["a-1", "a", "q", "mid", "t", "t+1", "random", "huge"]),
          r=st.integers(0, 10_000))
    def ack(self, where: str, r: int) -> None:
        offset = {
            "a-1": max(0, self.a - 1), "a": self.a, "q": self.q,
            "mid": self.a + (self.t - self.a) // 2, "t": self.t, "t+1": self.t + 1,
            "random": r % (self.t + 3), "huge": U64_MAX + 1 + r,
        }[where]
        result = self.both("ack", offset)
        if self.expect_live(result):
            if offset > self.t:
                assert result == ("err", SpoolRangeError)
            else:
                assert result == ("ok", None)
                if offset > self.a:
                    self.a = offset
                    self.q = max(self.q, offset)

    @rule()
    def rewind(self) -> None:
        if self.expect_live(self.both("rewind")):
            self.q = self.a

    @rule()
    def close(self) -> None:
        if self.expect_live(self.both("close")):
            self.closed = True

    @precondition(lambda self: not self.released)
    @rule(coin=st.integers(0, 15))
    def release(self, coin: int) -> None:
        if coin == 0:  # rarely: everything after it must fail cleanly
            view_c, view_m = self.c.peek(8), self.m.peek(8)
            self.both("release")
            self.released = True
            # a view taken before release() still reads the same bytes
            expected = bytes(self.history[self.q:self.q + len(view_c)])
            assert view_c.tobytes() == view_m.tobytes() == expected

    @invariant()
    def offsets_agree(self) -> None:
        if self.c is None:
            return
        for s in (self.c, self.m):
            assert (s.acked, s.queued, s.tail) == (self.a, self.q, self.t)
            assert 0 <= s.acked <= s.queued <= s.tail
            assert s.tail - s.acked <= s.capacity == self.cap
            assert s.closed == self.closed
            assert s.released == self.released
            assert s.free == self.cap - (self.t - self.a)
            assert s.pending == self.t - self.q
            assert s.unacked == self.t - self.a
            assert s.eof == (self.closed and self.q == self.t)
            assert s.done == (self.closed and self.a == self.t)
            # memory follows the bytes held: a ring that fits them, never beyond the cap
            if self.released or self.t == self.a:
                assert s.allocated == 0
            else:
                assert self.t - self.a <= s.allocated <= self.cap
        assert self.c.allocated == self.m.allocated


SpoolComparison.TestCase.settings = settings(
    max_examples=examples(80), stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpoolComparison = SpoolComparison.TestCase


# ---- targeted behaviour, both backends ---------------------------------------------


@pytest.mark.parametrize("mod", BACKENDS)
def test_wrap_around_and_back_pressure(mod: Any) -> None:
    s = mod.Spool(8)
    assert s.write(b"abcdefghij") == 8  # only what fits
    assert s.write(b"x") == 0  # full: back-pressure
    assert s.read(5) == b"abcde"
    assert s.write(b"zz") == 0  # reading does not free space, acking does
    s.ack(5)
    assert s.write(b"VWXYZ") == 5  # wraps at the ring's end
    assert bytes(s.peek(100)) == b"fgh"  # contiguous part only
    assert s.read(100) == b"fghVWXYZ"  # gathered across the wrap
    assert s.pending == 0 and s.unacked == 8 and s.free == 0
    s.rewind()
    buf = bytearray(16)
    assert s.readinto(buf) == 8 and bytes(buf[:8]) == b"fghVWXYZ"
    s.ack(13)
    assert (s.acked, s.queued, s.tail, s.free) == (13, 13, 13, 8)


@pytest.mark.parametrize("mod", BACKENDS)
def test_ack_overtakes_rewound_queue(mod: Any) -> None:
    s = mod.Spool(100)
    s.write(b"x" * 50)
    s.read(40)
    s.rewind()
    assert s.queued == 0
    s.ack(30)  # the peer had those bytes after all
    assert (s.acked, s.queued) == (30, 30)
    s.ack(10)  # stale: ignored
    assert (s.acked, s.queued) == (30, 30)
    with pytest.raises(SpoolRangeError):
        s.ack(51)
    assert (s.acked, s.queued, s.tail) == (30, 30, 50)


@pytest.mark.parametrize("mod", BACKENDS)
def test_close_eof_done(mod: Any) -> None:
    s = mod.Spool(16)
    s.write(b"hello")
    s.close()
    s.close()  # idempotent
    assert s.closed and not s.eof and not s.done
    with pytest.raises(SpoolClosedError):
        s.write(b"more")
    with pytest.raises(SpoolClosedError):
        s.write(b"")
    assert s.read(10) == b"hello"
    assert s.eof and not s.done
    s.rewind()
    assert not s.eof
    s.advance(5)
    s.ack(5)
    assert s.eof and s.done


@pytest.mark.parametrize("mod", BACKENDS)
def test_advance_beyond_tail(mod: Any) -> None:
    s = mod.Spool(16)
    s.write(b"abc")
    with pytest.raises(SpoolRangeError):
        s.advance(4)
    with pytest.raises(SpoolRangeError):
        s.advance(U64_MAX + 10)
    s.advance(3)
    assert s.queued == 3


@pytest.mark.parametrize("mod", BACKENDS)
def test_accepts_any_contiguous_buffer(mod: Any) -> None:
    import array

    s = mod.Spool(64)
    assert s.write(array.array("H", [1, 2, 3])) == 6  # counted in bytes
    assert s.write(memoryview(b"abcdef")[2:]) == 4
    assert s.read(64) == array.array("H", [1, 2, 3]).tobytes() + b"cdef"
    s.write(b"0123456789")
    out = array.array("I", [0, 0])
    assert s.readinto(out) == 8 and out.tobytes() == b"01234567"
    assert s.readinto(memoryview(bytearray(10))[:0]) == 0


@pytest.mark.parametrize("mod", BACKENDS)
def test_release_and_views(mod: Any) -> None:
    s = mod.Spool(32)
    s.write(b"keep me")
    view = s.peek(100)
    s.release()
    s.release()  # idempotent
    assert s.released
    assert view.tobytes() == b"keep me"  # still safe to read
    assert view.readonly
    assert (s.acked, s.queued, s.tail, s.capacity) == (0, 0, 7, 32)
    for call in (lambda: s.write(b"x"), lambda: s.read(1), lambda: s.peek(1),
                 lambda: s.readinto(bytearray(1)), lambda: s.advance(0), lambda: s.ack(0),
                 lambda: s.ack(U64_MAX + 1), s.rewind, s.close):
        with pytest.raises(SpoolReleasedError):
            call()
    with mod.Spool(8) as s2:
        s2.write(b"a")
    assert s2.released
    # A view outliving its spool keeps the memory alive (C: ffi.gc runs later).
    s3 = mod.Spool(8)
    s3.write(b"abc")
    v3 = s3.peek(3)
    del s3
    gc.collect()
    assert v3.tobytes() == b"abc"


@pytest.mark.parametrize("mod", BACKENDS)
def test_offset_space_exhaustion(mod: Any) -> None:
    s = mod.Spool(10)
    if mod is cnative:
        s._p.acked = s._p.queued = s._p.tail = U64_MAX - 2
    else:
        s._acked = s._queued = s._tail = U64_MAX - 2
    with pytest.raises(SpoolRangeError):
        s.write(b"12345")
    assert s.write(b"12") == 2 and s.tail == U64_MAX
    with pytest.raises(SpoolRangeError):
        s.write(b"3")
    with pytest.raises(SpoolRangeError):
        s.ack(U64_MAX + 1)
    s.ack(U64_MAX)
    assert s.acked == U64_MAX


@pytest.mark.parametrize("mod", BACKENDS)
def test_big_transfer_content(mod: Any) -> None:
    """Megabytes through a small ring with unaligned chunks: nothing lost or reordered."""
    import random

    rng = random.Random(7)
    src = rng.randbytes(1 << 20)
    s = mod.Spool(4099)
    sent = 0
    out = bytearray()
    buf = bytearray(3000)
    while len(out) < len(src):
        sent += s.write(memoryview(src)[sent:sent + rng.randint(1, 5000)])
        n = s.readinto(memoryview(buf)[:rng.randint(0, 3000)])
        out += buf[:n]
        s.ack(len(out) - rng.randint(0, min(len(out), 100)))
        if rng.random() < 0.05:  # link loss: replay from A
            s.rewind()
            del out[s.acked:]
    assert bytes(out) == src


# ---- argument validation: typed errors, raised before any C call --------------------


class _CallRecorder:
    def __init__(self, target: Any, calls: list[str]) -> None:
        self._target = target
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value):
            def record(*args: Any) -> Any:
                self._calls.append(name)
                return value(*args)
            return record
        return value


@pytest.fixture
def c_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every call the cffi wrapper makes into C."""
    calls: list[str] = []
    monkeypatch.setattr(cnative, "lib", _CallRecorder(cnative.lib, calls))
    for alias in [n for n in vars(cnative) if n.startswith(("_spool_", "_drr_"))]:
        fn = getattr(cnative, alias)

        def record(*args: Any, _fn: Any = fn, _name: str = alias) -> Any:
            calls.append(_name)
            return _fn(*args)

        monkeypatch.setattr(cnative, alias, record)
    yield calls


BAD_CAPACITIES = [
    ("10", TypeError), (1.5, TypeError), (None, TypeError), (True, TypeError),
    (0, ValueError), (-1, ValueError), (SPOOL_MAX_CAPACITY + 1, ValueError),
]


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize(("capacity", "exc"), BAD_CAPACITIES)
def test_bad_capacity(mod: Any, capacity: Any, exc: type[Exception], c_calls: list[str]) -> None:
    with pytest.raises(exc):
        mod.Spool(capacity)
    assert c_calls == []


def _bad_calls() -> list[tuple[str, Callable[[Any], Any], type[Exception]]]:
    noncontig = memoryview(bytearray(b"abcdef"))[::2]
    return [
        ("write str", lambda s: s.write("text"), TypeError),
        ("write int", lambda s: s.write(5), TypeError),
        ("write list", lambda s: s.write([1, 2]), TypeError),
        ("write None", lambda s: s.write(None), TypeError),
        ("write non-contiguous", lambda s: s.write(noncontig), TypeError),
        ("peek -1", lambda s: s.peek(-1), ValueError),
        ("peek str", lambda s: s.peek("1"), TypeError),
        ("peek float", lambda s: s.peek(1.0), TypeError),
        ("read -1", lambda s: s.read(-1), ValueError),
        ("read None", lambda s: s.read(None), TypeError),
        ("readinto bytes", lambda s: s.readinto(b"abc"), TypeError),
        ("readinto str", lambda s: s.readinto("abc"), TypeError),
        ("readinto non-contiguous", lambda s: s.readinto(noncontig), TypeError),
        ("readinto read-only view", lambda s: s.readinto(memoryview(b"ab")), TypeError),
        ("advance -1", lambda s: s.advance(-1), ValueError),
        ("advance bool", lambda s: s.advance(True), TypeError),
        ("ack -1", lambda s: s.ack(-1), ValueError),
        ("ack float", lambda s: s.ack(1.0), TypeError),
        ("ack str", lambda s: s.ack("3"), TypeError),
    ]


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize(("call", "exc"), [pytest.param(c, e, id=i) for i, c, e in _bad_calls()])
def test_bad_arguments(mod: Any, call: Callable[[Any], Any], exc: type[Exception],
                       c_calls: list[str]) -> None:
    s = mod.Spool(16)
    s.write(b"abc")
    s.peek(0)  # (the first view of a ring borrows it from C: one more call)
    before = (s.acked, s.queued, s.tail)
    c_calls.clear()
    with pytest.raises(exc):
        call(s)
    assert c_calls == []  # rejected before crossing into C
    assert (s.acked, s.queued, s.tail) == before
    s.peek(1)
    assert c_calls == (["_spool_peek"] if mod is cnative else [])  # the recorder works


def test_exception_hierarchy() -> None:
    from quelay.errors import QuelayError

    for exc in (SpoolClosedError, SpoolRangeError, SpoolReleasedError):
        assert issubclass(exc, SpoolError)
        assert issubclass(exc, NativeError)
        assert issubclass(exc, QuelayError)


# ---- backend selection -----------------------------------------------------------------


def test_backend_matches_environment() -> None:
    backend = native.BACKEND
    wanted = "python" if native.pure_python_requested() else "c"
    assert backend == wanted
    expected = pynative if wanted == "python" else cnative
    assert native.Spool is expected.Spool
    assert native.DrrTable is expected.DrrTable


def test_pure_python_flag_parsing() -> None:
    assert native.pure_python_requested({"QUELAY_PURE_PYTHON": "1"})
    assert native.pure_python_requested({"QUELAY_PURE_PYTHON": "true"})
    assert not native.pure_python_requested({})
    assert not native.pure_python_requested({"QUELAY_PURE_PYTHON": "0"})
    with pytest.raises(ImportError):
        native.pure_python_requested({"QUELAY_PURE_PYTHON": "maybe"})


def _import_in_subprocess(code: str, pure: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("QUELAY_PURE_PYTHON", None)
    if pure is not None:
        env["QUELAY_PURE_PYTHON"] = pure
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)


def test_missing_c_module_is_a_loud_import_error() -> None:
    hide = "import sys; sys.modules['quelay.native._quelay_native'] = None\n"
    r = _import_in_subprocess(hide + "import quelay.native", None)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "pip install -e ." in r.stderr
    # The model is used only when asked for explicitly.
    r = _import_in_subprocess(hide + "import quelay.native as n; print(n.BACKEND)", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "python"
