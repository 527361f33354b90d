"""An open UDP port under an Initial flood: bounded handshakes, Retry under load, untrusted
identities refused early, refusals logged without flooding the log."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from quelay.transport.admission import (
    AdmissionConfig,
    HandshakeAdmission,
    Verdict,
    host_of,
)

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
