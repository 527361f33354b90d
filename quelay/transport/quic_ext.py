"""Our aioquic ``QuicConnection`` subclass: credit by consumption, client certs.

aioquic raises receive windows when data *arrives*; for a relay that means a
slow local reader never slows the sender. We replace the two window-writing
hooks so that MAX_STREAM_DATA / MAX_DATA advance only by what the local
consumer has taken (``consume``). The server side also requests a client
certificate, so both agents can be pinned. These hooks are private aioquic
API, which is why the dependency is pinned to ``aioquic<2`` and why this is the
only module that touches them.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    Limit,
    QuicConnection,
)
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.recovery import QuicPacketPacer

from . import allotted  # noqa: F401  (registers the "allotted" congestion control)

PACER_BURST_DATAGRAMS = 64
MAX_PTO_BACKOFF = 1  # probe at most every 2 PTOs while the path is silent


class CoarsePacer(QuicPacketPacer):
    """aioquic's pacer with a larger burst, so the driver wakes per batch, not per 2 packets.

    Precise pacing at the operator's cap is the wire gate's job (one token
    bucket for every byte); this pacer only smooths what congestion control
    allows, and a burst of 64 datagrams is what GSO sends in one syscall.
    """

    cap_bytes_per_second: float = 0.0  # the operator's cap; 0 = none

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        pacing_rate = congestion_window / max(smoothed_rtt, 1e-6)
        burst: float = max(2 * self._max_datagram_size,
                    min(congestion_window // 2, PACER_BURST_DATAGRAMS * self._max_datagram_size))
        if self.cap_bytes_per_second > 0:
            # Never pace above the cap: datagrams are made no faster than the gate lets
            # them out, so none waits long enough to look lost to loss detection.
            pacing_rate = min(pacing_rate, self.cap_bytes_per_second)
            burst = max(2 * self._max_datagram_size, min(burst, pacing_rate * 0.01))
        self.packet_time = max(1e-6, min(self._max_datagram_size / pacing_rate, 1.0))
        self.bucket_max = burst / pacing_rate
        self.bucket_time = min(self.bucket_time, self.bucket_max)


class QuelayQuicConnection(QuicConnection):
    def __init__(
        self,
        *,
        stream_window: int,
        connection_window: int,
        max_streams: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._consumed: dict[int, int] = {}
        self._consumed_total = 0
        self._local_max_data.value = self._local_max_data.sent = connection_window
        self._local_max_stream_data_bidi_local = stream_window
        self._local_max_stream_data_bidi_remote = stream_window
        self._local_max_stream_data_uni = stream_window
        self._local_max_streams_bidi = Limit(
            frame_type=QuicFrameType.MAX_STREAMS_BIDI, name="max_streams_bidi", value=max_streams
        )
        self._local_max_streams_uni = Limit(
            frame_type=QuicFrameType.MAX_STREAMS_UNI, name="max_streams_uni", value=max_streams
        )
        self._loss._pacer = CoarsePacer(max_datagram_size=self._max_datagram_size)
        self.lost_packets = 0
        self.lost_bytes = 0
        original = self._loss._on_packets_lost

        def counting(*, packets: Any, **kw: Any) -> None:
            packets = list(packets)
            self.lost_packets += len(packets)
            self.lost_bytes += sum(p.sent_bytes for p in packets)
            original(packets=packets, **kw)

        self._loss._on_packets_lost = counting  # type: ignore[method-assign]  # loss statistics

    # -- peer authentication ----------------------------------------------

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # Ask the client for its certificate; we check it against the pins.
            self.tls._request_client_certificate = True

    def peer_certificate_der(self) -> bytes | None:
        """DER of the certificate the peer proved it holds the key of, if any."""
        cert = getattr(self.tls, "_peer_certificate", None)
        if cert is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding

        return bytes(cert.public_bytes(Encoding.DER))

    # -- consumption-driven flow control ------------------------------------

    def consume(self, stream_id: int, nbytes: int) -> None:
        """Record that the local consumer took ``nbytes`` of ``stream_id``."""
        self._consumed[stream_id] = self._consumed.get(stream_id, 0) + nbytes
        self._consumed_total += nbytes

    def handle_timer(self, now: float) -> None:
        """Like aioquic's, but the probe timeout backs off once, not exponentially.

        During an outage shorter than the dead-link bound, QUIC's own probes are
        what notice the link's return; with unbounded doubling the next probe
        can be many seconds after it, which is the whole recovery delay.
        """
        super().handle_timer(now)
        if self._loss._pto_count > MAX_PTO_BACKOFF:
            self._loss._pto_count = MAX_PTO_BACKOFF

    def set_cap(self, bytes_per_second: float) -> None:
        """Tell pacing (and an allotment-aware congestion control) the operator's cap."""
        pacer = self._loss._pacer
        if isinstance(pacer, CoarsePacer):
            pacer.cap_bytes_per_second = bytes_per_second
        set_allotment = getattr(self._loss._cc, "set_allotment", None)
        if set_allotment is not None:
            set_allotment(bytes_per_second)

    def stream_unsent(self, stream_id: int) -> int:
        """Bytes queued on one of our streams that were never put in a packet."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return max(0, int(sender._buffer_stop - sender.highest_offset))

    def forget_stream(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)

    def stream_buffered(self, stream_id: int) -> int:
        """Unsent + unacknowledged bytes aioquic holds for one of our streams."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        max_data = self._local_max_data
        target = self._consumed_total + self._connection_window
        # Update in steps of a quarter window so we do not send MAX_DATA per packet.
        if target - max_data.value >= self._connection_window // 4:
            max_data.value = target
        for limit in (max_data, self._local_max_streams_bidi, self._local_max_streams_uni):
            if limit is not max_data and limit.sent - limit.used >= limit.value - limit.sent:
                continue
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type,
                    capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                    handler=self._on_connection_limit_delivery,
                    handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if not stream.max_stream_data_local:
            return  # our own unidirectional streams: nothing to grant
        target = self._consumed.get(stream.stream_id, 0) + self._stream_window
        if target - stream.max_stream_data_local >= self._stream_window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local
