"""One hub, three sites (issue 17): every site at once, in both directions; an outage
or a restart on one link while the others keep moving; per-link caps and a total cap
held at the link; addressing errors. On the in-memory network and Trio's mock clock:
each site has its own host, so the network can cut one site's link and count what
each link carried (IPv4 and UDP headers included)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from quelay.agent.agent import Agent
from quelay.agent.peerspec import PeerSpec
from quelay.agent.pipes import OutboundPipe
from quelay.client import ClientError, open_client
from quelay.core import messages as wire
from quelay.core.codes import LinkState
from quelay.core.peer import PeerProtocol, Send
from quelay.core.transfer import PeerTable, State, Transfer, TransferTable
from quelay.identity import load_or_create_identity
from quelay.transport.memory import MemoryNetwork

from .conftest import attach_reader, make_file, sha256_file, site_config, wait_for

SITES = ("s1", "s2", "s3")
HUB_ADDRESS = ("10.0.0.1", 4433)
HUB_HOST = HUB_ADDRESS[0]


def host_of(site: str) -> str:
    return f"10.0.1.{SITES.index(site) + 1}"


def site_address(site: str) -> tuple[str, int]:
    """Where a site the hub dials listens."""
    return (host_of(site), 5000)


@dataclass
class Hub:
    net: MemoryNetwork
    root: Path
    hub: Agent
    fp_hub: str
    dialled: tuple[str, ...] = ()  # sites the hub dials (they listen); the rest dial it
    sites: dict[str, Agent] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)

    async def start_site(self, nursery: trio.Nursery, name: str, **overrides: Any) -> Agent:
        """Start (or restart, on the same state directory) site ``name``: it dials the hub."""
        net = self.net

        def sock(bind: Any, **_: Any) -> Any:
            return net.socket((host_of(name), bind[1]))  # each site on its own host

        where: dict[str, Any] = ({"listen": site_address(name)} if name in self.dialled
                                 else {"peer": HUB_ADDRESS})
        agent = Agent(site_config(self.root / name, trust=[self.fp_hub], **where, **overrides),
                      socket_factory=sock)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await agent.run(task_status=task_status)

        await nursery.start(run)
        self.sites[name], self.scopes[name] = agent, scope
        return agent

    def hub_link(self, site: str) -> Any:
        return self.hub.links[site]


async def start_hub(nursery: trio.Nursery, tmp_path: Path, net: MemoryNetwork, *,
                    hub: dict[str, Any] | None = None, peers: dict[str, dict[str, Any]] | None
                    = None, site: dict[str, Any] | None = None,
                    dialled: tuple[str, ...] = ()) -> Hub:
    fps = {name: load_or_create_identity(tmp_path / name / "state").fingerprint
           for name in SITES}
    fp_hub = load_or_create_identity(tmp_path / "hub" / "state").fingerprint
    specs = [PeerSpec(name, trust=[fps[name]], **(peers or {}).get(name, {}),
                      address=site_address(name) if name in dialled else None)
             for name in SITES]
    agent = Agent(site_config(tmp_path / "hub", listen=HUB_ADDRESS, peers=specs, **(hub or {})),
                  socket_factory=net.socket)
    nursery.start_soon(net.run)
    await nursery.start(agent.run)
    h = Hub(net, tmp_path, agent, fp_hub, dialled)
    for name in SITES:
        await h.start_site(nursery, name, **(site or {}))
    await wait_for(lambda: all(agent.links[n].link_state is LinkState.UP for n in SITES)
                   and all(s.link_state is LinkState.UP for s in h.sites.values()))
    for name in SITES:  # each site's certificate put it on its own link
        assert agent.links[name].peer_fingerprint == fps[name]
    return h


def submit_file(agent: Agent, path: Path, name: str, peer: str = "") -> Transfer:
    t = Transfer(wire.new_transfer_id(), "out", "file", name, path.stat().st_size, 4, peer=peer)
    t.path = str(path)
    agent.book.submit(t)
    return t


async def until_done(agent: Agent, tid: str) -> Transfer:
    t = agent.transfers[tid]
    await wait_for(lambda: t.terminal, timeout=60)
    return t


def window_max(records: list[tuple[float, int]], start: float, end: float,
               width: float = 1.0) -> int:
    """The most bytes in any ``width``-second window inside [start, end]."""
    times = [(t, n) for t, n in records if start <= t <= end]
    best = total = 0
    lo = 0
    for hi in range(len(times)):
        total += times[hi][1]
        while times[hi][0] - times[lo][0] >= width:
            total -= times[lo][1]
            lo += 1
        best = max(best, total)
    return best


def bytes_between(records: list[tuple[float, int]], start: float, end: float) -> int:
    return sum(n for t, n in records if start <= t < end)


# -- every site at once, both ways --------------------------------------------------------


async def test_files_and_streams_with_three_sites_both_ways(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.02)
    h = await start_hub(nursery, tmp_path, net)
    sizes = {name: 150_000 + 10_000 * i for i, name in enumerate(SITES)}
    digests: dict[str, str] = {}
    stream_data = {name: hashlib.sha256(name.encode()).digest() * 2000 for name in SITES}

    async def hub_side(name: str) -> None:
        src = make_file(tmp_path / f"to-{name}.bin", sizes[name], seed=SITES.index(name))
        digests[f"to-{name}"] = sha256_file(src)
        async with open_client(h.hub.config.control) as c:
            info = await c.send_file(str(src), peer=name)
            assert info["peer"] == name
            out = await c.open_stream(name=f"from-hub-{name}", peer=name)
            await out.send_all(stream_data[name])
            done = await out.finish()
            assert done["state"] == "done" and done["peer"] == name
            incoming = await c.accept_incoming(peer=name)  # the site's stream, from that site
            assert incoming.info["peer"] == name
            assert await incoming.read_all() == stream_data[name][::-1]
            assert (await c.wait(info["id"]))["state"] == "done"

    async def site_side(name: str) -> None:
        site = h.sites[name]
        src = make_file(tmp_path / f"from-{name}.bin", sizes[name] // 2, seed=10 + len(name))
        digests[f"from-{name}"] = sha256_file(src)
        async with open_client(site.config.control) as c:
            info = await c.send_file(str(src))  # one peer: no name needed
            incoming = await c.accept_incoming()
            assert await incoming.read_all() == stream_data[name]
            out = await c.open_stream(name=f"from-{name}")
            await out.send_all(stream_data[name][::-1])
            assert (await out.finish())["state"] == "done"
            assert (await c.wait(info["id"]))["state"] == "done"

    async with trio.open_nursery() as inner:
        for name in SITES:
            inner.start_soon(hub_side, name)
            inner.start_soon(site_side, name)
    for name in SITES:
        assert sha256_file(h.sites[name].config.inbox / f"to-{name}.bin") == digests[f"to-{name}"]
        assert sha256_file(h.hub.config.inbox / f"from-{name}.bin") == digests[f"from-{name}"]
    by_peer: dict[str, set[str]] = {}
    for t in h.hub.transfers:
        by_peer.setdefault(t.peer, set()).add(f"{t.direction}:{t.kind}")
    assert by_peer == {name: {"out:file", "out:stream", "in:file", "in:stream"}
                       for name in SITES}
    for name in SITES:  # nothing flapped
        assert h.hub_link(name).link_ups == 1 and h.sites[name].link_ups == 1


# -- one link's outage, one site's restart -----------------------------------------------


async def test_an_outage_on_one_link_leaves_the_others_moving(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.05, record=True)
    rate = 800_000
    h = await start_hub(nursery, tmp_path, net, hub={"rate": rate})
    files = {name: make_file(tmp_path / f"{name}.bin", 600_000, seed=20 + i)
             for i, name in enumerate(SITES)}
    sent = {name: submit_file(h.hub, files[name], f"{name}.bin", peer=name) for name in SITES}
    await wait_for(lambda: all(t.delivered > 100_000 for t in sent.values()))
    cut = trio.current_time()
    net.down_hosts.add(host_of("s1"))
    await wait_for(lambda: h.hub_link("s1").link_state is LinkState.DOWN)
    await trio.sleep(6.0)
    back = trio.current_time()
    net.down_hosts.clear()
    done = {name: await until_done(h.hub, sent[name].id) for name in SITES}
    for name in SITES:
        assert done[name].state is State.DONE
        assert sha256_file(h.sites[name].config.inbox / f"{name}.bin") == \
            sha256_file(files[name])
    during = {name: bytes_between(net.carried.get((HUB_HOST, host_of(name)), []), cut + 0.1,
                                  cut + 3.1) for name in SITES}
    assert back > cut + 3.1
    assert during["s1"] == 0  # the cut link carried nothing...
    for name in ("s2", "s3"):  # ...while the others kept moving near their cap
        assert during[name] >= 0.8 * rate / 8 * 3.0, (name, during)
        assert h.hub_link(name).link_ups == 1 and h.sites[name].link_ups == 1
    # s1's connection was held through the outage and carried on: no new session.
    assert h.hub_link("s1").link_ups == 1 and h.hub_link("s1").revivals == 1


async def test_a_restarted_site_resumes_and_touches_no_other_link(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.02)
    h = await start_hub(nursery, tmp_path, net, hub={"rate": 1_000_000},
                        site={"rate": 1_000_000})
    # s2 sends a file to the hub; the hub streams to s1 and to s2.
    src = make_file(tmp_path / "s2-up.bin", 400_000, seed=31)
    up = submit_file(h.sites["s2"], src, "s2-up.bin")
    pipes = {name: OutboundPipe(64 * 1024) for name in ("s1", "s2")}
    streams = {name: Transfer(wire.new_transfer_id(), "out", "stream", f"st-{name}", None, 4,
                              peer=name) for name in pipes}
    for name, t in streams.items():
        h.hub.book.submit(t, pipes[name])
        await pipes[name].write(b"x" * 1000)
    await wait_for(lambda: all(t.id in h.sites[n].transfers for n, t in streams.items()))
    await wait_for(lambda: h.sites["s2"].transfers[up.id].delivered > 100_000)
    h.scopes["s2"].cancel()  # the site's agent dies (kill -9: nothing is closed cleanly)
    await trio.sleep(0.5)
    restarted = await h.start_site(nursery, "s2")
    assert not restarted.transfers[up.id].terminal  # recovered from its journal
    got = await until_done(h.hub, up.id)
    assert got.state is State.DONE and got.peer == "s2"
    assert sha256_file(h.hub.config.inbox / "s2-up.bin") == sha256_file(src)
    # The hub saw s2 restart: its stream to s2 cannot resume; the one to s1 lives on.
    assert streams["s2"].state is State.FAILED and streams["s2"].error_code == "peer_restarted"
    assert streams["s1"].state is State.ACTIVE
    t_in, reader = await attach_reader(h.sites["s1"], streams["s1"].id)
    pipes["s1"].end()
    got_bytes = b""
    while len(got_bytes) < 1000:
        got_bytes += await reader.receive_some(65536)
    assert got_bytes == b"x" * 1000
    await until_done(h.hub, streams["s1"].id)
    assert streams["s1"].state is State.DONE and t_in.state is State.DONE
    for name in ("s1", "s3"):
        assert h.hub_link(name).link_ups == 1 and h.sites[name].link_ups == 1
    assert h.hub_link("s2").link_ups == 2


# -- caps ----------------------------------------------------------------------------------


async def test_link_caps_and_the_total_cap_hold_at_the_link(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """Total 1 Mbit/s; s1 capped at 200 kbit/s, s2 and s3 uncapped: max-min gives s1 its
    200 k and s2, s3 400 k each. When s3's link dies, s2 takes what s3 left (800 k)."""
    net = MemoryNetwork(delay=0.02, record=True)
    total, s1_cap = 1_000_000, 200_000
    h = await start_hub(nursery, tmp_path, net, hub={"rate_total": total},
                        peers={"s1": {"rate": s1_cap}})
    files = {name: make_file(tmp_path / f"{name}.bin", size, seed=40 + i)
             for i, (name, size) in enumerate([("s1", 500_000), ("s2", 1_600_000),
                                               ("s3", 1_000_000)])}
    start = trio.current_time()
    sent = {name: submit_file(h.hub, files[name], f"{name}.bin", peer=name) for name in SITES}
    await trio.sleep(10.0)
    shared_until = trio.current_time()
    net.down_hosts.add(host_of("s3"))
    await wait_for(lambda: h.hub_link("s3").link_state is LinkState.DOWN)
    alone_from = trio.current_time() + 1.5  # the next division, and a window to settle
    await trio.sleep(5.0)
    alone_until = trio.current_time()
    eff_alone = h.hub.rates()["peers"]["s2"]["effective"]  # what the division gave s2
    net.down_hosts.clear()
    for name in SITES:
        assert (await until_done(h.hub, sent[name].id)).state is State.DONE
    end = trio.current_time()

    out = {name: net.carried.get((HUB_HOST, host_of(name)), []) for name in SITES}
    every = sorted(r for name in SITES for r in out[name])
    # At the link, in every 1-s window: each link within its cap, all links within the total.
    assert window_max(out["s1"], start, end) <= s1_cap / 8
    assert window_max(every, start, end) <= total / 8
    # Shares while all three were busy (after a second to start): max-min fair.
    span = shared_until - (start + 2.0)
    rate = {name: bytes_between(out[name], start + 2.0, shared_until) * 8 / span
            for name in SITES}
    assert rate["s1"] >= 0.9 * s1_cap, rate
    for name in ("s2", "s3"):
        assert 0.85 * 400_000 <= rate[name] <= 400_000 * 1.02, rate
    # s3 down: its share went to s2 (s1 stays at its own cap).
    alone = bytes_between(out["s2"], alone_from, alone_until) * 8 / (alone_until - alone_from)
    assert alone >= 0.85 * (total - s1_cap), alone
    assert eff_alone == total - s1_cap


