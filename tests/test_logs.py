"""Structured logs: records carry their fields (``extra=``); the JSON formatter writes them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.cli import logs
from quelay.cli.logs import setup_logging
from quelay.client import open_client

from .conftest import make_file, start_pair, wait_for


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Capture JSON logs; text parsing is disabled, so every field must come from extra."""
    monkeypatch.setattr(logs, "enrich", lambda message: {})
    out = io.StringIO()
    handler = setup_logging("info", "json", stream=out)
    try:
        yield out
    finally:
        logging.getLogger().removeHandler(handler)


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_extra_fields_become_keys_and_are_redacted(json_log: io.StringIO) -> None:
    log = logging.getLogger("quelay.test")
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----"
    log.info("a thing happened", extra={
        "event": "thing", "count": 3, "ratio": 0.5, "ok": True, "nothing": None,
        "payload": b"secret payload", "key": pem, "nested": {"inner": [1, b"xy"]},
        "time": "forged", "level": "forged"})
    (rec,) = records(json_log)
    assert rec["event"] == "thing" and rec["count"] == 3 and rec["ratio"] == 0.5
    assert rec["ok"] is True and rec["nothing"] is None
    assert rec["payload"] == "<14 bytes>"
    assert "MIGHAgEAMBMGByqGSM49" not in json.dumps(rec) and "[redacted" in rec["key"]
    assert rec["nested"] == {"inner": [1, "<2 bytes>"]}
    assert rec["time"] != "forged" and rec["level"] == "info"  # the formatter's own keys win
    assert rec["message"] == "a thing happened"


def test_a_record_without_fields_has_only_the_base_keys(json_log: io.StringIO) -> None:
    logging.getLogger("quelay.test").warning("plain %s", "text")
    (rec,) = records(json_log)
    assert set(rec) == {"time", "level", "logger", "message"}
    assert rec["level"] == "warning" and rec["message"] == "plain text"


async def test_agent_events_carry_their_fields(json_log: io.StringIO, nursery: trio.Nursery,
                                               tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path)
    a, b = pair.a.agent, pair.b.agent
    src = make_file(tmp_path / "f.bin", 50_000, seed=1)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src, priority=3)
        assert (await client.wait(info["id"]))["state"] == "done"
        b.set_rate(2_000_000)
    await wait_for(lambda: any(r.get("event") == "transfer.done" and r.get("direction") == "in"
                               for r in records(json_log)))
    assert a.session is not None
    a.session.conn.close("test outage")
    await wait_for(lambda: b.link_ups == 2)
    recs = records(json_log)

    def one(event: str, **match: Any) -> dict[str, Any]:
        found = [r for r in recs if r.get("event") == event
                 and all(r.get(k) == v for k, v in match.items())]
        assert found, (event, match, [r.get("event") for r in recs])
        return found[0]

    started = one("transfer.started", agent="b", direction="out")
    assert started["transfer"] == info["id"] and started["transfer_name"] == "f.bin"
    assert started["kind"] == "file" and started["priority"] == 3
    done = one("transfer.done", agent="a", direction="in")
    assert done["bytes"] == 50_000 and len(done["sha256"]) == 64
    assert one("rate", agent="b")["rate"] == 2_000_000
    assert one("link.up", agent="b")["peer"] == a.fingerprint
    ended = one("connection.ended", agent="b")
    assert ended["peer"].startswith("127.0.0.1:") and ended["reason"]
    down = one("link.down", agent="a")
    assert down["state"] == "down" and down["reason"]
    # No payload, no key material anywhere.
    text = json_log.getvalue()
    assert "PRIVATE KEY" not in text and src.read_bytes()[:16].hex() not in text
