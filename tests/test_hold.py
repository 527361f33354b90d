"""A connection held through an outage: reported down, kept, and replaced only when a
fresh one is really needed (the peer restarted meanwhile). Mock time, in-memory link."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.agent import Agent
from quelay.client import ClientError, open_client
from quelay.core import messages as wire
from quelay.core.codes import LinkState
from quelay.core.transfer import State, Transfer
from quelay.identity import load_or_create_identity
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, sha256_file, site_config, wait_for, wait_stopped

A_ADDRESS = ("10.0.0.1", 4433)


async def start_killable(nursery: trio.Nursery, agent: Agent) -> trio.CancelScope:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await agent.run(task_status=task_status)

    await nursery.start(run)
    return scope


def listener(root: Path, fp_b: str, net: MemoryNetwork, **overrides: Any) -> Agent:
    return Agent(site_config(root, listen=A_ADDRESS, trust=[fp_b], **overrides),
                 socket_factory=net.socket)


@dataclass
class Pair:
    a: Agent
    b: Agent
    scope_a: trio.CancelScope  # cancel it to kill A (kill -9: nothing is closed)
    root_a: Path
    fp_b: str


async def start_pair(nursery: trio.Nursery, tmp_path: Path, net: MemoryNetwork, *,
                     a: dict[str, Any] | None = None, b: dict[str, Any] | None = None) -> Pair:
    """A listening at A_ADDRESS (killable), B dialling it, both on ``net``."""
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    nursery.start_soon(net.run)
    agent_a = listener(root_a, fp_b, net, **(a or {}))
    scope_a = await start_killable(nursery, agent_a)
    agent_b = Agent(site_config(root_b, peer=A_ADDRESS, trust=[fp_a], **(b or {})),
                    socket_factory=net.socket)
    await nursery.start(agent_b.run)
    return Pair(agent_a, agent_b, scope_a, root_a, fp_b)


async def test_a_listener_restarted_during_the_outage_is_redialled(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """The held connection can never answer again (its peer forgot it): the dial
    attempts made while it is held reach the new listener, and that session replaces
    it; the file resumes from the listener's journal and arrives byte-exact."""
    net = MemoryNetwork(delay=0.1)
    pair = await start_pair(nursery, tmp_path, net, a={"rate": 2_000_000},
                            b={"rate": 2_000_000})
    a, b = pair.a, pair.b
    await wait_for(lambda: a.link_state is LinkState.UP and b.link_state is LinkState.UP)

    src = make_file(tmp_path / "f.bin", 1_000_000, seed=41)
    t = Transfer(wire.new_transfer_id(), "out", "file", "f.bin", 1_000_000, 4)
    t.path = str(src)
    b.book.submit(t)
    await wait_for(lambda: t.delivered > 200_000)
    net.down = True
    await wait_for(lambda: b.link_state is LinkState.DOWN)
    assert b.default.held()  # reported down, but the connection is kept
    assert b.default.session is not None and b.default.session.conn.closed is None
    pair.scope_a.cancel()  # the listener dies meanwhile (nothing reaches B: the link is down)
    await wait_stopped(a)
    a2 = listener(pair.root_a, pair.fp_b, net, rate=2_000_000)
    await start_killable(nursery, a2)
    await trio.sleep(5.0)
    net.down = False
    await wait_for(lambda: t.terminal, timeout=60)
    assert t.state is State.DONE, t.error_message
    assert sha256_file(a2.config.inbox / "f.bin") == sha256_file(src)
    assert b.link_ups == 2 and b.default.revivals == 0  # a new session, not a revival
    assert t.resumes >= 1


