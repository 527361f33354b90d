"""Two agents meeting through the rendezvous relay on loopback: relayed and direct paths.

Relayed: each agent reaches the relay through the project's link simulator
(its upstream socket is connected to the relay, so punches cannot get through:
the agents try, fail and stay relayed). Direct: on bare loopback, punches work
and the client moves its connection to the peer's address.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from quelay.agent import Agent
from quelay.client import open_client
from quelay.identity import load_or_create_identity
from quelay.linksim.proxy import open_linksim
from quelay.rendezvous.protocol import AgentTokens, Refusal, Refused
from quelay.rendezvous.server import RendezvousServer

from .conftest import make_file, sha256_file, site_config, wait_for
from .test_transfers_e2e import send_and_wait, stream_across

SECRET = b"rendezvous-test-secret-0123456789"


@dataclass
class Meeting:
    a: Agent
    b: Agent
    relay: RendezvousServer

    @property
    def client(self) -> Agent:
        return self.a if self.a.rendezvous.client else self.b


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "rendezvous.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


async def start_agents(nursery: trio.Nursery, tmp_path: Path, relay_for: dict[str, Any],
                       **overrides: Any) -> tuple[Agent, Agent]:
    secret = secret_file(tmp_path)
    roots = {n: tmp_path / n for n in ("a", "b")}
    fps = {n: load_or_create_identity(r / "state").fingerprint for n, r in roots.items()}
    agents = []
    for n, other in (("a", "b"), ("b", "a")):
        agent = Agent(site_config(roots[n], rendezvous=relay_for[n], session="site-pair",
                                  rendezvous_secret_file=str(secret), trust=[fps[other]],
                                  **overrides))
        await nursery.start(agent.run)
        agents.append(agent)
    return agents[0], agents[1]


def both_up(a: Agent, b: Agent) -> bool:
    return a.link_state == "up" and b.link_state == "up"


@asynccontextmanager
async def relayed_meeting(nursery: trio.Nursery, tmp_path: Path,
                          **overrides: Any) -> AsyncIterator[Meeting]:
    relay = RendezvousServer(("127.0.0.1", 0), SECRET)
    await nursery.start(relay.run)
    async with open_linksim(upstream=relay.address, seed=1) as sim_a, \
            open_linksim(upstream=relay.address, seed=2) as sim_b:
        a, b = await start_agents(nursery, tmp_path, {"a": sim_a.address, "b": sim_b.address},
                                  **overrides)
        yield Meeting(a, b, relay)


async def test_files_and_streams_byte_exact_through_the_relay(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: Any) -> None:
    import quelay.rendezvous.link as link_mod

    monkeypatch.setattr(link_mod, "PUNCH_WINDOW", 1.0)  # fail sooner: the 3 s proves no more
    async with relayed_meeting(nursery, tmp_path) as m:
        await wait_for(lambda: both_up(m.a, m.b))
        # Punching cannot pass the simulators: both agents tried, and stay relayed.
        await wait_for(lambda: m.a.rendezvous.punch_failures >= 1
                       and m.b.rendezvous.punch_failures >= 1)
        assert m.a.status()["path"] == "relayed" and m.b.status()["path"] == "relayed"
        assert m.a.rendezvous.client != m.b.rendezvous.client
        assert m.client.fingerprint < (m.b if m.client is m.a else m.a).fingerprint

        relayed_before = m.relay.table.counters.relayed_bytes
        src = make_file(tmp_path / "through-relay.bin", 2 * 1024 * 1024 + 17, seed=3)
        final = await send_and_wait(m.a.config.control, src)
        assert final["state"] == "done"
        assert sha256_file(m.b.config.inbox / src.name) == sha256_file(src)
        sent, got, _ = await stream_across(m.b.config.control, m.a.config.control,
                                           1024 * 1024 + 5, 11, "relayed-stream")
        assert sent == got
        # Every byte went through the relay, as QUIC ciphertext (no plaintext there).
        assert m.relay.table.counters.relayed_bytes - relayed_before > 3 * 1024 * 1024 + 22
        assert m.a.status()["path"] == "relayed" and m.b.status()["path"] == "relayed"
        ups = (m.a.link_ups, m.b.link_ups)
        await refuse_intruders(m)
        assert (m.a.link_ups, m.b.link_ups) == ups  # the session in progress is untouched
        src2 = make_file(tmp_path / "after-intruders.bin", 300_000, seed=4)
        final = await send_and_wait(m.b.config.control, src2)
        assert final["state"] == "done"
        assert sha256_file(m.a.config.inbox / src2.name) == sha256_file(src2)


async def refuse_intruders(m: Meeting) -> None:
    """A third agent and a forger ask the live relay to join: both refused, counted."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    with sock:
        third = AgentTokens(SECRET, "site-pair", "sha256:" + "0" * 64)
        forger = AgentTokens(b"not the secret at all", "site-pair", m.a.fingerprint)
        for tokens, code in ((third, Refusal.SESSION_FULL), (forger, Refusal.BAD_TOKEN)):
            await sock.sendto(tokens.register(time.time()), m.relay.address)
            with trio.fail_after(5):
                data, _ = await sock.recvfrom(4096)
            ev = tokens.receive_untrusted(data, m.relay.address, time.time())
            assert isinstance(ev, Refused) and ev.code is code
        # QUIC-looking bytes from the intruder's address are not relayed to anyone.
        before = m.relay.table.counters.dropped_datagrams
        await sock.sendto(b"\xc0" + bytes(1199), m.relay.address)
        await wait_for(lambda: m.relay.table.counters.dropped_datagrams > before)
    refusals = m.relay.table.counters.refusals
    assert refusals["session_full"] >= 1 and refusals["bad_token"] >= 1


