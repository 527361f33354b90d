"""kill -9 of either agent mid-transfer: files resume from the journal, streams fail clearly."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.client import AgentUnavailable, ClientError, open_client
from quelay.identity import load_or_create_identity

from .conftest import make_file, sha256_file, wait_for

MiB = 1024 * 1024


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """A real `quelay run` process, restartable with the same state."""

    def __init__(self, root: Path, args: list[str]) -> None:
        self.root = root
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.control = root / "control.sock"

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "quelay.cli", "run", "--state-dir", str(self.root / "state"),
               "--inbox", str(self.root / "inbox"), "--control", str(self.control), *self.args]
        log = open(self.root / "agent.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        await wait_for(self._answers, timeout=30, poll=0.05)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"agent exited: {(self.root / 'agent.log').read_text()[-2000:]}")
        if not self.control.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.control))
            except OSError:
                return False
        return True

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def agents(tmp_path: Path) -> Any:
    port = free_udp_port()
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    # A 1.5 s dead-link bound (not 3 s): the survivor notices the killed peer sooner.
    quick = ["--keepalive", "0.5", "--dead-after", "1.5", "--reconnect-interval", "0.2"]
    a = AgentProcess(root_a, ["--listen", f"127.0.0.1:{port}", "--trust", fp_b, "--name", "a",
                              *quick])
    b = AgentProcess(root_b, ["--peer", f"127.0.0.1:{port}", "--trust", fp_a, "--name", "b",
                              *quick])
    yield a, b
    a.stop()
    b.stop()


async def link_up(agent: AgentProcess) -> bool:
    async with open_client(agent.control) as client:
        return bool((await client.status())["link"]["state"] == "up")


async def wait_link(agent: AgentProcess) -> None:
    with trio.fail_after(30):
        while not await link_up(agent):
            await trio.sleep(0.05)


async def open_reader(receiver: AgentProcess, name: str, outcome: dict[str, Any],
                      nursery: trio.Nursery) -> None:
    async def read() -> None:
        try:
            async with open_client(receiver.control) as client:
                incoming = await client.accept_incoming(name=name)
                async for _chunk in incoming:
                    pass
            outcome["reader"] = "eof"
        except (ClientError, AgentUnavailable, trio.BrokenResourceError) as exc:
            outcome["reader"] = f"error: {exc}"

    nursery.start_soon(read)


@pytest.mark.parametrize("victim", ["receiver", "sender"])
async def test_kill9_mid_file(agents: Any, tmp_path: Path, victim: str) -> None:
    a, b = agents  # a receives (listens), b sends (dials)
    await a.start()
    await b.start()
    await wait_link(b)
    src = make_file(tmp_path / "sixteen.bin", 16 * MiB, seed=50)
    outcome: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await open_reader(a, "doomed", outcome, nursery)
        async with open_client(b.control) as client:
            stream = await client.open_stream(name="doomed")
            await stream.send_all(b"x" * 100_000)
            info = await client.send_file(src)
            tid = info["id"]
            with trio.fail_after(60):
                while (await client.get(tid))["bytes"] < 4 * MiB:
                    await trio.sleep(0.01)
        (a if victim == "receiver" else b).kill9()
        await (a if victim == "receiver" else b).start()
        await wait_link(b)
        async with open_client(b.control) as client:
            with trio.fail_after(120):
                final = await client.wait(tid)
            stream_final = await client.wait(stream.id) if victim == "receiver" else None
        nursery.cancel_scope.cancel()

    assert final["state"] == "done", final
    assert sha256_file(a.root / "inbox" / "sixteen.bin") == sha256_file(src)
    # The receiver's journal shows the resume started past byte 0.
    db = sqlite3.connect(a.root / "state" / "journal.sqlite3")
    (resumed_from, state) = db.execute(
        "SELECT resumed_from, state FROM transfers WHERE id = ?", (tid,)).fetchone()
    assert state == "done" and resumed_from is not None and resumed_from > 0
    # The stream could not survive: both sides say so.
    assert outcome.get("reader", "").startswith("error"), outcome
    if stream_final is not None:
        assert stream_final["state"] == "failed"
        assert stream_final["error"]["code"] == "peer_restarted"
    else:
        async with open_client(a.control) as client:
            ls = {t["id"]: t for t in await client.ls()}
        # The restarted sender lost the stream; the receiver failed it with a reason.
        assert ls[stream.id]["state"] == "failed"
        assert ls[stream.id]["error"]["code"] == "peer_restarted"
    assert os.path.exists(a.root / "inbox" / "sixteen.bin")