# -- addressing -----------------------------------------------------------------------------


async def test_addressing_errors_are_answered_clearly(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.01)
    h = await start_hub(nursery, tmp_path, net)
    src = make_file(tmp_path / "a.bin", 1000)
    async with open_client(h.hub.config.control) as c:
        async def code_of(call: Callable[[], Any]) -> str:
            with pytest.raises(ClientError) as caught:
                await call()
            assert "s1, s2, s3" in str(caught.value)  # the answer lists the peers
            return caught.value.code

        assert await code_of(lambda: c.send_file(str(src))) == "peer_required"
        assert await code_of(lambda: c.send_file(str(src), peer="nope")) == "unknown_peer"
        assert await code_of(lambda: c.open_stream(name="x")) == "peer_required"
        assert await code_of(lambda: c.accept_incoming(name="x")) == "peer_required"
        assert await code_of(lambda: c.fetch("x.bin")) == "peer_required"
        assert await code_of(lambda: c.set_rate(100_000)) == "peer_required"
        assert await code_of(lambda: c.datagram_send("pos", b"1")) == "peer_required"
        assert await code_of(lambda: c.set_rate(100_000, peer="s9")) == "unknown_peer"
        with pytest.raises(ClientError) as caught:
            await c.request("send_file", path=str(src), to="bad name!")
        assert caught.value.code == "invalid_argument"
        info = await c.send_file(str(src), peer="s2")
        assert info["peer"] == "s2"
        rates = await c.set_rate(300_000, peer="s3")
        assert rates == 300_000 and h.hub_link("s3").rate == 300_000
        assert (await c.rates())["peers"]["s3"] == {"rate": 300_000, "effective": 300_000}
        status = await c.status()
        assert [p["name"] for p in status["peers"]] == list(SITES)
        assert all(p["link"]["state"] == "up" for p in status["peers"])
        assert (await c.wait(info["id"]))["state"] == "done"
    assert (h.sites["s2"].config.inbox / "a.bin").exists()
    assert not (h.sites["s1"].config.inbox / "a.bin").exists()


