"""Files and streams end to end between two real agents on UDP loopback."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio

from quelay.client import open_client

from .conftest import Pair, make_file, sha256_file


async def send_and_wait(control: Path, path: Path, **kw: object) -> dict:
    async with open_client(control) as client:
        info = await client.send_file(path, **kw)  # type: ignore[arg-type]
        return await client.wait(info["id"])


# 10 MiB + 3: past the connection window (8 MiB), two fsync batches (4 MiB) and the
# sender's journal step (8 MiB), not a multiple of any of them.
@pytest.mark.parametrize("size", [0, 1, 9000, 10 * 1024 * 1024 + 3])
async def test_file_sizes(pair: Pair, tmp_path: Path, size: int) -> None:
    src = make_file(tmp_path / f"src-{size}.bin", size, seed=size)
    final = await send_and_wait(pair.b.control, src)
    assert final["state"] == "done", final
    assert final["bytes"] == size
    assert final["sha256"] == sha256_file(src)
    landed = pair.a.inbox / src.name
    assert landed.exists()
    assert sha256_file(landed) == sha256_file(src)
    # Nothing left behind in the partial area.
    assert list((pair.a.inbox / ".quelay-partial").iterdir()) == []


async def test_existing_name_is_not_overwritten(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "same.bin", 1000, seed=1)
    (pair.a.inbox / "same.bin").write_bytes(b"precious")
    final = await send_and_wait(pair.b.control, src)
    assert final["state"] == "done"
    assert (pair.a.inbox / "same.bin").read_bytes() == b"precious"
    assert sha256_file(pair.a.inbox / "same (1).bin") == sha256_file(src)


async def stream_across(src_control: Path, dst_control: Path, size: int, seed: int,
                        name: str) -> tuple[bytes, bytes, dict]:
    rng = random.Random(seed)
    sent, got = hashlib.sha256(), hashlib.sha256()
    result: dict = {}

    async def reader() -> None:
        async with open_client(dst_control) as client:
            incoming = await client.accept_incoming(name=name)
            async for chunk in incoming:
                got.update(chunk)
            result["in"] = await client.wait(incoming.id)

    async def writer() -> None:
        async with open_client(src_control) as client:
            async with await client.open_stream(name=name) as out:
                left = size
                while left:
                    chunk = rng.randbytes(min(left, rng.randint(1, 200_000)))
                    sent.update(chunk)
                    await out.send_all(chunk)
                    left -= len(chunk)
            result["out"] = out.result

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)
    assert result["in"]["state"] == "done", result
    return sent.digest(), got.digest(), result


async def test_stream_of_unknown_length(pair: Pair) -> None:
    size = 10 * 1024 * 1024 + 12345  # past the connection window (8 MiB), ten spools
    sent, got, result = await stream_across(pair.b.control, pair.a.control, size, 7, "big")
    assert sent == got
    assert result["out"]["state"] == "done"
    assert result["out"]["bytes"] == size  # the final ack equals the total
    assert result["out"]["sha256"] == sent.hex()


async def test_sixteen_transfers_both_directions(pair: Pair, tmp_path: Path) -> None:
    outcomes: list[bool] = []

    async def one_file(i: int, src_site: str) -> None:
        sender = pair.a if src_site == "a" else pair.b
        receiver = pair.b if src_site == "a" else pair.a
        src = make_file(tmp_path / f"f{src_site}{i}.bin", 300_000 + i * 7919, seed=i)
        final = await send_and_wait(sender.control, src)
        outcomes.append(final["state"] == "done"
                        and sha256_file(receiver.inbox / src.name) == sha256_file(src))

    async def one_stream(i: int, src_site: str) -> None:
        sender = pair.a if src_site == "a" else pair.b
        receiver = pair.b if src_site == "a" else pair.a
        sent, got, _ = await stream_across(sender.control, receiver.control, 500_000 + i, i,
                                           f"s{src_site}{i}")
        outcomes.append(sent == got)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            for side in ("a", "b"):
                nursery.start_soon(one_file, i, side)
                nursery.start_soon(one_stream, i, side)
    assert len(outcomes) == 16
    assert all(outcomes)
