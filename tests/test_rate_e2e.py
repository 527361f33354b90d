"""End to end through the link simulator: impairment, exact bytes, the cap held at the wire."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio

from quelay.agent import Agent
from quelay.client import ClientError, open_client
from quelay.identity import load_or_create_identity
from quelay.linksim import CLEAN, open_linksim
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, sha256_file, site_config, start_memory_pair, wait_for

CAP = 2_000_000
IMPAIRED = CLEAN.with_overrides(name="impaired", rtt_s=0.02, loss=0.01, duplicate=0.01,
                                corrupt=0.005)


@pytest.mark.parametrize("congestion", ["allotted", "cubic"])
async def test_capped_transfer_through_impaired_link(
    nursery: trio.Nursery, tmp_path: Path, congestion: str
) -> None:
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    a = Agent(site_config(root_a, listen=("127.0.0.1", 0), trust=[fp_b]))
    await nursery.start(a.run)
    async with open_linksim(upstream=a.udp_address, profile=IMPAIRED, seed=5) as sim:
        b = Agent(site_config(root_b, peer=sim.address, trust=[fp_a], rate=CAP,
                              congestion=congestion))
        await nursery.start(b.run)
        await wait_for(lambda: b.link_state == "up")
        # 550 kB: over 2 s at the cap, so the 1-second windows measure saturation.
        src = make_file(tmp_path / "capped.bin", 400_000, seed=9)
        rng = random.Random(4)
        payload = rng.randbytes(150_000)
        got = hashlib.sha256()

        async def reader() -> None:
            async with open_client(a.config.control) as client:
                incoming = await client.accept_incoming(name="capped")
                async for chunk in incoming:
                    got.update(chunk)

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            async with open_client(b.config.control) as client:
                info = await client.send_file(src)
                async with await client.open_stream(name="capped") as out:
                    for i in range(0, len(payload), 10_000):
                        await out.send_all(payload[i : i + 10_000])
                final = await client.wait(info["id"])
                status = await client.status()
        assert final["state"] == "done"
        assert sha256_file(a.config.inbox / "capped.bin") == sha256_file(src)
        assert got.digest() == hashlib.sha256(payload).digest()
        assert out.result is not None and out.result["state"] == "done"
        # Measured outside the agent, at the simulator's input: never above the cap.
        assert sim.peak_rate_bps("up_in", 1.0) <= CAP * 1.02
        assert sim.stats.up.dropped_loss > 0 and sim.stats.up.duplicated > 0
        assert status["rate"] == CAP


async def test_rate_changes_at_run_time(nursery: trio.Nursery, tmp_path: Path) -> None:
    from .conftest import start_pair

    pair = await start_pair(nursery, tmp_path)
    async with open_client(pair.b.control) as client:
        assert (await client.request("get_rate"))["rate"] == 0
        assert (await client.request("set_rate", rate="1.5Mbps"))["rate"] == 1_500_000
        assert pair.b.agent.gate is not None and pair.b.agent.gate.rate_bps == 1_500_000
        assert (await client.status())["rate"] == 1_500_000
        for bad in ("10", -5, "fast", True):
            with pytest.raises(ClientError) as err:
                await client.request("set_rate", rate=bad)
            assert err.value.code == "invalid_argument"
        assert (await client.request("set_rate", rate=0))["rate"] == 0


async def test_control_goes_ahead_of_bulk_under_saturation(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    # On the in-memory network: mock time, so filling the 1 Mbit/s link costs no wall time.
    a, b = await start_memory_pair(nursery, tmp_path, MemoryNetwork(delay=0.005),
                                   rate=1_000_000)
    src = make_file(tmp_path / "bulk.bin", 10_000_000, seed=2)
    async with open_client(b.config.control) as client:
        idle = await client.open_stream(name="idle")
        await wait_for(lambda: idle.id in a.transfers)
        info = await client.send_file(src, priority=15)
        # Saturated: the bulk transfer is flowing at the cap.
        await wait_for(lambda: info["id"] in a.transfers
                       and a.transfers[info["id"]].delivered > 300_000)
        assert b.gate is not None
        before = b.gate.total_bytes
        await client.cancel(idle.id)
        await wait_for(lambda: a.transfers[idle.id].terminal)
        spent = b.gate.total_bytes - before
        # The cancel did not queue behind bulk bytes: it crossed within a few ticks'
        # worth of wire bytes (at 1 Mbit/s, 64 kB is half a second).
        assert spent <= 64_000, spent
        assert a.transfers[idle.id].error_code == "canceled"
        await client.cancel(info["id"])