# -- isolation in the protocol (no network) ---------------------------------------------------


def test_a_peer_cannot_name_another_links_transfer() -> None:
    """A hub's session sees its own link's transfers only: another site's id is unknown to
    it (acks, cancels, resumes change nothing) and cannot be taken by a new open."""
    table = TransferTable()
    theirs = Transfer("b" * 32, "out", "file", "b.bin", 1000, 4, peer="s2")
    theirs.move_to(State.ACTIVE)
    theirs.opened = True
    table.add(theirs)
    mine = Transfer("a" * 32, "in", "stream", "a", None, 4, peer="s1")
    mine.move_to(State.ACTIVE)
    table.add(mine)
    protocol = PeerProtocol(PeerTable(table, "s1"))
    assert [a for a in protocol.start() if isinstance(a, Send)] == [
        Send(wire.Resume(mine.id, 0))]  # only its own transfers are reconciled
    for msg in (wire.Ack(theirs.id, 500), wire.Cancel(theirs.id, "hostile"),
                wire.Resume(theirs.id, 0), wire.Finish(theirs.id, 1000, b"\0" * 32)):
        protocol.receive(msg)
    assert theirs.state is State.ACTIVE and theirs.delivered == 0
    actions = protocol.receive(wire.Open(theirs.id, "file", 10, 4, "evil.bin"))
    assert actions == [Send(wire.Error(theirs.id, "duplicate", "a transfer with this id exists"))]
    assert table.get(theirs.id) is theirs
    fresh = protocol.receive(wire.Open("c" * 32, "stream", None, 4, "new"))
    assert table["c" * 32].peer == "s1" and fresh