async def test_nothing_starts_on_a_held_connection_and_the_queue_keeps_its_order(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """Submitted while the connection is held: the transfers stay queued (so priority
    decides on the link's return), then start on the same connection."""
    net = MemoryNetwork(delay=0.1)
    pair = await start_pair(nursery, tmp_path, net, b={"max_concurrent": 1})
    a, b = pair.a, pair.b
    await wait_for(lambda: b.link_state is LinkState.UP)
    net.down = True
    await wait_for(lambda: b.link_state is LinkState.DOWN and a.link_state is LinkState.DOWN)
    assert b.default.held() and a.default.held()
    sent = []
    for name, priority in (("low", 1), ("high", 7)):
        src = make_file(tmp_path / name, 20_000, seed=priority)
        t = Transfer(wire.new_transfer_id(), "out", "file", name, 20_000, priority)
        t.path = str(src)
        b.book.submit(t)
        sent.append(t)
    await trio.sleep(3.0)
    assert [t.state for t in sent] == [State.PENDING, State.PENDING]
    async with open_client(b.config.control) as client:  # answered now, not after 30 s
        with pytest.raises(ClientError) as refused:
            await client.request("ls_remote")
    assert refused.value.code == "link_down"
    assert "exports are unknown" in refused.value.message  # refused, not timed out
    net.down = False
    low, high = sent
    await wait_for(lambda: high.state is not State.PENDING or low.state is not State.PENDING)
    assert high.state is State.ACTIVE and low.state is State.PENDING  # priority first
    await wait_for(lambda: all(t.terminal for t in sent), timeout=60)
    assert [t.state for t in sent] == [State.DONE, State.DONE]
    assert b.link_ups == 1 and b.default.revivals == 1
    assert a.link_ups == 1 and a.default.revivals == 1


class InitialCounter(MemoryNetwork):
    """The in-memory network, noting when each host sent a QUIC Initial (long header,
    type 0): how many a dial attempt costs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.initials: list[tuple[float, str]] = []

    def _send(self, src: Any, dst: Any, data: bytes) -> None:
        if data and data[0] & 0x80 and (data[0] & 0x30) >> 4 == 0:
            self.initials.append((trio.current_time(), src[0]))
        super()._send(src, dst, data)


async def test_dial_attempts_during_a_hold_send_one_initial_each(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """While the connection is held, the dialler tries fresh connections (the peer may
    have restarted). They start from the held connection's RTT: on a 1 s path an
    attempt is replaced after 1.2 RTT and its handshake timers are longer than that,
    so each attempt costs one Initial (unseeded, aioquic resends it after 0.2 s and
    0.6 s; bounded like an established connection's probes, after 1 s)."""
    net = InitialCounter(delay=0.5)
    b = (await start_pair(nursery, tmp_path, net)).b
    await wait_for(lambda: b.link_state is LinkState.UP, timeout=60)
    net.down = True
    await wait_for(lambda: b.link_state is LinkState.DOWN, timeout=60)
    start = trio.current_time()
    await trio.sleep(12.0)
    end = trio.current_time()
    net.down = False
    await wait_for(lambda: b.link_state is LinkState.UP, timeout=60)
    initials = [t for t, host in net.initials if host == "10.0.0.2" and start <= t < end]
    wait = b.default.probe_wait()
    assert wait >= 1.2  # 1.2 × the path's 1 s RTT
    assert 5 <= len(initials) <= 12.0 / wait + 1, (len(initials), wait)
    assert b.link_ups == 1 and b.default.revivals == 1  # and the held one carried on


async def test_keepalives_only_while_the_link_is_quiet(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """While a transfer flows each agent hears the other all the time (data one way,
    ACKs the other): no keep-alive PING is sent (each would cost the capped link its
    bytes and an ACK). Idle, they come back, about one per interval and side."""
    net = MemoryNetwork(delay=0.1)
    pair = await start_pair(nursery, tmp_path, net, a={"rate": 400_000}, b={"rate": 400_000})
    a, b = pair.a, pair.b
    await wait_for(lambda: b.link_state is LinkState.UP and a.link_state is LinkState.UP)
    conns = [a.default.session.conn, b.default.session.conn]  # type: ignore[union-attr]
    src = make_file(tmp_path / "f.bin", 600_000, seed=51)  # 12 s at the cap
    t = Transfer(wire.new_transfer_id(), "out", "file", "f.bin", 600_000, 4)
    t.path = str(src)
    b.book.submit(t)
    await wait_for(lambda: t.delivered > 50_000)
    pings = [c.pings_sent for c in conns]
    await wait_for(lambda: t.delivered > 500_000, timeout=60)  # ~9 s of flow
    assert [c.pings_sent for c in conns] == pings  # none while it flowed
    await wait_for(lambda: t.terminal, timeout=60)
    assert t.state is State.DONE
    idle = [c.pings_sent for c in conns]
    await trio.sleep(10.0)
    sent = [c.pings_sent - n for c, n in zip(conns, idle, strict=True)]
    assert sum(sent) >= 5 and all(n <= 10 for n in sent)  # about one a second between them
    assert a.link_state is LinkState.UP and b.link_state is LinkState.UP
