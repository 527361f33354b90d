"""Link simulator proxy and command, end to end on real UDP loopback.

Tests count datagrams and wait for conditions on the proxy's counters; the
only timing assertions are lower bounds (a delay can't be shorter than
configured), so a slow machine can't make them fail.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from quelay.linksim import BLOS_750MS, CLEAN, LinkSim, open_linksim, symmetric
from quelay.linksim.command import control_command, run_linksim

ROOT = Path(__file__).resolve().parents[1]
BUF = 1 << 20


def udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    for opt in (trio.socket.SO_RCVBUF, trio.socket.SO_SNDBUF):
        sock.setsockopt(trio.socket.SOL_SOCKET, opt, BUF)
    return sock


class Echo:
    """UDP echo server: returns every datagram to its sender, remembers senders."""

    def __init__(self) -> None:
        self.sock = udp_socket()
        self.count = 0
        self.sources: set[tuple[str, int]] = set()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        task_status.started()
        with self.sock:
            while True:
                data, addr = await self.sock.recvfrom(65535)
                self.count += 1
                self.sources.add(addr)
                await self.sock.sendto(data, addr)


class Client:
    """A UDP client that collects everything sent back to it."""

    def __init__(self) -> None:
        self.sock = udp_socket()
        self.received: list[bytes] = []
        self.times: list[float] = []
        self._arrived = trio.Event()

    async def wait_count(self, n: int) -> None:
        """Block until ``n`` datagrams arrived (no polling: fine under virtual time)."""
        while len(self.received) < n:
            await self._arrived.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        task_status.started()
        with self.sock:
            while True:
                data = await self.sock.recv(65535)
                self.received.append(data)
                self.times.append(trio.current_time())
                self._arrived.set()
                self._arrived = trio.Event()

    async def send(self, sim: LinkSim, payloads: list[bytes]) -> None:
        for p in payloads:
            await self.sock.sendto(p, sim.address)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for live state to satisfy ``condition``; fail loudly if it never does."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.002)


def drained(sim: LinkSim) -> bool:
    s = sim.stats
    return s.up.in_flight_datagrams == 0 and s.down.in_flight_datagrams == 0


async def start(nursery: trio.Nursery, *clients: Client) -> Echo:
    echo = Echo()
    await nursery.start(echo.run)
    for c in clients:
        await nursery.start(c.run)
    return echo


def payloads(n: int, tag: bytes = b"") -> list[bytes]:
    return [tag + b"%06d" % i + bytes(i % 200) for i in range(n)]


async def test_clean_profile_echoes_everything_in_order(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, profile=CLEAN) as sim:
        assert sim.address[0] == "127.0.0.1" and sim.address[1] > 0
        sent = payloads(300)
        await client.send(sim, sent)
        await wait_until(lambda: len(client.received) == 300)
        assert client.received == sent
        s = sim.stats
        assert s.up.datagrams_forwarded == s.down.datagrams_forwarded == 300
        assert s.up.bytes_forwarded == sum(map(len, sent))
        hist = sim.histogram()
        # The histogram counts what the link carries: 28 B of IPv4+UDP per datagram.
        assert sum(b["up"] for b in hist) == s.up.bytes_forwarded + 28 * 300
        assert s.up.wire_bytes_forwarded == s.up.bytes_forwarded + 28 * 300
        assert json.loads(sim.histogram_json()) == hist
        assert s.mappings_opened == 1


async def test_lossy_profile_counts_add_up(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    profile = CLEAN.with_overrides(loss=0.05, duplicate=0.05, rtt_s=0.004)
    n = 400
    async with open_linksim(upstream=echo.address, profile=profile, seed=1) as sim:
        sent = payloads(n)
        await client.send(sim, sent)
        s = sim.stats
        await wait_until(lambda: s.up.datagrams_in == n and drained(sim)
                         and s.down.datagrams_in == echo.count == s.up.datagrams_forwarded
                         and len(client.received) == s.down.datagrams_forwarded)
        for d in (s.up, s.down):
            assert d.dropped_loss > 0 and d.duplicated > 0
            assert d.datagrams_in + d.duplicated == d.datagrams_forwarded + d.dropped
        counts = Counter(client.received)
        assert set(counts) <= set(sent)
        assert max(counts.values()) <= 4  # at most duplicated once per direction
        assert 0.8 * n < len(client.received) < 1.1 * n


async def test_delay_and_rate_are_lower_bounds(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    profile = symmetric("slow", rate_bps=1e6, delay_s=0.02, queue_bytes=100_000)
    async with open_linksim(upstream=echo.address, profile=profile) as sim:
        t0 = trio.current_time()
        await client.send(sim, [bytes(1000)] * 20)
        await wait_until(lambda: len(client.received) == 20)
        # 20 kB at 1 Mbit/s serialise in 160 ms; plus 40 ms of round-trip delay
        assert client.times[0] - t0 >= 0.040 + 0.008
        assert client.times[-1] - t0 >= 0.160 + 0.040
        assert sim.stats.up.dropped == sim.stats.down.dropped == 0


async def test_outage_toggle_drops_all_then_traffic_resumes(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, profile=CLEAN) as sim:
        await client.send(sim, payloads(5, b"a"))
        await wait_until(lambda: len(client.received) == 5)
        sim.set_outage(True)
        assert sim.outage
        await client.send(sim, payloads(20, b"b"))
        await wait_until(lambda: sim.stats.up.dropped_outage == 20)
        assert echo.count == 5 and len(client.received) == 5
        sim.set_outage(False)
        assert not sim.outage
        await client.send(sim, payloads(20, b"c"))
        await wait_until(lambda: len(client.received) == 25)
        assert client.received[5:] == payloads(20, b"c")
        assert sim.snapshot()["outage_toggles"][0]["on"] is True


async def test_exit_with_datagrams_in_flight(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    profile = symmetric("long", delay_s=30.0)  # nothing arrives during this test
    async with open_linksim(upstream=echo.address, profile=profile) as sim:
        await client.send(sim, payloads(10))
        await wait_until(lambda: sim.stats.up.in_flight_datagrams == 10)
    assert echo.count == 0  # cancelled cleanly with datagrams still in the heap


async def test_in_flight_datagrams_die_when_an_outage_starts(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, profile=symmetric("d", delay_s=0.05)) as sim:
        await client.send(sim, payloads(10))
        await wait_until(lambda: sim.stats.up.in_flight_datagrams == 10)
        sim.set_outage(True)
        await wait_until(lambda: sim.stats.up.dropped_outage == 10)
        assert echo.count == 0 and drained(sim)


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 20 ms of real idleness.

    Loopback I/O completes well within that, so the proxy's delays cost no
    real time yet every datagram is seen; a stall can only make virtual time
    later, so lower bounds stay safe.
    """
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_blos_profile_on_virtual_time(virtual_clock: trio.testing.MockClock,
                                            nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, profile=BLOS_750MS) as sim:
        t0 = trio.current_time()
        await client.send(sim, [bytes(1000)] * 10)
        with trio.fail_after(60):
            await client.wait_count(10)
        lags = [t - t0 for t in client.times]
        # up: 1000 B at 100 kbit/s = 80 ms each; RTT 750 ms minus up to 2 x 50 ms of jitter
        assert lags[0] >= 0.080 + 0.650
        assert lags[-1] >= 0.800 + 0.650
        assert lags == sorted(lags)
        assert trio.current_time() - t0 < 5  # virtual seconds; the real test takes ~0
        assert sim.stats.up.dropped == 0