async def test_direct_path_on_loopback_and_every_datagram_through_the_gate(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """On bare loopback punches work: the file goes direct, not through the relay, and
    registrations and punches pass the wire gate like QUIC (the gate saw every byte)."""
    relay = RendezvousServer(("127.0.0.1", 0), SECRET)
    await nursery.start(relay.run)
    a, b = await start_agents(nursery, tmp_path, {"a": relay.address, "b": relay.address},
                              rate=16_000_000)
    await wait_for(lambda: both_up(a, b) and a.status()["path"] == "direct"
                   and b.status()["path"] == "direct")
    client = a if a.rendezvous.client else b
    assert client.rendezvous.direct is not None and client.rendezvous.punch_successes >= 1
    assert a.rendezvous.punch_attempts >= 1 and b.rendezvous.punch_attempts >= 1
    relayed = relay.table.counters.relayed_bytes
    src = make_file(tmp_path / "direct.bin", 1024 * 1024, seed=5)  # 0.5 s at the cap
    final = await send_and_wait(b.config.control, src)
    assert final["state"] == "done"
    assert sha256_file(a.config.inbox / src.name) == sha256_file(src)
    assert relay.table.counters.relayed_bytes - relayed < 64 * 1024  # not through the relay
    assert a.status()["rendezvous"]["relay"] == f"127.0.0.1:{relay.address[1]}"
    for agent in (a, b):
        assert agent.rendezvous.registrations_sent >= 1
        gate, sock = agent.gate, agent.sock
        assert gate is not None and sock is not None
        # Every datagram that left the socket (QUIC, registrations, punches) went through
        # the gate, so the cap's one-second window accounted for it.
        assert gate.total_datagrams == sock.counters.datagrams_sent
        assert gate.total_bytes == sock.counters.wire_bytes_sent


async def test_status_and_quelay_status_name_the_path_and_the_rendezvous(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    import sys

    relay = RendezvousServer(("127.0.0.1", 0), SECRET)
    await nursery.start(relay.run)
    a, b = await start_agents(nursery, tmp_path, {"a": relay.address, "b": relay.address},
                              rendezvous_direct=False)
    await wait_for(lambda: both_up(a, b))
    async with open_client(a.config.control) as client:
        status = await client.status()
    assert status["path"] == "relayed"
    assert status["rendezvous"]["session"] == "site-pair"
    assert status["rendezvous"]["relay"] == f"127.0.0.1:{relay.address[1]}"
    assert a.rendezvous.punch_attempts == 0 and b.rendezvous.punch_attempts == 0
    done = await trio.run_process([sys.executable, "-m", "quelay.cli", "status", "--control",
                                   str(a.config.control)], capture_stdout=True)
    text = done.stdout.decode()
    assert f"path    relayed (rendezvous 127.0.0.1:{relay.address[1]}, session site-pair)" \
        in text, text
    role = "dial" if a.rendezvous.client else "listen"
    assert f"({role}, udp" in text


async def test_outage_and_relay_restart_mid_file(nursery: trio.Nursery, tmp_path: Path,
                                                 monkeypatch: Any) -> None:
    """An outage until both agents declare the link dead, then the relay restarts (its table
    is lost): the file resumes byte-exact. A cap holds the file in flight through both
    events (then it is lifted). Shorter, not different: a 1.5 s dead-link bound instead of
    3 s, and registrations refreshed every 2 s instead of 10 s (the listening agent sends
    the new relay nothing else, so it is learnt at its next refresh)."""
    import quelay.rendezvous.link as link_mod

    monkeypatch.setattr(link_mod, "REFRESH", 2.0)
    scopes: list[trio.CancelScope] = []

    async def start_relay(port: int) -> RendezvousServer:
        relay = RendezvousServer(("127.0.0.1", port), SECRET)
        scope = trio.CancelScope()
        scopes.append(scope)

        async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await relay.run(task_status=task_status)

        await nursery.start(runner)
        return relay

    relay = await start_relay(0)
    port = relay.address[1]
    async with open_linksim(upstream=relay.address, seed=1) as sim_a, \
            open_linksim(upstream=relay.address, seed=2) as sim_b:
        a, b = await start_agents(nursery, tmp_path, {"a": sim_a.address, "b": sim_b.address},
                                  rendezvous_direct=False, rate=8_000_000, keepalive=0.5,
                                  dead_after=1.5)
        await wait_for(lambda: both_up(a, b))
        size = 3 * 1024 * 1024 + 99
        src = make_file(tmp_path / "resumed.bin", size, seed=9)
        async with open_client(a.config.control) as client:
            tid = (await client.send_file(src))["id"]

            def delivered() -> int:
                return int(a.transfers[tid].delivered) if tid in a.transfers else 0

            await wait_for(lambda: delivered() > size // 5)
            sim_a.set_outage(True)  # the link goes silent until both sides declare it dead
            await wait_for(lambda: a.link_state == "down" and b.link_state == "down")
            sim_a.set_outage(False)
            ups = a.link_ups
            await wait_for(lambda: both_up(a, b) and a.link_ups > ups)
            mark = delivered()
            await wait_for(lambda: delivered() > mark + size // 10)
            assert delivered() < size  # still mid-file when the relay goes
            scopes[0].cancel()  # the relay dies with its table
            await wait_for(lambda: a.link_state == "down" and b.link_state == "down")
            assert delivered() < size
            a.set_rate(0)  # the rest needs no cap
            relay2 = await start_relay(port)
            final = await client.wait(tid)
        assert final["state"] == "done", final
        assert sha256_file(b.config.inbox / src.name) == sha256_file(src)
        # The new relay learnt both agents again from their registrations alone.
        assert relay2.table.counters.registrations >= 2
        assert relay2.table.snapshot()["paired"] == 1
        assert relay2.table.counters.relayed_bytes > 0
        assert a.status()["path"] == "relayed"


async def test_relayed_over_an_impaired_link(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Site A behind a LOS-250ms link to the relay (250 ms RTT, 500 kbit/s up): byte-exact."""
    relay = RendezvousServer(("127.0.0.1", 0), SECRET)
    await nursery.start(relay.run)
    async with open_linksim(upstream=relay.address, profile="LOS-250ms", seed=3) as sim_a, \
            open_linksim(upstream=relay.address, seed=4) as sim_b:
        a, b = await start_agents(nursery, tmp_path, {"a": sim_a.address, "b": sim_b.address},
                                  rendezvous_direct=False)
        await wait_for(lambda: both_up(a, b))
        src = make_file(tmp_path / "over-los.bin", 60_000, seed=8)  # 1 s at 500 kbit/s
        final = await send_and_wait(a.config.control, src)  # up the slow direction
        assert final["state"] == "done"
        assert sha256_file(b.config.inbox / src.name) == sha256_file(src)
        sent, got, _ = await stream_across(b.config.control, a.config.control, 400_000, 12,
                                           "down-the-fast-side")
        assert sent == got
        assert a.status()["path"] == "relayed" and a.status()["link"]["rtt"] >= 0.2
        assert sim_a.stats.up.bytes_forwarded > 60_000  # the file crossed the impaired link


async def test_relayed_agents_keep_trying_and_move_direct_mid_file(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: Any) -> None:
    """Punches blocked at first: both agents try, fail and stay relayed. Once punches pass,
    a later retry moves the connection to the direct path, mid-file: the file resumes and
    arrives intact."""
    import quelay.rendezvous.link as link_mod

    monkeypatch.setattr(link_mod, "DIRECT_RETRY", 0.5)
    monkeypatch.setattr(link_mod, "PUNCH_WINDOW", 1.0)  # fail sooner: the 3 s proves no more
    blocked = [True]
    genuine = AgentTokens.punch

    def punch(self: AgentTokens, wall: float, *, heard: bool) -> bytes:
        data = genuine(self, wall, heard=heard)
        return data[:-1] + bytes([data[-1] ^ 1]) if blocked[0] else data  # a bad MAC: ignored

    monkeypatch.setattr(AgentTokens, "punch", punch)
    relay = RendezvousServer(("127.0.0.1", 0), SECRET)
    await nursery.start(relay.run)
    a, b = await start_agents(nursery, tmp_path, {"a": relay.address, "b": relay.address},
                              rate=4_000_000)  # holds the file in flight until it moved
    await wait_for(lambda: both_up(a, b) and a.rendezvous.punch_failures >= 1
                   and b.rendezvous.punch_failures >= 1)
    assert a.status()["path"] == "relayed" and b.status()["path"] == "relayed"
    assert a.rendezvous.punch_successes == 0 and b.rendezvous.punch_successes == 0
    size = 2 * 1024 * 1024 + 1
    # The receiver is the QUIC client: it is the one that ends the relayed connection.
    client = a if a.rendezvous.client else b
    sender = b if client is a else a
    src = make_file(tmp_path / "moving.bin", size, seed=13)
    async with open_client(sender.config.control) as c:
        tid = (await c.send_file(src))["id"]
        await wait_for(lambda: sender.transfers[tid].delivered > size // 5)
        assert sender.status()["path"] == "relayed"
        blocked[0] = False
        await wait_for(lambda: client.rendezvous.current_direct)
        assert sender.transfers[tid].delivered < size  # moved while the file was in flight
        sender.set_rate(0)  # the rest needs no cap
        final = await c.wait(tid)
    assert final["state"] == "done" and final["resumes"] >= 1, final
    assert sha256_file(client.config.inbox / src.name) == sha256_file(src)
    await wait_for(lambda: both_up(a, b) and a.status()["path"] == "direct"
                   and b.status()["path"] == "direct")
    # Both kept trying; the client's punch succeeded and it moved to the peer's address.
    assert a.rendezvous.punch_attempts >= 2 and b.rendezvous.punch_attempts >= 2
    assert client.rendezvous.punch_successes >= 1 and client.rendezvous.direct is not None
