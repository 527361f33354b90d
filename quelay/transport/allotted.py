"""``allotted``: congestion control for a link whose capacity is granted, not discovered.

Reno and Cubic read every loss as congestion and halve their window; on a
satellite hop with a few percent of random loss that starves the link far
below the operator's allotment. ``allotted`` instead keeps the window at a
multiple of (allotment × base RTT) and lets the pacer and the wire gate hold
the cap. It still backs off when the path is really narrower than the cap:

* loss far above the link's base rate (more than ``LOSS_BACKOFF`` of the
  packets in an epoch), or
* persistent queueing delay (smoothed RTT above twice the minimum plus a
  margin for a whole epoch),

each shrink the window by ``BACKOFF``; clean epochs grow it back. An epoch in
which nothing at all got through is an outage, not congestion, and changes
nothing: the link supervisor deals with it. Reordering is not loss either: a
loss that loss recovery later finds spurious (the packet was acknowledged
after all, :meth:`on_spurious_loss`) is taken back out of its epoch's count,
and a backoff that only those losses caused is undone. Without a
cap (no allotment known), it behaves like slow start with the same
loss-tolerant backoff, bounded by the receiver's flow control.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from aioquic.quic.congestion.base import (
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket

GAIN = 2.0
RTT_MARGIN = 0.1  # seconds added to the base RTT: jitter and ACK delay
LOSS_BACKOFF = 0.2
QUEUE_FACTOR = 2.0
BACKOFF = 0.8
RECOVER = 1.1
MIN_SCALE = 0.05
EPOCH_MIN = 0.5  # seconds
LOSS_MEMORY = 4096  # lost packets whose epoch we remember, for undoing spurious ones


@dataclass
class _Backoff:
    """The last loss-driven backoff, kept so that spurious losses can undo it."""

    epoch: int
    scale: float  # before the backoff
    acked: int
    lost: int


class AllottedCongestionControl(QuicCongestionControl):
    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mds = max_datagram_size
        self.allotment = 0.0  # bytes/s; 0 = unknown (uncapped)
        self.scale = 1.0
        self.min_rtt: float | None = None
        self.smoothed_rtt: float | None = None
        self._epoch_start: float | None = None
        self._epoch_acked = 0
        self._epoch_lost = 0
        self._epoch_queued = True
        self._epoch_id = 0
        self._lost_in: OrderedDict[tuple[int, float], int] = OrderedDict()
        self._last_backoff: _Backoff | None = None
        self.undone = 0

    def set_allotment(self, bytes_per_second: float) -> None:
        self.allotment = bytes_per_second
        self._update_window()

    def _update_window(self) -> None:
        if self.allotment <= 0 or self.min_rtt is None:
            return
        target = self.allotment * self.scale * (self.min_rtt + RTT_MARGIN) * GAIN
        self.congestion_window = max(int(target), K_MINIMUM_WINDOW * self._mds)

    def _end_epoch(self, now: float) -> None:
        start = self._epoch_start
        if start is None:
            self._epoch_start = now
            return
        rtt = self.min_rtt or 0.0
        if now - start < max(EPOCH_MIN, 2 * rtt):
            return
        total = self._epoch_acked + self._epoch_lost
        loss_rate = self._epoch_lost / total if total else 0.0
        if self._epoch_acked == 0:
            pass  # nothing got through at all: an outage, not a narrower path; keep the window
        elif loss_rate > LOSS_BACKOFF or self._epoch_queued:
            self._last_backoff = None if self._epoch_queued else _Backoff(
                self._epoch_id, self.scale, self._epoch_acked, self._epoch_lost)
            self.scale = max(MIN_SCALE, self.scale * BACKOFF)
            if self.allotment <= 0:
                self.congestion_window = max(int(self.congestion_window * BACKOFF),
                                             K_MINIMUM_WINDOW * self._mds)
        else:
            self.scale = min(1.0, self.scale * RECOVER)
        self._epoch_start = now
        self._epoch_acked = self._epoch_lost = 0
        self._epoch_queued = True
        self._epoch_id += 1
        self._update_window()

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._epoch_acked += 1
        if self.allotment <= 0:
            self.congestion_window += packet.sent_bytes  # no grant known: keep probing
        self._end_epoch(now)

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._epoch_lost += 1
            self._lost_in[(packet.packet_number, packet.sent_time or 0.0)] = self._epoch_id
        while len(self._lost_in) > LOSS_MEMORY:
            self._lost_in.popitem(last=False)
        self._end_epoch(now)

    def on_spurious_loss(self, *, now: float, packet: QuicSentPacket) -> None:
        """A packet reported lost was acknowledged later (reordering): take the loss back."""
        epoch = self._lost_in.pop((packet.packet_number, packet.sent_time or 0.0), None)
        if epoch is None:
            return
        self._epoch_acked += 1
        if epoch == self._epoch_id:
            self._epoch_lost = max(0, self._epoch_lost - 1)
            return
        backoff = self._last_backoff
        if backoff is None or backoff.epoch != epoch:
            return
        backoff.lost -= 1
        backoff.acked += 1
        total = backoff.acked + backoff.lost
        if total and backoff.lost / total <= LOSS_BACKOFF:
            # The backoff was reordering's doing, not the path's: undo it.
            self.scale = max(self.scale, backoff.scale)
            self._last_backoff = None
            self.undone += 1
            self._update_window()

    def on_persistent_congestion(self) -> None:
        # Every packet over several PTOs was lost: on a granted link that is an outage
        # (the supervisor's business), not congestion. The epoch rules still back off
        # when some packets get through but too many are lost.
        return

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
            self._update_window()
        self.smoothed_rtt = rtt if self.smoothed_rtt is None else (
            0.875 * self.smoothed_rtt + 0.125 * rtt)
        if self.smoothed_rtt < QUEUE_FACTOR * self.min_rtt + RTT_MARGIN:
            self._epoch_queued = False


register_congestion_control("allotted", AllottedCongestionControl)
CONGESTION_CONTROLS = ("reno", "cubic", "allotted")
