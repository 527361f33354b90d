"""Loss recovery on explicit time: reordering is not loss, bounded probing, undo, path memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.tls import Epoch

from quelay.transport import quic_ext
from quelay.transport.path_memory import PathMemory
from quelay.transport.quic_ext import (
    MAX_PACKET_THRESHOLD,
    MAX_TIME_THRESHOLD,
    PROBE_INTERVAL_FLOOR,
    QuelayPacketRecovery,
    RobustStreamSender,
)

MDS = 1280


class Sender:
    """Hand-made packets into a recovery instance, as the connection would."""

    def __init__(self, cc: str = "reno") -> None:
        self.probes = 0
        self.rec = QuelayPacketRecovery(
            congestion_control_algorithm=cc, initial_rtt=0.1, max_datagram_size=MDS,
            peer_completed_address_validation=True, send_probe=self._probe)
        self.space = QuicPacketSpace(is_application_data=True)
        self.rec.spaces = [self.space]
        self.rec.handshake_confirmed = True
        self.next_pn = 0

    def _probe(self) -> None:
        self.probes += 1

    def send(self, now: float, n: int = 1) -> list[int]:
        pns = []
        for _ in range(n):
            pn = self.next_pn
            self.next_pn += 1
            packet = QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True,
                                    is_crypto_packet=False, packet_number=pn,
                                    packet_type=QuicPacketType.ONE_RTT, sent_time=now,
                                    sent_bytes=MDS)
            self.rec.on_packet_sent(packet=packet, space=self.space)
            pns.append(pn)
        return pns

    def ack(self, now: float, *ranges: tuple[int, int]) -> None:
        self.rec.on_ack_received(ack_rangeset=RangeSet([range(a, b) for a, b in ranges]),
                                 ack_delay=0.0, now=now, space=self.space)


def warmed(cc: str = "reno", rtt: float = 0.1) -> Sender:
    """A sender with one RTT sample of ``rtt`` and its window grown a little."""
    s = Sender(cc)
    s.send(0.0, 1)
    s.ack(rtt, (0, 1))
    return s


def test_reordered_packet_is_spurious_loss_widens_threshold_and_restores_window() -> None:
    s = warmed("reno")
    s.send(1.0, 10)  # packets 1..10
    cwnd = s.rec.congestion_window
    # Packet 2 is overtaken by 3..10: with the standard threshold of 3 it is declared lost.
    s.ack(1.1, (0, 2), (3, 11))
    assert s.rec.lost_packets == 1
    assert s.rec.congestion_window < cwnd  # Reno halved its window
    # ... and then it arrives after all: a spurious loss.
    s.ack(1.105, (0, 11))
    st = s.rec
    assert st.spurious_losses == 1
    assert st.packet_threshold > 10 - 2  # wider than the reordering seen (8 packets)
    assert st.congestion_window >= cwnd  # the congestion response is undone
    assert st.undone == 1
    # The same reordering again is no longer taken as loss.
    s.send(2.0, 10)  # 11..20
    s.ack(2.1, (0, 12), (13, 21))
    assert st.lost_packets == 1
    s.ack(2.105, (0, 21))
    assert st.spurious_losses == 1


def test_genuine_loss_is_not_undone() -> None:
    s = warmed("reno")
    s.send(1.0, 10)
    cwnd = s.rec.congestion_window
    s.ack(1.1, (0, 2), (3, 11))
    reduced = s.rec.congestion_window
    assert reduced < cwnd
    # Packet 2 never comes back; later ACKs (after its record expired) change nothing.
    s.send(1.2, 5)
    s.ack(1.6, (0, 2), (3, 16))
    assert s.rec.spurious_losses == 0 and s.rec.undone == 0
    assert s.rec.congestion_window < cwnd


def test_time_threshold_widens_on_late_arrival_and_is_bounded() -> None:
    s = warmed("reno", rtt=0.1)
    s.send(1.0, 2)  # 1, 2
    # Packet 2 acked at 1.1; packet 1 declared lost when its loss time (9/8 RTT) passes.
    s.ack(1.1, (0, 1), (2, 3))
    due = s.rec.get_loss_detection_time(amplification_limited=False)
    assert due is not None and due == pytest.approx(1.0 + 9 / 8 * 0.1)
    s.rec.on_loss_detection_timeout(now=due)
    assert s.rec.lost_packets == 1
    # It arrives 0.15 s after it was sent: 1.5 RTT.
    s.ack(1.15, (0, 3))
    assert s.rec.spurious_losses == 1
    assert s.rec.time_threshold >= 1.5
    assert s.rec.time_threshold <= quic_ext.max_time_threshold(0.1)
    # A packet 3.6 RTTs late widens it only to the bound (RTT + 100 ms here).
    s.send(2.0, 2)  # 3, 4
    s.ack(2.1, (0, 3), (4, 5))
    due = s.rec.get_loss_detection_time(amplification_limited=False)
    assert due is not None
    s.rec.on_loss_detection_timeout(now=due)
    assert s.rec.lost_packets == 2
    s.ack(2.36, (0, 5))
    assert s.rec.spurious_losses == 2
    assert s.rec.time_threshold == quic_ext.max_time_threshold(0.1) == 2.0


def test_time_threshold_bound_on_a_short_path() -> None:
    """3 ms RTT behind ±25 ms of jitter: the bound is RTT + 100 ms, not 2 RTTs."""
    assert quic_ext.max_time_threshold(0.003) == pytest.approx(1 + 0.1 / 0.003)
    assert quic_ext.max_time_threshold(0.75) == MAX_TIME_THRESHOLD
    s = warmed("reno", rtt=0.003)
    s.send(1.0, 2)
    s.ack(1.003, (0, 1), (2, 3))
    due = s.rec.get_loss_detection_time(amplification_limited=False)
    assert due is not None
    s.rec.on_loss_detection_timeout(now=due)
    s.ack(1.03, (0, 3))  # 30 ms late: 10 RTTs
    assert s.rec.spurious_losses == 1
    assert s.rec.time_threshold >= 10


def test_packet_threshold_is_bounded() -> None:
    s = warmed("reno", rtt=1.0)
    s.send(1.0, 600)  # 1..600
    s.ack(2.0, (0, 1), (2, 601))  # packet 1 overtaken by 599 others
    assert s.rec.lost_packets == 1
    s.ack(2.01, (0, 601))
    assert s.rec.packet_threshold == MAX_PACKET_THRESHOLD


def test_allotted_does_not_slow_down_for_reordering() -> None:
    """30 % of the packets overtaken every epoch: all spurious, so no backoff."""

    def run(late_ack: bool) -> float:
        s = warmed("allotted", rtt=0.1)
        cc = s.rec.congestion
        cc.set_allotment(250_000)  # type: ignore[attr-defined]
        t = 1.0
        for _ in range(12):  # 12 epochs of 0.5 s
            first = s.next_pn
            s.send(t, 10)
            # every third packet is overtaken by the rest of the flight
            holes = [first + k for k in (0, 3, 6)]
            ranges = [(0, first)]
            lo = first
            for h in holes:
                if h > lo:
                    ranges.append((lo, h))
                lo = h + 1
            ranges.append((lo, first + 10))
            s.ack(t + 0.1, *ranges)
            if late_ack:
                s.ack(t + 0.105, (0, first + 10))
            t += 0.5
        return float(cc.scale)  # type: ignore[attr-defined]

    assert run(late_ack=True) == 1.0  # reordering only: the allotment is used fully
    assert run(late_ack=False) < 0.5  # the same pattern as real loss does back off


def test_probe_interval_during_silence_is_bounded() -> None:
    """Nothing heard for 120 s: probes keep coming every max(1 s, SRTT), not backed off."""
    s = warmed("allotted", rtt=0.75)
    for k in range(8):  # a steady 750 ms path: the RTT variation settles
        t = 0.75 + k
        s.send(t, 1)
        s.ack(t + 0.75, (0, s.next_pn))
    s.send(10.0, 20)
    now = 10.0
    fired: list[float] = []
    while now < 130.0:
        at = s.rec.get_loss_detection_time(amplification_limited=False)
        assert at is not None
        now = at
        s.rec.on_loss_detection_timeout(now=now)
        fired.append(now)
        s.send(now, 1)  # the probe the connection sends
    gaps = [b - a for a, b in zip(fired, fired[1:], strict=False)]
    bound = max(PROBE_INTERVAL_FLOOR, 0.75, s.rec.get_probe_timeout())
    assert max(gaps) <= bound + 1e-9
    assert len(fired) >= 110  # ~one per second over 120 s
    # Only the first probes carried data; after that, bare PINGs (nothing declared lost).
    assert s.rec.probes == len(fired)
    assert len(s.rec._declared) <= quic_ext.SILENT_PROBES


def test_losses_found_after_a_silence_are_not_congestion() -> None:
    s = warmed("reno", rtt=0.2)
    s.send(1.0, 20)
    cwnd = s.rec.congestion_window
    now = 1.0
    for _ in range(5):  # an outage: five probes unanswered
        at = s.rec.get_loss_detection_time(amplification_limited=False)
        assert at is not None
        now = at
        s.rec.on_loss_detection_timeout(now=now)
        s.send(now, 1)
    last = s.next_pn - 1
    s.ack(now + 0.2, (0, 1), (last, last + 1))  # the link is back: the last probe is acked
    assert s.rec.outage_losses > 0
    assert s.rec.congestion_window >= cwnd  # no halving for an outage's losses
    assert s.rec.lost_packets == s.rec.outage_losses


def test_remembered_rtt_sets_the_handshake_probe_timeout() -> None:
    s = Sender("reno")
    assert s.rec.get_probe_timeout() == pytest.approx(0.2)  # aioquic's 2 × 100 ms guess
    s.rec.seed(0.75, 0.02)
    # about one RTT on the remembered path, and no sooner than the agent's 1.2-RTT
    # replacement of an unanswered dial attempt
    assert 1.25 * 0.75 <= s.rec.get_probe_timeout() < 1.0
    s.rec.seed(1e9, 0.0)  # not believed
    assert s.rec.get_probe_timeout() < 1.0


def test_robust_sender_survives_double_ack_and_late_ack_withdraws_retransmission() -> None:
    sender = RobustStreamSender(stream_id=2, writable=True)
    sender.write(b"x" * 3000, end_stream=True)
    f1 = sender.get_frame(1000)
    f2 = sender.get_frame(1000)
    f3 = sender.get_frame(1000)
    assert f1 and f2 and f3 and f3.fin
    sender.on_data_delivery(QuicDeliveryState.LOST, 1000, 2000, False)  # declared lost
    sender.on_data_delivery(QuicDeliveryState.ACKED, 1000, 2000, False)  # ...acked late
    assert not len(sender._pending)  # the retransmission is withdrawn
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 1000, False)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 1000, False)  # a tail copy's ACK
    sender.on_data_delivery(QuicDeliveryState.ACKED, 2000, 3000, True)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 1000, 3000, True)
    assert sender.is_finished
    assert sender._buffer_start == 3000


def test_path_memory_round_trip_age_and_damage(tmp_path: Path) -> None:
    now = [1000.0]
    mem = PathMemory(tmp_path, max_age=3600, clock=lambda: now[0])
    s = warmed("reno", rtt=0.75)
    conn_stats = quic_ext.PathStats(
        rtt=0.75, rtt_var=0.02, min_rtt=0.7, latest_rtt=0.75, cwnd=1, bytes_in_flight=0,
        lost_packets=0, lost_bytes=0, outage_losses=0, spurious_losses=0, spurious_probes=0,
        undone=0, tail_copies=0, tail_copy_bytes=0, probes=0, pto_count=0, packet_threshold=3,
        time_threshold=9 / 8, probe_interval=s.rec.probe_interval())
    mem.remember("10.0.0.2", conn_stats)
    again = PathMemory(tmp_path, max_age=3600, clock=lambda: now[0])
    got = again.load("10.0.0.2")
    assert got is not None and got.rtt == 0.75 and got.rtt_var == 0.02
    assert again.load("10.0.0.3") is None
    now[0] += 7200
    assert PathMemory(tmp_path, max_age=3600, clock=lambda: now[0]).load("10.0.0.2") is None
    (tmp_path / "paths.json").write_text("{not json")
    assert PathMemory(tmp_path).load("10.0.0.2") is None
    (tmp_path / "paths.json").write_text(json.dumps({"h": {"rtt": -1, "rtt_var": 0,
                                                           "min_rtt": 1, "saved_at": 0}}))
    assert PathMemory(tmp_path, clock=lambda: 0.0).load("h") is None
