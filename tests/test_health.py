"""``quelay health``: 0 when the agent answers (with --link: and the link is up), else not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
from typer.testing import CliRunner, Result

from quelay.agent import Agent
from quelay.cli import app
from quelay.identity import load_or_create_identity

from .conftest import Pair, site_config, start_pair, wait_for


async def health(*args: str) -> Result:
    """Run the command in a worker thread: the agents keep running on this Trio loop."""
    return await trio.to_thread.run_sync(lambda: CliRunner().invoke(app, ["health", *args]))


async def test_agent_up_and_link_up(pair: Pair) -> None:
    for args in ([], ["--link"]):
        result = await health("--control", str(pair.b.control), *args)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("ok: agent answers, link up")
    result = await health("--control", str(pair.b.control), "--link", "--json")
    assert json.loads(result.stdout) == {"ok": True, "agent": True, "link": "up",
                                         "reason": None}


async def test_agent_down(tmp_path: Path) -> None:
    result = await health("--control", str(tmp_path / "nothing.sock"))
    assert result.exit_code == 2
    assert "unhealthy" in result.stderr and "nothing.sock" in result.stderr
    result = await health("--control", str(tmp_path / "nothing.sock"), "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 2 and doc["ok"] is False and doc["agent"] is False


async def test_stale_socket_and_silent_agent(tmp_path: Path) -> None:
    # A socket file nobody listens on (an agent killed with -9 leaves one).
    stale = tmp_path / "stale.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(stale))
    sock.close()
    assert (await health("--control", str(stale))).exit_code == 2

    # Something that accepts but never answers: the timeout decides.
    silent = tmp_path / "silent.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(silent))
    listener.listen(4)
    held: list[trio.socket.SocketType] = []

    async def accept_and_hold() -> None:
        while True:
            conn, _ = await listener.accept()
            held.append(conn)

    async with trio.open_nursery() as inner:
        inner.start_soon(accept_and_hold)
        result = await health("--control", str(silent), "--timeout", "0.2")
        inner.cancel_scope.cancel()
    assert result.exit_code == 2 and "did not answer" in result.stderr
    listener.close()
    for conn in held:
        conn.close()


async def test_link_down_fails_only_with_link(nursery: trio.Nursery, tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path)
    await pair.a.agent.shutdown("stopped by the test")
    await wait_for(lambda: pair.b.agent.link_state != "up")
    result = await health("--control", str(pair.b.control))
    assert result.exit_code == 0  # the agent itself is fine
    result = await health("--control", str(pair.b.control), "--link", "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1
    assert doc["ok"] is False and doc["agent"] is True
    assert doc["link"] in ("down", "connecting")  # it keeps redialling the stopped peer


async def test_never_connected(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A dialler whose peer never answers is 'connecting': healthy, but its link is not."""
    root = tmp_path / "lonely"
    load_or_create_identity(root / "state")
    # Port 9 (discard) on loopback: nothing answers QUIC there.
    agent = Agent(site_config(root, peer=("127.0.0.1", 9), trust=["sha256:" + "00" * 32]))
    await nursery.start(agent.run)
    result = await health("--control", str(agent.config.control), "--link")
    assert result.exit_code == 1 and "link connecting" in result.stderr
    assert (await health("--control", str(agent.config.control))).exit_code == 0


async def test_exit_codes_from_a_real_process(pair: Pair, tmp_path: Path) -> None:
    """What a container healthcheck sees: the process's exit status."""
    cmd = [sys.executable, "-m", "quelay.cli", "health", "--link", "--control"]
    up = await trio.run_process([*cmd, str(pair.a.control)], check=False,
                                capture_stdout=True)
    down = await trio.run_process([*cmd, str(tmp_path / "none.sock")], check=False,
                                  capture_stderr=True)
    assert (up.returncode, down.returncode) == (0, 2)
