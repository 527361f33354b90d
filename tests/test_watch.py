"""Progress bars and ``quelay watch``: pure renderers, then the real thing against an agent."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from quelay.cli import app
from quelay.cli.watch import (
    CLEAR_LINE,
    HOME,
    ProgressPrinter,
    RateMeter,
    WatchState,
    bar,
    progress_text,
    render_watch,
    run_watch,
)
from quelay.client import open_client

from .conftest import Pair, make_file

FP = "sha256:" + "1f" * 32
PEER = "sha256:" + "2e" * 32


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def info(tid: str, name: str, state: str, done: int, size: int | None, **kw: Any
         ) -> dict[str, Any]:
    return {"id": tid, "name": name, "state": state, "bytes": done, "size": size,
            "direction": kw.pop("direction", "out"), "kind": kw.pop("kind", "file"),
            "priority": kw.pop("priority", 4), "created": 1000.0, "finished": None, **kw}


STATUS = {
    "agent": FP, "name": "site-b", "role": "dial", "rate": 2_000_000,
    "link": {"state": "up", "reason": "", "peer": PEER, "rtt": 0.2512, "cwnd": 120_000},
    "transfers": {"active": 1, "pending": 1, "done": 1},
    "wire": {"bytes_sent": 5_000_000, "bytes_received": 100_000, "rate": 1_900_000},
}
TRANSFERS = [
    info("d" * 36, "old.log", "done", 10, 10, kind="stream"),
    info("a" * 36, "big.iso", "active", 500, 1000, priority=6),
    info("b" * 36, "next.iso", "pending", 0, 2000, queue_position=2),
]


# -- pure rendering --------------------------------------------------------------------


def test_bar() -> None:
    assert bar(0, 12) == "[>         ]"
    assert bar(0.5, 12) == "[=====>    ]"
    assert bar(1, 12) == "[==========]"
    assert bar(7, 6) == "[====]"  # clamped


def test_rate_meter() -> None:
    meter = RateMeter(window=10)
    assert meter.add(0.0, 0) is None
    assert meter.add(1.0, 125_000) == 1_000_000
    assert meter.add(2.0, 125_000) == 500_000  # averaged over the window


def test_render_watch_fixed_size() -> None:
    rates = {"sent": 1_900_000.0, "received": 40_000.0, "a" * 36: 1_000_000.0}
    lines = render_watch(STATUS, TRANSFERS, rates, width=100, height=30, wall=0.0)
    assert all(len(line) == 100 for line in lines)
    text = "\n".join(lines)
    assert lines[0].startswith("quelay watch - site-b (dial) sha256:1f1f1f1f1f1f")
    assert lines[1].startswith("link      UP")
    assert "rtt 251.2 ms" in lines[2] and "cwnd 117.2 KiB" in lines[2]
    assert lines[3].startswith("cap       2.00 Mbit/s   wire out 1.90 Mbit/s (payload 1.90 Mbit/s)"
                               "  in 40.0 kbit/s")
    assert lines[4].startswith("transfers active 1, pending 1, done 1")
    header = lines[6]
    for column in ("ID", "NAME", "DIR", "PRI", "STATE", "PROGRESS", "RATE", "QUEUE"):
        assert column in header
    rows = lines[7:10]
    # Active first, then pending, then finished.
    assert [row[:8] for row in rows] == ["aaaaaaaa", "bbbbbbbb", "dddddddd"]
    assert "big.iso" in rows[0] and " 50% " in rows[0] and "1.00 Mbit/s" in rows[0]
    assert rows[0].split()[2:5] == ["out", "6", "active"]
    assert rows[1].rstrip().endswith("2")  # queue position
    assert "100%" in rows[2]
    assert "(no transfers)" not in text


def test_render_watch_small_terminal_and_link_down() -> None:
    status = {**STATUS, "link": {"state": "down", "reason": "idle timeout", "peer": None}}
    many = [info(f"{i:08d}" + "-" * 28, f"f{i}", "active", i, 100) for i in range(20)]
    lines = render_watch(status, many, {}, width=60, height=12, wall=100.0, link_since=40.0)
    assert len(lines) == 12 and all(len(line) == 60 for line in lines)
    assert lines[1].startswith("link      DOWN for 1m00s: idle timeout")
    assert lines[-1].startswith("... and 16 more")  # 4 rows fit below the header
    empty = render_watch(status, [], {}, width=80, height=20)
    assert any(line.startswith("(no transfers)") for line in empty)


def test_watch_state_turns_counters_into_rates() -> None:
    state = WatchState()
    first = state.observe(STATUS, TRANSFERS, now=0.0, wall=50.0)
    assert first["sent"] == 1_900_000  # the agent's own figure until we have two samples
    assert first["a" * 36] is None
    later = [dict(t, bytes=t["bytes"] + 250) for t in TRANSFERS]
    wire = {**STATUS["wire"], "bytes_sent": 5_125_000}  # type: ignore[dict-item]
    second = state.observe({**STATUS, "wire": wire}, later, now=1.0, wall=51.0)
    assert second["sent"] == 1_000_000 and second["a" * 36] == 2000
    assert state.link_since is None  # up since before we looked
    state.observe({**STATUS, "link": {"state": "down"}}, later, now=2.0, wall=52.0)
    assert state.link_since == 52.0


def test_progress_bar_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    out = FakeTty()
    clock = itertools.count(0.0, 1.0)
    printer = ProgressPrinter(out, clock=lambda: next(clock))
    printer.update(info("a" * 36, "big.iso", "active", 0, 1_000_000))
    printer.update(info("a" * 36, "big.iso", "active", 250_000, 1_000_000))
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 2 and all(f.endswith(CLEAR_LINE) for f in frames)
    assert all(len(f.removesuffix(CLEAR_LINE)) < 100 for f in frames)  # fits the terminal
    assert "big.iso [" in frames[1] and " 25.0% " in frames[1]
    assert "2.00 Mbit/s" in frames[1] and "ETA 3.0s" in frames[1]
    final = info("a" * 36, "big.iso", "done", 1_000_000, 1_000_000, finished=1004.0)
    printer.finish(final)
    assert out.getvalue().endswith("\rbig.iso: done, 976.6 KiB in 4.0s, 2.00 Mbit/s"
                                   + CLEAR_LINE + "\n")


def test_progress_plain_lines_are_rate_limited() -> None:
    out = io.StringIO()
    times = iter([0.0, 1.0, 6.0])
    printer = ProgressPrinter(out, plain_interval=5.0, clock=lambda: next(times))
    stream = info("s" * 36, "syslog", "active", 0, None, kind="stream")
    printer.written = 4096
    for done in (0, 1000, 2000):
        printer.update(dict(stream, bytes=done))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[1].startswith("syslog written 4.0 KiB acknowledged 2.0 KiB")
    failed = dict(stream, state="failed", error={"code": "link_lost", "message": "gone"})
    printer.finish(failed)
    assert out.getvalue().splitlines()[-1] == "syslog: failed, 0 B (link_lost: gone)"


def test_progress_text_without_room_for_a_bar() -> None:
    text = progress_text(info("a" * 36, "x" * 70, "active", 5, 10), 8.0, 80)
    assert "[" not in text and " 50.0% " in text


# -- live ------------------------------------------------------------------------------


async def test_watch_a_live_agent(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "done.bin", 20_000)
    out = FakeTty()
    async with open_client(pair.b.control) as client:
        await client.wait((await client.send_file(src))["id"])
        writer = await client.open_stream(name="live-stream", priority=7)
        await writer.send_all(b"x" * 10_000)  # left open: the stream stays active
        frames = await run_watch(client, out, interval=0.01, count=3,
                                 size=lambda: (100, 30))
        await writer.abort()
    assert frames == 3
    text = out.getvalue()
    assert text.count(HOME) == 4  # clear once, then one repaint per frame
    last = text.split(HOME)[-1]
    lines = [line.removesuffix(CLEAR_LINE) for line in last.split("\r\n")]
    assert lines[0].startswith("quelay watch - b (dial)")
    assert lines[1].startswith("link      UP")
    rows = {line.split()[1]: line for line in lines if line[:8] in (writer.id[:8],)}
    assert "live-stream" in rows and rows["live-stream"].split()[2:5] == ["out", "7", "active"]
    assert any("done.bin" in line and "done" in line and "100%" in line for line in lines)


async def test_watch_command(pair: Pair) -> None:
    def invoke(*args: str) -> Any:
        return CliRunner().invoke(app, ["watch", "--control", str(pair.b.control), *args],
                                  env={"COLUMNS": "90", "LINES": "20"})

    result = await trio.to_thread.run_sync(invoke, "--count", "2", "--interval", "0.05")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert sum(line.startswith("quelay watch - b (dial)") for line in lines) == 2
    assert all(len(line) <= 90 for line in lines)
    assert sum(line.startswith("link      UP") for line in lines) == 2

    result = await trio.to_thread.run_sync(invoke, "--count", "2", "--interval", "0.05",
                                           "--json")
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 2
    assert docs[1]["status"]["link"]["state"] == "up"
    assert set(docs[1]) == {"time", "status", "transfers", "rates"}
