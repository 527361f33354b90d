"""The command line against live agents: --json outputs, streams, progress, clean shutdown.

In-process commands run through typer's CliRunner in a worker thread, so this
test's Trio loop keeps serving the agents; commands that need real file
descriptors (stdin/stdout pipes, a pty, signals) run as subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import typer.main
from typer.testing import CliRunner, Result

from quelay.agent import Agent
from quelay.cli import app
from quelay.client import ClientError, open_client
from quelay.identity import load_or_create_identity

from .conftest import Pair, make_file, sha256_file, site_config, wait_for

INFO_KEYS = {"id", "direction", "kind", "name", "size", "priority", "attrs", "state", "bytes",
             "sent", "created", "finished", "sha256", "path", "error"}
QUELAY = [sys.executable, "-m", "quelay.cli"]


async def cli(*args: str, input: str | bytes | None = None) -> Result:
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(app, list(args), input=input))


def ctl(site: Any) -> list[str]:
    return ["--control", str(site.control)]


# -- --json everywhere ---------------------------------------------------------------------


def test_every_client_command_takes_json() -> None:
    group = typer.main.get_command(app)
    commands: dict[str, Any] = dict(group.commands)  # type: ignore[attr-defined]
    commands.update({f"config {k}": v for k, v in commands.pop("config").commands.items()})
    commands.update({f"datagram {k}": v for k, v in commands.pop("datagram").commands.items()})
    for name, command in commands.items():
        if name in ("run", "demo", "linksim"):
            continue
        opts = {opt for p in command.params for opt in p.opts}
        assert "--json" in opts, name


async def test_status_json(pair: Pair) -> None:
    result = await cli("status", *ctl(pair.b), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"agent", "name", "epoch", "role", "udp", "link", "transfers", "wire"} <= set(doc)
    assert doc["role"] == "dial" and doc["agent"] == pair.b.agent.identity.fingerprint
    assert {"state", "reason", "peer", "rtt", "cwnd"} <= set(doc["link"])
    assert doc["link"]["state"] == "up" and doc["link"]["peer"] == pair.a.agent.identity.fingerprint
    assert {"bytes_sent", "bytes_received", "datagrams_sent", "datagrams_received"} <= set(
        doc["wire"])
    text = await cli("status", *ctl(pair.b))
    assert text.stdout.splitlines()[1] == "link    up"


async def test_send_wait_get_ls(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "one.bin", 200_000, seed=4)
    sent = await cli("send", str(src), *ctl(pair.b), "--json", "--priority", "7",
                     "--attr", "origin=test")
    assert sent.exit_code == 0, sent.output
    info = json.loads(sent.stdout)
    assert set(info) >= INFO_KEYS and info["priority"] == 7 and info["attrs"] == {
        "origin": "test"}
    waited = await cli("wait", info["id"], *ctl(pair.b), "--json")
    final = json.loads(waited.stdout)
    assert waited.exit_code == 0 and final["state"] == "done"
    assert final["sha256"] == sha256_file(src) and final["bytes"] == 200_000
    got = json.loads((await cli("get", info["id"], *ctl(pair.a), "--json")).stdout)
    assert got["direction"] == "in" and got["state"] == "done"
    listed = json.loads((await cli("ls", *ctl(pair.b), "--json")).stdout)
    assert [t["id"] for t in listed] == [info["id"]] and set(listed[0]) >= INFO_KEYS

    second = make_file(tmp_path / "two.bin", 100_000, seed=5)
    result = await cli("send", str(second), *ctl(pair.b), "--wait", "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["state"] == "done"
    assert doc["sha256"] == sha256_file(second)

    third = make_file(tmp_path / "three.bin", 100_000, seed=6)
    result = await cli("send", str(third), *ctl(pair.b), "--wait")
    assert result.exit_code == 0
    assert re.fullmatch(r"[0-9a-f-]{36}", result.stdout.strip())
    assert result.stderr.splitlines()[-1].startswith("three.bin: done, 97.7 KiB in ")


async def test_cancel_and_errors_as_json(pair: Pair, tmp_path: Path) -> None:
    async with open_client(pair.b.control) as client:
        out = await client.open_stream(name="endless")
        await out.send_all(b"data")
        result = await cli("cancel", out.id, *ctl(pair.b), "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["state"] == "canceled"
        await out.aclose()
    again = await cli("cancel", out.id, *ctl(pair.b), "--json")
    assert again.exit_code == 1
    assert json.loads(again.stdout) == {"ok": False, "error": {
        "code": "conflict", "message": "transfer is already canceled"}}
    assert again.stderr.startswith("quelay: conflict: ")
    missing = await cli("get", "nope", *ctl(pair.b), "--json")
    assert missing.exit_code == 1 and json.loads(missing.stdout)["error"]["code"] == "not_found"
    down = await cli("status", "--control", str(tmp_path / "none.sock"), "--json")
    assert down.exit_code == 2
    assert json.loads(down.stdout)["error"]["code"] == "agent_unavailable"


async def test_identity_json(tmp_path: Path) -> None:
    result = await cli("identity", "--state-dir", str(tmp_path / "s"), "--json")
    doc = json.loads(result.stdout)
    assert doc["fingerprint"] == load_or_create_identity(tmp_path / "s").fingerprint
    assert Path(doc["certificate"]).is_file()
    plain = await cli("identity", "--state-dir", str(tmp_path / "s"))
    assert plain.stdout.strip() == doc["fingerprint"]


async def test_rate_command(pair: Pair) -> None:
    async with open_client(pair.b.control) as client:
        try:
            await client.get_rate()
        except ClientError as exc:
            if exc.code == "unknown_op":
                pytest.skip("this agent has no get_rate/set_rate ops yet")
            raise
    shown = await cli("rate", *ctl(pair.b), "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["rate"] == 0  # (+ per-link keys)
    assert (await cli("rate", *ctl(pair.b))).stdout.strip() == "uncapped"
    changed = await cli("rate", "2Mbps", *ctl(pair.b))
    assert changed.exit_code == 0 and changed.stdout.strip() == "2.00 Mbit/s"
    assert pair.b.agent.rate == 2_000_000
    bad = await cli("rate", "10", *ctl(pair.b))
    assert bad.exit_code == 1 and "did you mean 10Mbps" in bad.stderr
    assert pair.b.agent.rate == 2_000_000
    status = json.loads((await cli("status", *ctl(pair.b), "--json")).stdout)
    assert status["rate"] == 2_000_000
    await cli("rate", "0", *ctl(pair.b))
    assert pair.b.agent.rate == 0


async def test_events_command(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "ev.bin", 1000)
    hub = pair.b.agent.events
    before = len(hub._subs)
    async with trio.open_nursery() as nursery:
        results: list[Result] = []

        async def run_events() -> None:
            results.append(await cli("events", *ctl(pair.b), "--count", "2"))

        nursery.start_soon(run_events)
        await wait_for(lambda: len(hub._subs) > before)  # subscribed: nothing can be missed
        async with open_client(pair.b.control) as client:
            await client.send_file(src)
    events = [json.loads(line) for line in results[0].stdout.splitlines()]
    assert len(events) == 2 and events[0]["event"] == "transfer.started"
    assert all(set(e) == {"event", "data"} and set(e["data"]) >= INFO_KEYS for e in events)


# -- real processes: pipes, a pty, signals -----------------------------------------------


async def test_stream_command_from_stdin(pair: Pair) -> None:
    payload = random.Random(7).randbytes(300_000)
    received: dict[str, Any] = {}

    async def reader() -> None:
        async with open_client(pair.a.control) as client:
            incoming = await client.accept_incoming(name="from-stdin")
            received["data"] = await incoming.read_all()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        proc = await trio.run_process(
            [*QUELAY, "stream", *ctl(pair.b), "--name", "from-stdin", "--json"],
            stdin=payload, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["state"] == "done" and doc["bytes"] == len(payload)
    assert doc["sha256"] == hashlib.sha256(payload).hexdigest()
    assert received["data"] == payload

    # Without --json: progress and the verdict on stderr (plain lines: not a terminal).
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        proc = await trio.run_process([*QUELAY, "stream", *ctl(pair.b), "--name", "from-stdin"],
                                      stdin=b"short", capture_stderr=True, check=False)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 0
    assert lines[0].startswith("stream ") and lines[-1].startswith("from-stdin: done, 5 B")


async def test_recv_command_to_stdout(pair: Pair) -> None:
    payload = random.Random(8).randbytes(200_000)

    async def writer() -> None:
        async with open_client(pair.b.control) as client, \
                await client.open_stream(name="to-stdout") as out:
            await out.send_all(payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        proc = await trio.run_process([*QUELAY, "recv", *ctl(pair.a), "--name", "to-stdout",
                                       "--json"],
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == payload
    assert json.loads(proc.stderr)["state"] == "done"


async def test_send_progress_on_a_terminal(pair: Pair, tmp_path: Path) -> None:
    import pty

    src = make_file(tmp_path / "tty.bin", 100_000)
    master, slave = pty.openpty()
    try:
        proc = await trio.run_process([*QUELAY, "send", str(src), *ctl(pair.b), "--wait"],
                                      stderr=slave, capture_stdout=True, check=False)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the writer side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    text = seen.decode()
    assert "\rtty.bin: done, 97.7 KiB" in text and "\x1b[K" in text


async def _read_until(stream: trio.abc.ReceiveStream, buf: bytearray, needle: bytes) -> str:
    while needle not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"process ended before {needle!r}: {bytes(buf)!r}")
        buf += chunk
    for line in buf.decode().splitlines():
        if needle.decode() in line:
            return line
    raise AssertionError("unreachable")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_stops_cleanly_on_signal(
    nursery: trio.Nursery, tmp_path: Path, signum: signal.Signals
) -> None:
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    fp_a = load_or_create_identity(root_a / "state").fingerprint
    fp_b = load_or_create_identity(root_b / "state").fingerprint
    (root_a / "quelay.toml").write_text(
        'listen = "127.0.0.1:0"\nstate_dir = "state"\nname = "site-a"\n'
        f'trust = ["{fp_b}"]\n')
    control = root_a / "state" / "control.sock"
    env = {**os.environ, "QUELAY_LOG_FORMAT": "json"}
    proc = await trio.lowlevel.open_process(
        [*QUELAY, "run", "--config", str(root_a / "quelay.toml"), "--reconnect-interval", "1"],
        stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    log = bytearray()
    try:
        ready = json.loads(await _read_until(proc.stderr, log, b"agent ready"))
        port = int(re.search(r"udp 127\.0\.0\.1:(\d+)", ready["message"])[1])  # type: ignore[index]
        assert control.is_socket()
        b = Agent(site_config(root_b, peer=("127.0.0.1", port), trust=[fp_a]))
        await nursery.start(b.run)
        await wait_for(lambda: b.link_state == "up")
        src = make_file(tmp_path / "before-stop.bin", 100_000)
        async with open_client(b.config.control) as client:
            final = await client.wait((await client.send_file(src))["id"])
        assert final["state"] == "done"

        proc.send_signal(signum)
        async with trio.open_nursery() as inner:
            async def drain() -> None:
                assert proc.stderr is not None
                while chunk := await proc.stderr.receive_some(65536):
                    log.extend(chunk)
            inner.start_soon(drain)
            with trio.fail_after(20):
                code = await proc.wait()
        await wait_for(lambda: b.link_state != "up")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    records = [json.loads(line) for line in log.decode().splitlines()]
    assert code == 0, records
    key = (root_a / "state" / "identity.key").read_text()
    assert "PRIVATE" not in log.decode() and key.splitlines()[1] not in log.decode()
    assert not control.exists()  # the control socket is removed
    events = [r.get("event") for r in records]
    assert "link.up" in events and "shutdown" in events and "transfer.done" in events
    name = signal.Signals(signum).name
    assert any(r["message"] == f"received {name}: stopping" for r in records)
    assert records[-1]["message"] == f"agent stopped ({name})"
    assert all(r["level"] in ("info", "warning") for r in records), records
    # The peer was told why, in the QUIC close.
    reasons = (b.link_reason or "") + " ".join(
        r.get("reason", "") for r in records if r.get("event") == "link.down")
    assert f"site-a stopping ({name})" in reasons
    # The journal was closed cleanly: intact, and nothing left in a WAL file.
    journal = root_a / "state" / "journal.sqlite3"
    if journal.exists():
        assert not Path(str(journal) + "-wal").exists() or \
            Path(str(journal) + "-wal").stat().st_size == 0
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            states = {row[0] for row in db.execute("SELECT state FROM transfers")}
        assert states <= {"done"}


async def test_linksim_command(tmp_path: Path) -> None:
    bad = await cli("linksim", "--upstream", "127.0.0.1:9", "--profile", "Nope")
    assert bad.exit_code == 2
    assert bad.stderr.splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("quelay: --profile: unknown link profile 'Nope'")
    bad = await cli("linksim", "--upstream", "127.0.0.1:9", "--outage", "soon")
    assert bad.exit_code == 2 and bad.stderr.startswith("quelay: --outage: ")
    listed = await cli("linksim", "--list-profiles")
    assert "BLOS-750ms" in listed.stdout

    proc = await trio.lowlevel.open_process(
        [*QUELAY, "linksim", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
         "--stats", str(tmp_path / "stats.json"), "--seed", "1", "--stats-interval", "0",
         "--control", str(tmp_path / "sim.sock")],
        stdout=subprocess.PIPE, env={**os.environ, "QUELAY_LINKSIM_PROFILE": "LOS-250ms"})
    assert proc.stdout is not None
    out = bytearray()
    try:
        line = await _read_until(proc.stdout, out, b"listening on")
        assert "profile LOS-250ms" in line and "seed 1" in line
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert json.loads((tmp_path / "stats.json").read_text())["seed"] == 1


# -- logs ------------------------------------------------------------------------------


def _log_lines(fmt: str, emit: Any) -> list[str]:
    import io
    import logging

    from quelay.cli.logs import setup_logging

    out = io.StringIO()
    handler = setup_logging("info", fmt, stream=out)
    try:
        emit(logging.getLogger("quelay.test"))
    finally:
        logging.getLogger().removeHandler(handler)
    return out.getvalue().splitlines()


def test_json_logs_one_object_per_line_with_event_fields() -> None:
    tid = "0b1e8d3c-1111-2222-3333-444455556666"

    def emit(log: Any) -> None:
        log.info("transfer %s done: %s, %d bytes, sha256 %s", tid, "a.bin", 42, "ab" * 32)
        log.warning("site-b: link down: link dead: nothing heard")
        log.info("custom", extra={"figure": 7})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("it failed")

    lines = _log_lines("json", emit)
    assert len(lines) == 4  # the traceback stays inside its line
    done, down, custom, failed = (json.loads(line) for line in lines)
    assert done["event"] == "transfer.done" and done["transfer"] == tid
    assert done["bytes"] == 42 and done["level"] == "info" and done["logger"] == "quelay.test"
    assert done["time"].endswith("Z")
    assert down["event"] == "link.down" and down["reason"] == "link dead: nothing heard"
    assert custom["figure"] == 7 and "event" not in custom
    assert failed["level"] == "error" and "ValueError: boom" in failed["exc"]


def test_logs_never_carry_contents_or_keys() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----"

    def emit(log: Any) -> None:
        log.info("got chunk %r", b"secret payload bytes")
        log.info("loaded %s", pem)
        log.info(pem)
        log.info("private_key=%s", "hunter2")

    for fmt in ("json", "human"):
        text = "\n".join(_log_lines(fmt, emit))
        assert "secret payload" not in text and "<20 bytes>" in text
        assert "MIGHAgEAMBMGByqGSM49" not in text and "hunter2" not in text
        assert "[redacted" in text


def test_human_logs_and_bad_settings() -> None:
    from quelay.cli.logs import setup_logging

    lines = _log_lines("human", lambda log: log.info("site-a: link up"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO  quelay\.test: "
                        r"site-a: link up", lines[0])
    with pytest.raises(ValueError, match="log level"):
        setup_logging("loud", "human")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml")


def _default_sigint() -> None:
    """In the child: a suite started in the background (``pytest &`` in a script) passes
    SIGINT on as ignored, and Python then never raises KeyboardInterrupt for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_interrupted_stream_is_canceled_not_truncated(pair: Pair) -> None:
    """Ctrl-C on `quelay stream` cancels at both ends; the far side never sees 'done'."""
    read_end, write_end = os.pipe()
    proc = await trio.lowlevel.open_process(
        [*QUELAY, "stream", *ctl(pair.b), "--name", "interrupted", "-q"],
        stdin=read_end, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    os.close(read_end)
    try:
        os.write(write_end, b"first part of an endless stream\n")
        sender = pair.b.agent.transfers
        book = pair.b.agent.book
        await wait_for(lambda: any(t.name == "interrupted" and book.runtime(t).out is not None
                                   and book.runtime(t).out.accepted > 0
                                   for t in sender.values()))
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            code = await proc.wait()
    finally:
        os.close(write_end)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 130
    t = next(t for t in sender.values() if t.name == "interrupted")
    assert t.state.value == "canceled"
    await wait_for(lambda: t.id in pair.a.agent.transfers
                   and pair.a.agent.transfers[t.id].terminal)
    assert pair.a.agent.transfers[t.id].state.value == "canceled"


async def test_run_that_cannot_start_says_why(tmp_path: Path) -> None:
    busy = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        proc = await trio.run_process(
            [*QUELAY, "run", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path),
             "--trust", "sha256:" + "00" * 32],
            capture_stderr=True, check=False)
    finally:
        busy.close()
    assert proc.returncode == 1
    last = proc.stderr.decode().splitlines()[-1]
    assert last.startswith("quelay: cannot start: ") and "in use" in last
    assert not (tmp_path / "control.sock").exists()
