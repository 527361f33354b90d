"""An open UDP port under an Initial flood: bounded handshakes, Retry under load, untrusted
identities refused early, refusals logged without flooding the log."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from quelay.client import open_client
from quelay.transport.admission import (
    REASONS,
    AdmissionConfig,
    HandshakeAdmission,
    Verdict,
    host_of,
)

from .conftest import make_file, sha256_file, start_pair, wait_for

A = ("192.0.2.1", 4433)
B = ("192.0.2.2", 5555)


def initial(adm: HandshakeAdmission, addr: Any = A, *, token: bytes = b"", in_progress: int = 0,
            in_progress_host: int = 0, now: float = 0.0, dcid: bytes = b"d" * 8) -> Any:
    return adm.initial(addr=addr, version=1, dcid=dcid, scid=b"s" * 8, token=token,
                       in_progress=in_progress, in_progress_host=in_progress_host, now=now)


def test_no_load_no_retry() -> None:
    adm = HandshakeAdmission(AdmissionConfig(retry_above=4))
    d = initial(adm, in_progress=3)
    assert d.verdict is Verdict.ACCEPT and d.original_dcid == b"d" * 8 and d.retry_scid is None


def test_retry_under_load_and_its_token_admits_only_the_same_address() -> None:
    adm = HandshakeAdmission(AdmissionConfig(retry_above=4))
    d = initial(adm, in_progress=4, now=10.0)
    assert d.verdict is Verdict.RETRY and d.retry_packet is not None
    header = pull_quic_header(Buffer(data=d.retry_packet), host_cid_length=8)
    assert header.packet_type == QuicPacketType.RETRY
    assert header.destination_cid == b"s" * 8  # back to the client's source CID
    token = header.token
    ok = initial(adm, token=token, in_progress=10, now=11.0, dcid=header.source_cid)
    assert ok.verdict is Verdict.ACCEPT
    assert ok.original_dcid == b"d" * 8 and ok.retry_scid == header.source_cid
    # The same token from another address, too late, or altered: refused without state.
    assert initial(adm, B, token=token, now=11.0).reason == "bad_token"
    assert initial(adm, token=token, now=10.0 + 11).reason == "bad_token"
    forged = token[:-1] + bytes([token[-1] ^ 1])
    assert initial(adm, token=forged, now=11.0).reason == "bad_token"
    assert initial(adm, token=b"short", now=11.0).reason == "bad_token"
    other = HandshakeAdmission(AdmissionConfig())  # another agent's secret
    assert initial(other, token=token, now=11.0).reason == "bad_token"
    assert adm.counters["retry"] == 1 and adm.counters["bad_token"] == 4


def test_a_burst_of_fresh_handshakes_switches_to_retry() -> None:
    adm = HandshakeAdmission(AdmissionConfig(fresh_rate=10, fresh_burst=5, retry_above=100))
    verdicts = [initial(adm, now=0.0).verdict for _ in range(8)]
    assert verdicts == [Verdict.ACCEPT] * 5 + [Verdict.RETRY] * 3
    assert initial(adm, now=0.1).verdict is Verdict.ACCEPT  # refilled at 10/s


def test_bounds_on_concurrent_handshakes() -> None:
    adm = HandshakeAdmission(AdmissionConfig(max_handshakes=8, per_host=2, retry_above=100))
    assert initial(adm, in_progress=8).reason == "busy"
    assert initial(adm, in_progress=3, in_progress_host=2).reason == "host_busy"
    assert initial(adm, in_progress=3, in_progress_host=1).verdict is Verdict.ACCEPT


def test_untrusted_identity_penalises_its_host_doubling() -> None:
    adm = HandshakeAdmission(AdmissionConfig(penalty=1.0, max_penalty=4.0))
    assert adm.identity_refused(A, 0.0) == 1.0
    assert initial(adm, A, now=0.5).reason == "penalised"
    assert initial(adm, ("192.0.2.1", 9999), now=0.5).reason == "penalised"  # any port
    assert initial(adm, B, now=0.5).verdict is Verdict.ACCEPT
    assert initial(adm, A, now=1.0).verdict is Verdict.ACCEPT
    assert adm.identity_refused(A, 1.0) == 2.0
    assert adm.identity_refused(A, 3.0) == 4.0
    assert adm.identity_refused(A, 7.0) == 4.0  # capped
    assert adm.penalised(("::ffff:192.0.2.1", 1), 10.0)
    assert host_of(("::FFFF:192.0.2.1", 1)) == "192.0.2.1"


def test_refusals_are_logged_once_per_interval_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    adm = HandshakeAdmission(AdmissionConfig(max_handshakes=1, log_interval=10.0), label="x")
    with caplog.at_level(logging.WARNING, logger="quelay.transport"):
        for i in range(1000):
            initial(adm, in_progress=1, now=i * 0.01)  # 10 s of refusals
        initial(adm, in_progress=1, now=10.5)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "handshake.refused"]
    assert len(lines) == 2
    assert lines[0].suppressed == 0 and lines[1].suppressed == 999  # type: ignore[attr-defined]
    assert adm.counters["busy"] == 1001


def test_retry_budget_spares_the_known_peer_host() -> None:
    adm = HandshakeAdmission(AdmissionConfig(retry_above=0, retry_rate=1, retry_burst=2,
                                             penalty=5.0))
    assert [initial(adm, B, now=0.0).verdict for _ in range(3)] == \
        [Verdict.RETRY, Verdict.RETRY, Verdict.DROP]
    assert adm.counters["retry_budget"] == 1
    adm.peer_authenticated(A)
    adm.identity_refused(A, 0.0)  # e.g. a stranger behind the same NAT as the peer
    assert all(initial(adm, A, now=0.0).verdict is Verdict.RETRY for _ in range(10))
    assert initial(adm, B, now=1.0).verdict is Verdict.RETRY  # the budget refills


# -- end to end: a real listener, a flood from other processes ------------------------------

FLOODER = Path(__file__).resolve().parent / "flooder.py"


async def run_flooder(*args: str) -> trio.Process:
    return await trio.lowlevel.open_process([sys.executable, str(FLOODER), *args],
                                            stdout=subprocess.PIPE)


async def flooder_stats(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    out = b""
    while chunk := await proc.stdout.receive_some(65536):
        out += chunk
    assert await proc.wait() == 0
    stats: dict[str, Any] = json.loads(out)
    return stats


async def test_trusted_peer_connects_and_moves_a_file_during_an_initial_flood(
        nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="quelay.transport")
    pair = await start_pair(nursery, tmp_path)
    a, b = pair.a.agent, pair.b.agent
    assert a.endpoint is not None and a.endpoint.admission is not None
    adm = a.endpoint.admission
    host, port = a.udp_address[:2]
    flood = await run_flooder(f"{host}:{port}", "--mode", "spoof", "--seconds", "60",
                              "--sources", ",".join(f"127.0.0.{i}" for i in range(2, 10)))
    try:
        # The flood is on: Initials are answered by Retries (or dropped), not handshakes.
        await wait_for(lambda: adm.counters["retry"] + adm.counters["retry_budget"] >= 2000)
        accepted_before = adm.accepted
        # The trusted peer reconnects in the middle of it, then moves a file.
        assert a.session is not None
        a.session.conn.close("reconnect during the flood")
        await wait_for(lambda: b.link_ups == 2 and b.link_state == "up")
        src = make_file(tmp_path / "under-flood.bin", 2_000_000, seed=9)
        async with open_client(b.config.control) as client:
            info = await client.send_file(src)
            assert (await client.wait(info["id"]))["state"] == "done"
        assert sha256_file(a.config.inbox / "under-flood.bin") == sha256_file(src)
        assert flood.returncode is None  # still flooding all along
        absorbed = adm.counters["retry"] + adm.counters["retry_budget"]
    finally:
        flood.terminate()
        await flood.wait()
    # Thousands of Initials, and only the trusted peer's reconnect became a handshake.
    assert absorbed >= 2000
    assert adm.accepted - accepted_before == 1
    # What got in before the load was noticed is bounded (it times out, 10 s).
    assert a.endpoint.handshakes_in_progress() <= AdmissionConfig().retry_above
    assert adm.counters["retry"] >= 1  # the trusted peer's own Initial got a Retry too
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "handshake.refused"]
    assert len(refusals) <= 2 * len(REASONS)  # one line per reason per 10 s, not thousands


async def test_an_untrusted_identity_is_refused_then_ignored(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Penalties of 0.5 s, then 1 s (half the default 1 s, 2 s: the same doubling, in
    half the wall time)."""
    pair = await start_pair(nursery, tmp_path)
    a, b = pair.a.agent, pair.b.agent
    assert a.endpoint is not None and a.endpoint.admission is not None
    adm = a.endpoint.admission
    adm.config = dataclasses.replace(adm.config, penalty=0.5)
    host, port = a.udp_address[:2]
    proc = await run_flooder(f"{host}:{port}", "--mode", "untrusted", "--seconds", "1.5",
                             "--sources", "127.0.0.20", "--attempt-timeout", "0.3")
    stats = await flooder_stats(proc)
    # Its first handshake completed and was refused (pin), then its host was ignored:
    # later attempts got no answer at all, before any cryptography on our side.
    handshakes = stats["refused"] + stats["completed"]  # completed: the close came late
    assert handshakes >= 1 and stats["unanswered"] >= 1
    assert a.book.stats.peer_rejected["untrusted_identity"] == handshakes
    assert adm.counters["penalised"] >= stats["unanswered"]
    assert handshakes <= 3  # penalties of 0.5 s, then 1 s: at most 3 in 1.5 s
    assert b.link_ups == 1 and b.link_state == "up"  # the trusted session never noticed
