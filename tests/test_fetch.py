"""Pull: the peer's exports listed and fetched, safely, across outages and restarts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from quelay.agent import Agent
from quelay.client import open_client
from quelay.transport.memory import MemoryNetwork

from .conftest import (
    make_file,
    sha256_file,
    site_config,
    start_memory_pair,
    start_pair,
    wait_for,
    wait_stopped,
)

MiB = 1024 * 1024


async def fetch_and_wait(control: Path, name: str, **kw: Any) -> dict[str, Any]:
    async with open_client(control) as client:
        info = await client.request("fetch", name=name, **kw)
        return await client.wait(info["id"])


async def test_list_and_fetch_small_and_large(nursery: trio.Nursery, tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    small = make_file(export / "small.bin", 1000, seed=1)
    big = make_file(export / "sub" / "big.bin", 10 * MiB, seed=2)  # > the 8 MiB window
    pair = await start_pair(nursery, tmp_path, export=[f"data={export}"])
    async with open_client(pair.b.control) as client:
        files = (await client.request("ls_remote"))["files"]
    listed = {f["name"]: f for f in files}
    assert set(listed) == {"small.bin", "sub/big.bin"}
    assert listed["sub/big.bin"]["size"] == 10 * MiB and listed["small.bin"]["export"] == "data"
    # B pulls from A's export (B dials, A listens: the exporting side is the sender).
    for name, src in (("small.bin", small), ("sub/big.bin", big)):
        final = await fetch_and_wait(pair.b.control, name)
        assert final["state"] == "done", final
        assert final["direction"] == "in" and final["fetch"]["name"] == name
        assert sha256_file(pair.b.inbox / src.name) == sha256_file(src)


async def test_traversal_and_non_files_are_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    secret = make_file(tmp_path / "secret.bin", 10)
    (export / "escape").symlink_to(secret)
    os.mkfifo(export / "pipe")
    make_file(export / "ok.bin", 10)
    pair = await start_pair(nursery, tmp_path, export=[str(export)])
    for name, code in (("../secret.bin", "refused"), ("/etc/passwd", None),
                       ("escape", "refused"), ("pipe", "refused"), ("missing.bin", "not_found")):
        async with open_client(pair.b.control) as client:
            if code is None:  # an absolute path is refused before it leaves this agent
                try:
                    await client.request("fetch", name=name)
                except Exception as exc:  # noqa: BLE001 - the client error is the point
                    assert getattr(exc, "code", None) == "invalid_argument"
                    continue
                raise AssertionError("absolute fetch name accepted")
            final = await fetch_and_wait(pair.b.control, name)
        assert final["state"] == "failed", (name, final)
        assert final["error"]["code"] == code, (name, final)
    assert not any(p.name.startswith(("secret", "pipe")) for p in pair.b.inbox.iterdir())
    assert (await fetch_and_wait(pair.b.control, "ok.bin"))["state"] == "done"
    assert pair.a.agent.link_ups == 1


async def test_fetch_asked_while_down_survives_a_restart_of_the_fetcher(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    src = make_file(export / "late.bin", 2 * MiB, seed=7)
    pair = await start_pair(nursery, tmp_path, export=[str(export)])
    a, b = pair.a.agent, pair.b.agent
    port = a.udp_address[1]
    await a.shutdown("test: the exporting site goes away")
    await wait_for(lambda: b.link_state == "down")
    async with open_client(b.config.control) as client:
        info = await client.request("fetch", name="late.bin")
    assert info["state"] == "pending"
    await b.shutdown("test: the fetching site restarts too")
    await wait_stopped(a)
    await wait_stopped(b)
    a2 = Agent(site_config(pair.a.root, listen=("127.0.0.1", port), trust=a.config.trust,
                           export=[str(export)]))
    await nursery.start(a2.run)
    b2 = Agent(site_config(pair.b.root, peer=("127.0.0.1", port), trust=b.config.trust))
    await nursery.start(b2.run)
    async with open_client(b2.config.control) as client:
        final = await client.wait(info["id"])
    assert final["state"] == "done", final
    assert sha256_file(b2.config.inbox / "late.bin") == sha256_file(src)


async def test_fetch_across_an_outage(nursery: trio.Nursery, tmp_path: Path,
                                      mock_clock: trio.testing.MockClock) -> None:
    """On the in-memory network (mock time); the cap keeps the file in flight (4 s)."""
    export = tmp_path / "export"
    export.mkdir()
    src = make_file(export / "through.bin", MiB // 4, seed=9)
    net = MemoryNetwork(delay=0.005)
    a, b = await start_memory_pair(nursery, tmp_path, net, export=[str(export)],
                                   rate=500_000)
    async with open_client(b.config.control) as client:
        info = await client.request("fetch", name="through.bin")
        await wait_for(lambda: (t := b.transfers.get(info["id"])) is not None
                       and t.delivered > 0)
        net.down = True
        await wait_for(lambda: b.link_state == "down")
        assert b.transfers[info["id"]].delivered < src.stat().st_size  # cut mid-file
        net.down = False
        final = await client.wait(info["id"])
    assert final["state"] == "done", final
    assert final["resumes"] == 0 and b.link_ups == 1  # held through it: no resume needed
    assert sha256_file(b.config.inbox / "through.bin") == sha256_file(src)


async def test_fetch_survives_a_restart_of_the_exporter(nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    src = make_file(export / "long.bin", 3 * MiB, seed=5)
    pair = await start_pair(nursery, tmp_path, export=[str(export)], rate=4_000_000)
    a, b = pair.a.agent, pair.b.agent
    port = a.udp_address[1]
    async with open_client(b.config.control) as client:
        info = await client.request("fetch", name="long.bin")
        await wait_for(lambda: (t := b.transfers.get(info["id"])) is not None
                       and t.delivered > 256 * 1024)
    await a.shutdown("test: the exporting agent restarts mid-file")
    await wait_stopped(a)
    a2 = Agent(site_config(pair.a.root, listen=("127.0.0.1", port), trust=a.config.trust,
                           export=[str(export)]))
    await nursery.start(a2.run)
    async with open_client(b.config.control) as client:
        final = await client.wait(info["id"])
    assert final["state"] == "done", final
    assert final["resumes"] >= 1 and final["resumed_from"] > 0
    assert sha256_file(b.config.inbox / "long.bin") == sha256_file(src)
