"""Received files that expire: the schedule is journaled, the sweeper deletes only them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from quelay.agent import Agent
from quelay.client import open_client

from .conftest import make_file, site_config, start_pair, wait_stopped


async def test_ttl_expiry_deletes_only_the_expired_file_and_survives_a_restart(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path)
    a = pair.a.agent
    short = make_file(tmp_path / "short.bin", 5000, seed=1)
    keep = make_file(tmp_path / "keep.bin", 5000, seed=2)
    async with open_client(pair.b.control) as client:
        s_info = await client.send_file(short, ttl="1h")
        k_info = await client.send_file(keep)
        assert (await client.wait(s_info["id"]))["state"] == "done"
        assert (await client.wait(k_info["id"]))["state"] == "done"
    got = a.transfers[s_info["id"]]
    assert got.ttl == 3600 and got.expires is not None
    assert abs(got.expires - (time.time() + 3600)) < 60
    assert a.transfers[k_info["id"]].expires is None
    # Not yet due: nothing happens.
    assert a.book.sweep_expired() == 0 and (pair.a.inbox / "short.bin").exists()
    # The receiving agent restarts; the schedule comes back from its journal.
    port = a.udp_address[1]
    await a.shutdown("test restart")
    await wait_stopped(a)
    a2 = Agent(site_config(pair.a.root, listen=("127.0.0.1", port), trust=a.config.trust))
    a2.book._wall = lambda: time.time() + 2 * 3600  # two hours later
    events: list[str] = []
    sub = a2.events.subscribe()
    assert a2.book.sweep_expired() == 1
    while True:
        try:
            events.append(sub.receive.receive_nowait()["event"])
        except trio.WouldBlock:
            break
    assert events == ["transfer.expired"]
    assert not (pair.a.inbox / "short.bin").exists()
    assert (pair.a.inbox / "keep.bin").exists()  # no ttl, no inbox_ttl: kept
    assert a2.book.sweep_expired() == 0  # once
    a2.journal.close()
    os.close(a2._lock_fd)  # never ran: release the state directory


async def test_inbox_ttl_applies_to_files_without_their_own(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path, inbox_ttl=60.0)
    a = pair.a.agent
    src = make_file(tmp_path / "any.bin", 100, seed=3)
    async with open_client(pair.b.control) as client:
        info = await client.wait((await client.send_file(src))["id"])
    assert info["state"] == "done"
    (pair.a.inbox / ".quelay-partial" / "decoy.part").write_bytes(b"x")
    a.book._wall = lambda: time.time() + 120
    assert a.book.sweep_expired() == 1
    assert not (pair.a.inbox / "any.bin").exists()
    assert (pair.a.inbox / ".quelay-partial" / "decoy.part").exists()
    async with open_client(pair.a.control) as client:
        assert (await client.get(info["id"]))["expired"] is True
