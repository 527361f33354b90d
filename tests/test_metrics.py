"""The Prometheus endpoint: counters move with a transfer, an outage and a refused request."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from quelay.agent.metrics import Histogram, Stats
from quelay.client import open_client
from quelay.core.codes import LinkState

from .conftest import make_file, sha256_file, start_pair, wait_for


async def scrape(address: tuple[str, int], path: str = "/metrics") -> tuple[str, str]:
    """GET over plain HTTP/1.0; returns (status line, body)."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        raw = b""
        while data := await stream.receive_some(65536):
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


async def test_metrics_follow_a_transfer_an_outage_and_a_refusal(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path, metrics=("127.0.0.1", 0))
    a, b = pair.a.agent, pair.b.agent
    assert a.metrics_address is not None and b.metrics_address is not None

    before = samples((await scrape(b.metrics_address))[1])
    assert value(before, "quelay_link_up") == 1
    assert value(before, "quelay_link_ups_total") == 1
    assert value(before, "quelay_handshake_duration_seconds_count") == 1
    assert ("quelay_control_rejected_requests_total", (("code", "not_found"),)) not in before

    # A transfer B -> A.
    src = make_file(tmp_path / "m.bin", 300_000, seed=5)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        done = await client.wait(info["id"])
        assert done["state"] == "done"
        # A refused request: cancel of a transfer that does not exist.
        with pytest.raises(Exception, match="no transfer"):
            await client.cancel("00000000-0000-4000-8000-000000000000")
        during = samples((await scrape(b.metrics_address))[1])
        assert value(during, "quelay_control_clients") >= 1
    assert sha256_file(a.config.inbox / "m.bin") == sha256_file(src)

    # An outage: the listener drops the connection; the dialler comes back.
    assert a.session is not None
    a.session.conn.close("test outage")
    await wait_for(lambda: b.link_ups == 2 and b.link_state is LinkState.UP)

    status, text = await scrape(b.metrics_address)
    assert status == "HTTP/1.0 200 OK"
    after = samples(text)
    assert value(after, "quelay_transfers_completed_total", direction="out") == 1
    assert value(after, "quelay_transfers", state="done", direction="out", kind="file") == 1
    assert value(after, "quelay_control_rejected_requests_total", code="not_found") == 1
    assert value(after, "quelay_link_ups_total") == 2
    assert value(after, "quelay_reconnects_total") == 1
    assert value(after, "quelay_recovery_duration_seconds_count") == 1
    assert value(after, "quelay_handshake_duration_seconds_count") == 2
    assert value(after, "quelay_link_state_seconds_total", state="down") > 0
    assert value(after, "quelay_link_state", state="up") == 1
    assert value(after, "quelay_payload_bytes_total", direction="sent") > 300_000
    assert (value(after, "quelay_wire_bytes_total", direction="sent")
            > value(after, "quelay_payload_bytes_total", direction="sent"))
    assert value(after, "quelay_rtt_seconds") > 0
    assert value(after, "quelay_congestion_window_bytes") > 0
    assert value(after, "quelay_rate_cap_bits_per_second") == 0
    assert value(after, "quelay_inbox_free_bytes") > 0
    assert value(after, "quelay_peer_rejected_total", reason="untrusted_identity") == 0
    # The receiver counted the incoming transfer; counters never go backwards.
    a_after = samples((await scrape(a.metrics_address))[1])
    assert value(a_after, "quelay_transfers_completed_total", direction="in") == 1
    assert (value(a_after, "quelay_payload_bytes_total", direction="received")
            >= value(before, "quelay_payload_bytes_total", direction="received"))
    for key, v in before.items():
        if key[0].endswith("_total") and key in after:
            assert after[key] >= v, key


async def test_metrics_endpoint_answers_only_get_metrics(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path, metrics=("127.0.0.1", 0))
    address = pair.a.agent.metrics_address
    assert address is not None
    assert (await scrape(address, "/nope"))[0] == "HTTP/1.0 404 Not Found"
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(b"\r\n\r\n")
        reply = await stream.receive_some(1024)
    assert reply.startswith(b"HTTP/1.0 400")
    assert (await scrape(address))[0] == "HTTP/1.0 200 OK"  # still serving


def test_stats_time_in_states_and_recoveries() -> None:
    stats = Stats()
    stats.link_changed("connecting", 0.0)
    stats.link_changed("up", 1.0)
    stats.link_changed("down", 5.0)
    stats.link_changed("connecting", 6.0)  # still down for the recovery clock
    stats.link_changed("up", 7.5)
    seconds = stats.seconds_in(8.0)
    assert seconds == {"connecting": 2.5, "up": 4.5, "down": 1.0}
    assert stats.recovery.count == 1 and stats.recovery.sum == 2.5
    stats.transfer_ended("in", "done", None)
    stats.transfer_ended("out", "failed", "io_error")
    assert stats.completed["in"] == 1 and stats.failed[("out", "io_error")] == 1


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.5, 1.7, 9.0):
        h.observe(v)
    assert h.cumulative() == [("1.0", 1), ("2.0", 3), ("+Inf", 4)]
    assert h.sum == pytest.approx(12.7)