async def test_scheduled_outage_from_start(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, outages=[(0.0, 600.0)]) as sim:
        assert sim.outage and not sim.model.manual_outage
        await client.send(sim, payloads(7))
        await wait_until(lambda: sim.stats.up.dropped_outage == 7)
        assert echo.count == 0


async def test_two_client_source_ports_get_their_own_mappings(nursery: trio.Nursery) -> None:
    a, b = Client(), Client()
    echo = await start(nursery, a, b)
    async with open_linksim(upstream=echo.address) as sim:
        await a.send(sim, payloads(10, b"A"))
        await b.send(sim, payloads(10, b"B"))
        await wait_until(lambda: len(a.received) == 10 and len(b.received) == 10)
        assert a.received == payloads(10, b"A") and b.received == payloads(10, b"B")
        assert len(echo.sources) == 2  # the upstream saw two peers
        assert sim.stats.mappings_opened == sim.stats.mappings_active == 2


async def test_idle_mapping_expires_and_client_reconnects(nursery: trio.Nursery) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, mapping_idle_s=0.05) as sim:
        await client.send(sim, [b"one"])
        await wait_until(lambda: len(client.received) == 1)
        await wait_until(lambda: sim.stats.mappings_expired == 1)
        assert sim.stats.mappings_active == 0
        await client.send(sim, [b"two"])
        await wait_until(lambda: len(client.received) == 2)
        assert sim.stats.mappings_opened == 2 and len(echo.sources) == 2


