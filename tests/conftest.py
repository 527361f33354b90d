"""Shared fixtures: real agents on UDP loopback, started by the tests themselves."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from quelay.agent import Agent, AgentConfig
from quelay.agent.agent import StateDirLocked, lock_state_dir
from quelay.agent.filehash import hash_file
from quelay.identity import load_or_create_identity
from quelay.transport.memory import MemoryNetwork

# -- where tests write, how they are scheduled ----------------------------------------------

RAM_TEMP = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    """Tests' temporary directories in RAM (tmpfs at /dev/shm) when there is room.

    The agents fsync what they journal and receive; on a disk each fsync costs
    milliseconds of real time, and on the mock clock time stands still meanwhile, so a
    transfer of a few hundred files waited seconds for the disk. What the tests prove
    does not depend on the medium (power loss is not simulated; kill -9 leaves the page
    cache). Only when nothing chose already: ``--basetemp``, ``PYTEST_DEBUG_TEMPROOT``
    (pytest's documented root for ``tmp_path``; set it to opt out) or ``TMPDIR``. The
    xdist controller decides; workers get their directories from it.
    """
    if (hasattr(config, "workerinput") or config.option.basetemp
            or "PYTEST_DEBUG_TEMPROOT" in os.environ or "TMPDIR" in os.environ):
        return
    try:
        roomy = (RAM_TEMP.is_dir() and os.access(RAM_TEMP, os.W_OK)
                 and shutil.disk_usage(RAM_TEMP).free >= 2 << 30)
    except OSError:
        return
    if roomy:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(RAM_TEMP)


DURATIONS_KEY = "quelay/durations"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than the usable cores. Many tests wait on real time
    (a rate cap, a dead-link bound, a process starting); the spare worker uses a core
    meanwhile. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return len(os.sched_getaffinity(0)) + 1


# Where most of a run's time goes (seconds of tests each): the order of a run without
# the previous run's durations. A prior only; the cache's figures replace it.
SLOW_FILES = frozenset({
    "test_hub.py", "test_nat_netns.py", "test_rate_e2e.py", "test_recovery_e2e.py",
    "test_rendezvous_e2e.py", "test_restart.py", "test_scale.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist workers: the longest tests first, dealt round-robin across the workers.

    ``--dist worksteal`` gives each worker one contiguous share of this list and lets an
    idle worker take the tail of another's share, so every share starts with its part of
    the slow tests and ends with quick ones: the last test to finish is a short one, not
    a 5 s test that one worker started late. Durations are those of the previous run (in
    pytest's cache, written by the controller below). Without them (a fresh checkout)
    the tests of ``SLOW_FILES`` go first. The controller reads the durations once and
    hands every worker the same copy (xdist aborts a run whose workers collected
    different orders).
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    known: dict[str, float] = workerinput.get(DURATIONS_KEY) or {}

    def weight(item: pytest.Item) -> float:
        if known:
            return known.get(item.nodeid, 0.0)
        return 1.0 if item.nodeid.split("::")[0].rsplit("/", 1)[-1] in SLOW_FILES else 0.0

    workers = int(workerinput["workercount"])
    ranked = sorted(range(len(items)), key=lambda i: -weight(items[i]))
    shares: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for rank, index in enumerate(ranked):
        shares[rank % workers].append(items[index])
    items[:] = [item for share in shares for item in share]


_previous: list[dict[str, float]] = []  # the controller's one reading of the cache
_durations: dict[str, float] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller, once per worker: the previous run's durations, read once."""
    if not _previous:
        cache = getattr(node.config, "cache", None)
        _previous.append(cache.get(DURATIONS_KEY, {}) if cache is not None else {})
    node.workerinput[DURATIONS_KEY] = _previous[0]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller (or a run without xdist) keeps each test's duration for the next
    run's order; tests not run this time keep their previous figure."""
    cache = getattr(session.config, "cache", None)
    if hasattr(session.config, "workerinput") or cache is None or not _durations:
        return
    known: dict[str, float] = cache.get(DURATIONS_KEY, {})
    known.update({k: round(v, 3) for k, v in _durations.items()})
    cache.set(DURATIONS_KEY, known)


# -- hypothesis -----------------------------------------------------------------------------

HYPOTHESIS_SCALE = float(os.environ.get("QUELAY_HYPOTHESIS_SCALE", "1"))


def examples(count: int) -> int:
    """Examples per run of a randomized (not derandomized) Hypothesis test: every run
    draws new ones, so the suite keeps a count that is quick; ``QUELAY_HYPOTHESIS_SCALE``
    multiplies it for a deep run (``QUELAY_HYPOTHESIS_SCALE=20 pytest tests/test_native_drr.py``).
    """
    return max(1, round(count * HYPOTHESIS_SCALE))


# -- agents ---------------------------------------------------------------------------------


@dataclass
class Site:
    agent: Agent
    root: Path

    @property
    def control(self) -> Path:
        return self.agent.config.control

    @property
    def inbox(self) -> Path:
        return self.agent.config.inbox


@dataclass
class Pair:
    a: Site  # listens
    b: Site  # dials


def site_config(root: Path, **overrides: Any) -> AgentConfig:
    fields: dict[str, Any] = {
        "name": root.name,
        "state_dir": root / "state",
        "inbox": root / "inbox",
        "control": root / "control.sock",
        "reconnect_interval": 0.2,
    }
    fields.update(overrides)
    return AgentConfig(**fields)


async def start_pair(
    nursery: trio.Nursery, tmp_path: Path, *, trust_a: list[str] | None = None,
    trust_b: list[str] | None = None, wait_up: bool = True, **overrides: Any
) -> Pair:
    """Start a listening agent A and a dialling agent B that pin each other."""
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    agent_a = Agent(site_config(root_a, listen=("127.0.0.1", 0),
                                trust=[fp_b] if trust_a is None else trust_a, **overrides))
    await nursery.start(agent_a.run)
    agent_b = Agent(site_config(root_b, peer=agent_a.udp_address,
                                trust=[fp_a] if trust_b is None else trust_b, **overrides))
    await nursery.start(agent_b.run)
    pair = Pair(Site(agent_a, root_a), Site(agent_b, root_b))
    if wait_up:
        await wait_for(lambda: agent_a.link_state == "up" and agent_b.link_state == "up")
    return pair


async def attach_reader(agent: Agent, transfer_id: str,
                        poll: float = 0.01) -> tuple[Any, trio.abc.Stream]:
    """Once incoming stream ``transfer_id`` arrives, claim it as a client's reader would and
    attach one end of an in-memory stream; returns the transfer and the reader's end."""
    while transfer_id not in agent.transfers:
        await trio.sleep(poll)
    t_in = agent.transfers[transfer_id]
    t_in.claimed = t_in.attached = True
    reader, agent_side = trio.testing.memory_stream_pair()
    inp = agent.book.runtime(t_in).inp
    assert inp is not None
    inp.attach(agent_side)
    return t_in, reader


async def start_memory_pair(nursery: trio.Nursery, tmp_path: Path, net: MemoryNetwork,
                            **overrides: Any) -> tuple[Agent, Agent]:
    """Agent A listening on 10.0.0.1:4433 and B dialling it, both on ``net`` (no UDP).

    Run it on Trio's mock clock (the ``mock_clock`` fixture): outages and timeouts cost
    no wall time. The control sockets are real Unix sockets, served by the same run.
    """
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    a = Agent(site_config(root_a, listen=("10.0.0.1", 4433), trust=[fp_b], **overrides),
              socket_factory=net.socket)
    b = Agent(site_config(root_b, peer=("10.0.0.1", 4433), trust=[fp_a], **overrides),
              socket_factory=net.socket)
    nursery.start_soon(net.run)
    await nursery.start(a.run)
    await nursery.start(b.run)
    await wait_for(lambda: a.link_state == "up" and b.link_state == "up")
    return a, b


async def wait_stopped(agent: Agent, timeout: float = 30.0) -> None:
    """Wait until a shut-down ``agent`` has let go of its state directory (its run has
    returned, its UDP socket is closed): only then can an agent restart on the same
    directory and port. Its control socket disappears earlier, while the run unwinds."""

    def released() -> bool:
        try:
            os.close(lock_state_dir(agent.config.state_dir))
        except StateDirLocked:
            return False
        return True

    await wait_for(released, timeout)


async def wait_for(condition: Any, timeout: float = 30.0, poll: float = 0.01) -> None:
    """Wait for a condition on live state (not for time to pass); fail loudly on timeout.

    On a mock clock the bound is wall time: ``autojump_clock`` jumps ahead while a
    worker thread runs, by as much as the timers allow (``mock_clock`` does not).
    """
    if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(poll)
        return
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise trio.TooSlowError(f"condition not met within {timeout} s of wall time")
        await trio.sleep(poll)


@pytest.fixture
def mock_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Trio's mock clock for agents on the in-memory network: it jumps to the next deadline
    when every task waits, but never while a worker thread (an fsync, a hash) runs.

    ``autojump_clock`` also jumps while a thread works, by as many deadlines as the
    thread's real duration allows (under load, minutes of mock time in one slow fsync),
    so how far a peer gets meanwhile, or whether a mock-time deadline passes, depends on
    the host. Here time stands still until the thread is done; so not for a test that
    holds a worker thread on purpose (a stuck disk) while mock time passes.
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    genuine = trio.to_thread.run_sync
    running = 0

    async def run_sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal running
        running += 1
        clock.autojump_threshold = math.inf
        try:
            return await genuine(fn, *args, **kwargs)
        finally:
            running -= 1
            if not running:
                clock.autojump_threshold = 0

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    return clock


@pytest.fixture
async def pair(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Pair]:
    yield await start_pair(nursery, tmp_path)


def sha256_file(path: Path) -> str:
    return str(hash_file(path).hexdigest())


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUELAY_CONTROL", raising=False)
    os.environ.setdefault("PYTHONHASHSEED", "0")
