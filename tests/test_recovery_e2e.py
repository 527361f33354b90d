"""Loss recovery end to end: two agents through the project's link simulator."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.agent import Agent
from quelay.client import open_client
from quelay.identity import load_or_create_identity
from quelay.linksim import CLEAN_REORDER, open_linksim
from quelay.linksim.profiles import Profile
from quelay.transport.memory import MemoryNetwork, MemorySocket
from quelay.transport.udp import Address

from .conftest import make_file, sha256_file, site_config, start_memory_pair, wait_for

CAP = 8_000_000


async def _pair_via_sim(nursery: trio.Nursery, tmp_path: Path, profile: Profile, *,
                        seed: int, trace: bool = False,
                        **b_config: Any) -> tuple[Agent, Agent, Any]:
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    a = Agent(site_config(root_a, listen=("127.0.0.1", 0), trust=[fp_b]))
    await nursery.start(a.run)

    async def run_sim(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with open_linksim(upstream=a.udp_address, profile=profile, seed=seed,
                                trace=trace) as sim:
            task_status.started(sim)
            await trio.sleep_forever()

    sim = await nursery.start(run_sim)
    b = Agent(site_config(root_b, peer=sim.address, trust=[fp_a], **b_config))
    await nursery.start(b.run)
    await wait_for(lambda: a.link_state == "up" and b.link_state == "up")
    return a, b, sim


async def test_reordering_link_costs_few_spurious_retransmissions(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """±25 ms drawn per datagram (netem-like), 100 ms RTT, 8 Mbit/s cap: datagrams
    overtake each other by up to ~35 places. The file arrives byte-exact, the cap
    holds at the link (headers included), and loss recovery counts only a few
    spurious losses (fixed thresholds of 3 packets / 9/8 RTT count hundreds here)."""
    profile = CLEAN_REORDER.with_overrides(rtt_s=0.1)
    a, b, sim = await _pair_via_sim(nursery, tmp_path, profile, seed=7, rate=CAP)
    src = make_file(tmp_path / "reordered.bin", 2_000_000, seed=21)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        final = await client.wait(info["id"])
    assert final["state"] == "done"
    assert sha256_file(a.config.inbox / "reordered.bin") == sha256_file(src)
    assert b.session is not None
    stats = b.session.conn.path_stats()
    assert stats.packet_threshold > 3  # it saw the reordering and adapted
    assert stats.spurious_losses + stats.spurious_probes <= 40
    assert stats.lost_packets <= stats.spurious_losses + 5  # the link loses nothing
    assert sim.peak_rate_bps("up_in", 1.0) <= CAP * 1.02


class TracedNetwork(MemoryNetwork):
    """The in-memory network, with every datagram's send time, sender and fate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sent: list[tuple[float, Address, bool]] = []  # (time, sender, dropped)

    def socket(self, bind: Address = ("10.0.0.1", 0), **kw: object) -> MemorySocket:
        sock = super().socket(bind, **kw)
        genuine = sock.send_batch

        async def send_batch(datagrams: Iterable[tuple[bytes, Address]]) -> None:
            datagrams = list(datagrams)
            now = trio.current_time()
            self.sent.extend((now, sock.address, self.down) for _ in datagrams)
            await genuine(datagrams)

        sock.send_batch = send_batch  # type: ignore[method-assign]
        return sock


@pytest.mark.parametrize("held", [True, False], ids=["held", "redialled"])
async def test_recovery_after_a_four_second_outage_is_the_first_probe(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock,
        held: bool) -> None:
    """A 4 s outage (longer than the 3 s dead-link bound: the link is reported down;
    the connection is held through it, or, held for less, the dialler reconnects)
    during a file transfer, on the in-memory network (100 ms RTT, mock time: exact
    and free). Counted from every datagram sent: the dialler kept probing through the
    last second of the outage (no backed-off silence), the first of its datagrams
    after the return is answered (at most 3 of them before the listener's first
    answer reaches it), and the file completes byte-exact."""
    delay = 0.05
    net = TracedNetwork(delay=delay)
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=CAP,
                                   **({} if held else {"idle_timeout": 3.0}))
    assert a.sock is not None and b.sock is not None
    listener, dialler = a.sock.address, b.sock.address
    src = make_file(tmp_path / "outage.bin", 500_000, seed=22)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        await wait_for(lambda: net.counters.bytes_delivered > 200_000)  # mid-transfer
        t_start = trio.current_time()
        net.down = True
        await trio.sleep(4.0)
        net.down = False
        t_back = trio.current_time()
        final = await client.wait(info["id"])
    assert final["state"] == "done"
    assert sha256_file(a.config.inbox / "outage.bin") == sha256_file(src)
    if held:  # the same connection went on where it was
        assert final["resumes"] == 0 and b.link_ups == 1 and b.default.revivals == 1
    else:  # the session ended and the file resumed
        assert final["resumes"] >= 1 and b.link_ups == 2
    probes_late = [t for t, who, _ in net.sent if who == dialler and t_back - 1.25 <= t < t_back]
    assert probes_late, "the dialler went silent in the last second of the outage"
    answer = min(t for t, who, dropped in net.sent
                 if who == listener and t >= t_back and not dropped) + delay  # reaches B
    # What the dialler sent before that answer reached it (its replies leave at that instant).
    before_answer = [t for t, who, _ in net.sent if who == dialler and t_back <= t < answer]
    assert len(before_answer) <= 3
    assert any(dropped for t, _, dropped in net.sent if t_start <= t < t_back)