async def test_write_stats(nursery: trio.Nursery, tmp_path: Path) -> None:
    client = Client()
    echo = await start(nursery, client)
    async with open_linksim(upstream=echo.address, profile="clean,rtt=2ms", seed=42) as sim:
        await client.send(sim, [b"x" * 10])
        await wait_until(lambda: len(client.received) == 1)
        # 10 payload bytes + 28 of IPv4+UDP headers in one 1-s window: the link's view
        assert sim.peak_rate_bps("up_in", 1.0) == (10 + 28) * 8
    sim.write_stats(tmp_path / "stats.json")  # works after the block too (final numbers)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["seed"] == 42 and stats["profile"] == "clean,rtt=2ms"
    assert stats["up"]["bytes_forwarded"] == 10 and stats["mappings"]["opened"] == 1
    assert sum(b["down"] for b in stats["histogram"]) == 10 + 28  # with IPv4+UDP headers
    assert stats["up"]["wire_bytes_forwarded"] == 10 + 28
    assert stats["params"]["header_bytes"] == 28


async def test_run_linksim_control_socket_and_signals(tmp_path: Path) -> None:
    client, echo, out = Client(), Echo(), io.StringIO()
    stats_path, ctl = tmp_path / "stats.json", tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(echo.run)
        await nursery.start(client.run)
        sim: LinkSim = await nursery.start(partial(
            run_linksim, ("127.0.0.1", 0), echo.address, "clean,loss_up=0", [], stats_path, 5,
            0.05, control_path=ctl, out=out))
        assert "listening on 127.0.0.1:" in out.getvalue()
        assert (await control_command(ctl, "outage on"))["outage"] is True
        assert sim.outage
        reply = await control_command(ctl, "outage toggle")
        assert reply == {"ok": True, "outage": False, "manual": False}
        assert (await control_command(ctl, "nonsense"))["ok"] is False
        await client.send(sim, [b"ping"])
        await wait_until(lambda: len(client.received) == 1)
        stats = await control_command(ctl, "stats")
        assert stats["stats"]["up"]["datagrams_forwarded"] == 1
        assert (await control_command(ctl, "snapshot"))["snapshot"]["seed"] == 5
        os.kill(os.getpid(), signal.SIGUSR1)
        await wait_until(lambda: sim.model.manual_outage)
        os.kill(os.getpid(), signal.SIGUSR1)
        await wait_until(lambda: not sim.model.manual_outage)
        await wait_until(lambda: stats_path.exists())  # periodic write
        nursery.cancel_scope.cancel()
    assert not ctl.exists()
    log = out.getvalue()
    assert "outage on (control socket)" in log and "outage on (SIGUSR1)" in log
    assert "stopped:" in log
    assert json.loads(stats_path.read_text())["up"]["datagrams_forwarded"] == 1


async def test_run_linksim_writes_stats_on_exit(tmp_path: Path) -> None:
    echo = Echo()
    stats_path = tmp_path / "s.json"
    async with trio.open_nursery() as nursery:
        await nursery.start(echo.run)
        sim = await nursery.start(run_linksim, ("127.0.0.1", 0), echo.address, "LOS-250ms",
                                  [(100.0, 1.0)], stats_path, None, 0)
        assert isinstance(sim, LinkSim)
        nursery.cancel_scope.cancel()
    stats = json.loads(stats_path.read_text())
    assert stats["profile"] == "LOS-250ms" and stats["outage_schedule"] == [[100.0, 1.0]]


def test_module_entry_point_arguments() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listed = subprocess.run([sys.executable, "-m", "quelay.linksim", "--list-profiles"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert listed.returncode == 0 and "Degraded-BLOS" in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "quelay.linksim", "--upstream", "nowhere",
                          "--outage", "5"], capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


async def test_module_entry_point_runs_until_sigint(tmp_path: Path) -> None:
    stats_path = tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "quelay.linksim", "--upstream", "127.0.0.1:9",
           "--profile", "BLOS-750ms,loss=1%", "--outage", "1:2", "--stats", str(stats_path),
           "--seed", "3", "--stats-interval", "0"]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        text = b""
        with trio.fail_after(20):
            while b"listening on" not in text:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, text
                text += chunk
        proc.send_signal(signal.SIGUSR1)  # toggles; must not kill it
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            while chunk := await proc.stdout.receive_some(4096):
                text += chunk
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"seed 3" in text and b"SIGINT: stopping" in text and b"stopped:" in text
    stats = json.loads(stats_path.read_text())
    assert stats["seed"] == 3 and stats["params"]["up"]["loss"] == pytest.approx(0.01)
