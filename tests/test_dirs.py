"""Directory trees as one transfer: every file verified before the tree appears."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest
import trio

from quelay.client import ClientError, open_client
from quelay.transport.memory import MemoryNetwork

from .conftest import start_memory_pair, start_pair, wait_for


def make_tree(root: Path, files: int, seed: int = 1) -> dict[str, tuple[int, int, str]]:
    """Nested folders of small files with various modes; returns {rel: (size, mode, sha)}."""
    rng = random.Random(seed)
    out: dict[str, tuple[int, int, str]] = {}
    for i in range(files):
        rel = f"d{i % 7}/sub{i % 3}/file-{i}.bin" if i % 5 else f"top-{i}.txt"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(0, 6000))
        path.write_bytes(data)
        mode = 0o600 if i % 4 == 0 else 0o644 if i % 4 == 1 else 0o755 if i % 4 == 2 else 0o640
        os.chmod(path, mode)
        out[rel] = (len(data), mode, hashlib.sha256(data).hexdigest())
    (root / "empty" / "deeper").mkdir(parents=True)
    return out


def read_tree(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            out[str(path.relative_to(root))] = (len(data), stat.S_IMODE(path.stat().st_mode),
                                                hashlib.sha256(data).hexdigest())
    return out


async def test_tree_of_200_files_across_an_outage(nursery: trio.Nursery, tmp_path: Path,
                                                  mock_clock: trio.testing.MockClock) -> None:
    src = tmp_path / "tree"
    expected = make_tree(src, 200)
    net = MemoryNetwork(delay=0.005)  # mock time: the outage costs no wall time
    a, b = await start_memory_pair(nursery, tmp_path, net, rate=8_000_000)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        assert info["kind"] == "dir" and info["files"] == 200
        group_id = info["id"]
        await wait_for(lambda: (g := a.transfers.get(group_id)) is not None
                       and g.members_done >= 40)
        assert not (a.config.inbox / "tree").exists()  # invisible until complete
        net.down = True
        await wait_for(lambda: b.link_state == "down")
        assert not (a.config.inbox / "tree").exists()
        net.down = False
        final = await client.wait(group_id)
    assert final["state"] == "done", final
    landed = a.config.inbox / "tree"
    assert read_tree(landed) == expected
    assert (landed / "empty" / "deeper").is_dir()
    assert a.transfers[group_id].state.value == "done"
    assert not list((a.config.inbox / ".quelay-partial").iterdir())  # nothing left behind


async def test_a_tree_with_a_symlink_is_refused(pair: object, tmp_path: Path) -> None:
    src = tmp_path / "linked"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "link").symlink_to("/etc/passwd")
    async with open_client(pair.b.control) as client:  # type: ignore[attr-defined]
        with pytest.raises(ClientError) as err:
            await client.send_file(src)
    assert err.value.code == "invalid_argument"


async def test_an_unsafe_path_in_a_tree_fails_the_whole_tree(nursery: trio.Nursery,
                                                              tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path)
    src = tmp_path / "t"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    (src / "CON").write_text("a Windows device name: refused by the receiver")
    async with open_client(pair.b.control) as client:
        info = await client.send_file(src)
        final = await client.wait(info["id"])
    assert final["state"] == "failed" and final["error"]["code"] == "unsafe_name"
    assert not (pair.a.inbox / "t").exists()
    await wait_for(lambda: not list((pair.a.inbox / ".quelay-partial").iterdir()))
    assert pair.a.agent.link_ups == 1


async def test_a_tree_expires_as_a_whole(nursery: trio.Nursery, tmp_path: Path) -> None:
    import time

    pair = await start_pair(nursery, tmp_path)
    src = tmp_path / "short-lived"
    make_tree(src, 5)
    async with open_client(pair.b.control) as client:
        info = await client.request("send_file", path=str(src), ttl="10m")
        final = await client.wait(info["id"])
    assert final["state"] == "done" and final["ttl"] == 600
    landed = pair.a.inbox / "short-lived"
    assert landed.is_dir()
    pair.a.agent.book._wall = lambda: time.time() + 3600
    assert pair.a.agent.book.sweep_expired() == 1
    assert not landed.exists() and pair.a.inbox.is_dir()
