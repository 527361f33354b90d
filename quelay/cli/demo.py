"""``quelay demo``: two agents on loopback, one file and one stream, verified.

Everything is real — UDP sockets, QUIC with mutual pinning, control sockets,
an inbox on disk — only started in one process for convenience.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from ..agent import Agent, AgentConfig
from ..client import open_client
from ..identity import load_or_create_identity
from ..units import format_rate, format_size


def _say(text: str) -> None:
    print(text, flush=True)


async def _progress(label: str, get: Any, total: int | None, done: trio.Event) -> None:
    start = time.monotonic()
    tty = sys.stdout.isatty()
    while not done.is_set():
        with trio.move_on_after(0.5):
            await done.wait()
        count = await get()
        elapsed = max(time.monotonic() - start, 1e-6)
        pct = f"{100 * count / total:5.1f}% " if total else ""
        rate = format_rate(8 * count / elapsed, zero="0 bit/s")
        line = f"  {label}: {pct}{format_size(count)} at {rate}"
        if tty:
            sys.stdout.write("\r" + line + "\x1b[K")
            sys.stdout.flush()
        else:
            _say(line)
    if tty:
        sys.stdout.write("\n")


async def run_demo(size: int, keep: bool = False) -> bool:
    root = Path(tempfile.mkdtemp(prefix="quelay-demo-"))
    try:
        return await _demo(root, size)
    finally:
        if keep:
            _say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


async def _demo(root: Path, size: int) -> bool:
    site_a, site_b = root / "site-a", root / "site-b"
    fp_a = load_or_create_identity(site_a / "state").fingerprint
    fp_b = load_or_create_identity(site_b / "state").fingerprint
    _say(f"site A identity {fp_a}")
    _say(f"site B identity {fp_b}")
    agent_a = Agent(
        AgentConfig(
            state_dir=site_a / "state",
            inbox=site_a / "inbox",
            control=site_a / "control.sock",
            listen=("127.0.0.1", 0),
            trust=[fp_b],
            name="site-a",
        )
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_a.run)
        agent_b = Agent(
            AgentConfig(
                state_dir=site_b / "state",
                inbox=site_b / "inbox",
                control=site_b / "control.sock",
                peer=agent_a.udp_address,
                trust=[fp_a],
                name="site-b",
            )
        )
        await nursery.start(agent_b.run)
        _say(
            f"site A listening on udp {agent_a.udp_address[0]}:{agent_a.udp_address[1]}; "
            "site B dialling"
        )
        ok = await _exchange(site_a, site_b, size)
        await agent_b.shutdown("demo finished")
        await agent_a.shutdown("demo finished")
        nursery.cancel_scope.cancel()
    return ok


async def _exchange(site_a: Path, site_b: Path, size: int) -> bool:
    rng = random.Random()
    source = site_b / "demo-file.bin"
    source.write_bytes(rng.randbytes(size))
    file_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    results: dict[str, Any] = {}
    async with open_client(site_b / "control.sock") as b, open_client(site_a / "control.sock") as a:
        started = time.monotonic()
        info = await b.send_file(source, name="demo-file.bin")
        _say(f"file B -> A: {format_size(size)}, id {info['id']}")
        done = trio.Event()
        async with trio.open_nursery() as nursery:

            async def get_file() -> int:
                return int((await b.get(info["id"]))["bytes"])

            nursery.start_soon(_progress, "file", get_file, size, done)
            results["file"] = await b.wait(info["id"])
            done.set()
        file_time = time.monotonic() - started
        landed = Path(results["file"]["path"] or "") if results["file"]["path"] else None
        received = await a.ls()
        inbound = next(t for t in received if t["id"] == info["id"])
        landed = Path(inbound["path"]) if inbound["path"] else None
        file_ok = (
            results["file"]["state"] == "done"
            and landed is not None
            and hashlib.sha256(landed.read_bytes()).hexdigest() == file_sha
        )

        _say(f"stream B -> A: unknown length, written in random chunks ({format_size(size)})")
        sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
        counts = {"read": 0}
        started = time.monotonic()
        done = trio.Event()

        async def reader() -> None:
            incoming = await a.accept_incoming(name="demo-stream")
            async for chunk in incoming:
                got_hash.update(chunk)
                counts["read"] += len(chunk)

        async def writer() -> None:
            async with await b.open_stream(name="demo-stream") as out:
                left = size
                while left:
                    chunk = rng.randbytes(min(left, rng.randint(1, 256 * 1024)))
                    sent_hash.update(chunk)
                    await out.send_all(chunk)
                    left -= len(chunk)
            results["stream"] = out.result

        async def get_stream() -> int:
            return counts["read"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_progress, "stream", get_stream, None, done)
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                inner.start_soon(writer)
            done.set()
        stream_time = time.monotonic() - started
        stream_ok = results["stream"]["state"] == "done" and sent_hash.digest() == got_hash.digest()

    _say("")
    _say("summary")
    _say(
        f"  file    {format_size(size)} in {file_time:.2f}s "
        f"({format_rate(8 * size / file_time)})  sha256 {'match' if file_ok else 'MISMATCH'}"
    )
    _say(
        f"  stream  {format_size(counts['read'])} in {stream_time:.2f}s "
        f"({format_rate(8 * counts['read'] / stream_time)})  "
        f"sha256 {'match' if stream_ok else 'MISMATCH'}"
    )
    _say("demo " + ("passed" if file_ok and stream_ok else "FAILED"))
    return file_ok and stream_ok
