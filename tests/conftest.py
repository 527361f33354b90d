"""Shared fixtures: real agents on UDP loopback, started by the tests themselves."""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from quelay.agent import Agent, AgentConfig
from quelay.agent.filehash import hash_file
from quelay.identity import load_or_create_identity
from quelay.transport.memory import MemoryNetwork


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