# -- a hub that dials some sites and is dialled by the others; datagrams; metrics -------------


async def test_a_hub_dials_one_site_accepts_two_and_addresses_datagrams(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    from quelay.agent.metrics import AgentCollector

    net = MemoryNetwork(delay=0.02)
    h = await start_hub(nursery, tmp_path, net, dialled=("s3",))
    assert h.hub_link("s3").address == site_address("s3")
    # A file each way on the dialled link and on an accepted one.
    for name in ("s1", "s3"):
        src = make_file(tmp_path / f"d-{name}.bin", 50_000, seed=60 + len(name))
        t = submit_file(h.hub, src, f"d-{name}.bin", peer=name)
        back = submit_file(h.sites[name], src, f"u-{name}.bin")
        assert (await until_done(h.hub, t.id)).state is State.DONE
        assert (await until_done(h.sites[name], back.id)).state is State.DONE
        assert h.hub.transfers[back.id].peer == name
    # Best-effort datagrams go to the named site only, and come back labelled by link.
    async with open_client(h.hub.config.control) as hub_c, \
            open_client(h.sites["s2"].config.control) as s2_c, \
            open_client(h.sites["s3"].config.control) as s3_c:
        assert (await hub_c.datagram_send("pos", b"to-s2", peer="s2"))["accepted"]
        got = await s2_c.datagram_recv("pos", timeout=5)
        assert [m["data"] for m in got] == [b"to-s2"]
        assert await s3_c.datagram_recv("pos", timeout=1) == []
        assert (await s3_c.datagram_send("ack", b"from-s3"))["accepted"]
        assert [m["data"] for m in await hub_c.datagram_recv("ack", timeout=5, peer="s3")] \
            == [b"from-s3"]
        assert await hub_c.datagram_recv("ack", timeout=1, peer="s1") == []
    # Metrics name every link.
    families = {f.name: f for f in AgentCollector(h.hub).collect()}
    up = {s.labels["peer"]: s.value for s in families["quelay_peer_link_up"].samples}
    assert up == {"s1": 1, "s2": 1, "s3": 1}
    sent = {s.labels["peer"]: s.value for s in families["quelay_peer_wire_bytes_sent"].samples
            if s.name.endswith("_total")}
    assert sent["s1"] > 50_000 and sent["s3"] > 50_000 and sent["s2"] < 50_000


# -- real UDP: the caps as each link's simulator sees them ------------------------------------


async def test_caps_hold_at_each_links_simulator_on_real_udp(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two sites, each behind its own link simulator (real UDP on loopback): s1 capped
    at 600 kbit/s, s2 uncapped, 2 Mbit/s in total. What each simulator received from
    the hub, headers included, stays within the link's cap and, summed, within the total
    (100-ms bins, so 2 % for binning); the shares follow max-min (600 k and 1.4 M)."""
    from quelay.linksim import BIN_S, CLEAN, open_linksim

    total, s1_cap = 2_000_000, 600_000
    names = ("s1", "s2")
    fps = {n: load_or_create_identity(tmp_path / n / "state").fingerprint for n in names}
    fp_hub = load_or_create_identity(tmp_path / "hub" / "state").fingerprint
    hub = Agent(site_config(tmp_path / "hub", listen=("127.0.0.1", 0), rate_total=total,
                            peers=[PeerSpec("s1", trust=[fps["s1"]], rate=s1_cap),
                                   PeerSpec("s2", trust=[fps["s2"]])]))
    await nursery.start(hub.run)
    profile = CLEAN.with_overrides(name="lan", rtt_s=0.02)
    async with open_linksim(upstream=hub.udp_address, profile=profile, seed=1) as sim1, \
            open_linksim(upstream=hub.udp_address, profile=profile, seed=2) as sim2:
        sims = {"s1": sim1, "s2": sim2}
        sites = {}
        for n in names:
            sites[n] = Agent(site_config(tmp_path / n, peer=sims[n].address, trust=[fp_hub]))
            await nursery.start(sites[n].run)
        await wait_for(lambda: all(hub.links[n].link_state is LinkState.UP for n in names))
        # About 3 s of traffic on each link at its max-min share.
        files = {"s1": make_file(tmp_path / "a.bin", 225_000, seed=71),
                 "s2": make_file(tmp_path / "b.bin", 525_000, seed=72)}
        sent = {n: submit_file(hub, files[n], files[n].name, peer=n) for n in names}
        for n in names:
            assert (await until_done(hub, sent[n].id)).state is State.DONE
            assert sha256_file(sites[n].config.inbox / files[n].name) == sha256_file(files[n])
        assert sim1.peak_rate_bps("down_in", 1.0) <= s1_cap * 1.02
        assert sim2.peak_rate_bps("down_in", 1.0) <= total * 1.02
        # Both links together: align the two simulators' 100-ms bins on their start times.
        shift = round((sim2.model.start - sim1.model.start) / BIN_S)
        bins: dict[int, int] = {}
        for sim, offset in ((sim1, 0), (sim2, shift)):
            for i, row in enumerate(sim.histogram()):
                bins[i + offset] = bins.get(i + offset, 0) + row["down_in"]
        lo, hi = min(bins), max(bins)
        peak = max(sum(bins.get(j, 0) for j in range(i, i + 10)) for i in range(lo, hi + 1))
        assert peak * 8 <= total * 1.02, peak * 8
        busy_s2 = [row["down_in"] for row in sim2.histogram() if row["down_in"] > 5_000]
        # s2 got more than an equal half of the total: what s1's cap left (1.4 Mbit/s).
        assert len(busy_s2) >= 5 and sorted(busy_s2)[len(busy_s2) // 2] * 8 / BIN_S \
            >= 0.85 * (total - s1_cap), [b * 8 / BIN_S for b in busy_s2]


# -- restart of the hub: each journaled transfer stays on its link ---------------------------


def test_journaled_transfers_keep_their_link_across_a_restart(tmp_path: Path) -> None:
    """The journal keeps each file transfer's peer: after a restart it waits for that
    link. A transfer of a peer no longer configured fails ``unknown_peer`` (never sent
    to another site); an agent with one link takes over an unnamed agent's transfers."""
    from quelay.agent.journal import Journal

    src = make_file(tmp_path / "f.bin", 1000)
    fps = {n: load_or_create_identity(tmp_path / n / "state").fingerprint for n in SITES}
    hub_state = tmp_path / "hub" / "state"
    hub_state.mkdir(parents=True)
    journal = Journal(hub_state / "journal.sqlite3")
    for tid, peer in (("1" * 32, "s1"), ("2" * 32, "s2"), ("3" * 32, "gone")):
        journal.record(id=tid, direction="out", name="f.bin", path=str(src), size=1000,
                       priority=4, attrs={}, peer=peer)
    journal.close()
    hub = Agent(site_config(tmp_path / "hub", listen=HUB_ADDRESS, peers=[
        PeerSpec(n, trust=[fps[n]]) for n in ("s1", "s2")]))
    try:
        table = hub.transfers
        assert table["1" * 32].peer == "s1" and table["1" * 32].state is State.PENDING
        assert table["2" * 32].peer == "s2" and table["2" * 32].state is State.PENDING
        assert table["3" * 32].state is State.FAILED
        assert table["3" * 32].error_code == "unknown_peer"
        assert "gone" in (table["3" * 32].error_message or "")
    finally:
        hub.journal.close()
        os.close(hub._lock_fd)
    # The same journal under a single-peer agent: the live transfers move to its link.
    single = Agent(site_config(tmp_path / "hub", listen=HUB_ADDRESS, trust=[fps["s1"]]))
    try:
        assert {single.transfers[t].peer for t in ("1" * 32, "2" * 32)} == {""}
        assert Journal(hub_state / "journal.sqlite3").get("1" * 32).peer == ""  # type: ignore[union-attr]
    finally:
        single.journal.close()
        os.close(single._lock_fd)


def test_hub_settings_that_cannot_work_are_refused_with_the_reason(tmp_path: Path) -> None:
    pin = "sha256:" + "ab" * 32
    other = "sha256:" + "cd" * 32

    def config(**kw: Any) -> Any:
        return site_config(tmp_path / "hub", **kw)

    cases = [
        (dict(listen=HUB_ADDRESS, peers=[PeerSpec("a", [pin]), PeerSpec("a", [other])]),
         "peer a is configured twice"),
        (dict(peers=[PeerSpec("a", [pin])]), "must dial us: give --listen"),
        (dict(listen=HUB_ADDRESS, trust=[pin], peers=[PeerSpec("a", [other])]),
         "cannot be mixed"),
        (dict(listen=HUB_ADDRESS, peers=[PeerSpec("a", [])]), "has no pin"),
        (dict(listen=HUB_ADDRESS, peers=[PeerSpec("a", [pin], rate=5_000)]),
         "the rate of peer a must be 0 (uncapped) or at least"),
        (dict(rendezvous=("127.0.0.1", 1), session="s", rendezvous_secret_file="/x",
              peers=[PeerSpec("a", [pin])]), "cannot be used with named peers"),
    ]
    for kw, why in cases:
        with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
            config(**kw)
    with pytest.raises(ValueError, match="is not a peer name"):
        PeerSpec("bad name!", [pin])
    # One pin for two peers: whose connection would it be?
    with pytest.raises(ValueError, match="same pin"):
        Agent(config(listen=HUB_ADDRESS, peers=[PeerSpec("a", [pin]), PeerSpec("b", [pin])]))


async def test_a_link_stays_busy_a_moment_after_its_last_demand(
        autojump_clock: trio.testing.MockClock) -> None:
    """For the total cap's division a link is busy while a transfer waits for bytes and
    for BUSY_HOLD after: between two grants it keeps its share (no flapping to idle)."""
    from types import SimpleNamespace

    from quelay.agent.peerlink import BUSY_HOLD, PeerLink
    from quelay.identity import TrustStore
    from quelay.transport.pacing import WireGate

    wanted: list[Any] = []
    hub = SimpleNamespace(label="hub", link_wants=wanted.append)
    link = PeerLink(hub, SimpleNamespace(), name="x", trust=TrustStore([]),  # type: ignore[arg-type]
                    address=None, rate=0, gate=WireGate(0, 0.0), max_datagram=1350,
                    send_high_water=1 << 20, reconnect_interval=1.0, probe_interval=1.0)
    conn = SimpleNamespace(silent=False)
    link.session = SimpleNamespace(unsent_bulk=lambda: 0, conn=conn)  # type: ignore[assignment]
    assert not link.busy()
    link.feed.demand()  # a pump waits for a grant
    assert wanted == [link] and link.busy()
    await trio.sleep(BUSY_HOLD - 0.1)
    assert link.busy()
    await trio.sleep(0.2)
    assert not link.busy()
    link.feed.demand()
    conn.silent = True  # its connection is held through an outage: the link is down
    assert not link.busy()
    conn.silent = False
    assert link.busy()
    link.session = None
    link.feed.demand()
    assert not link.busy()  # no session, no share
