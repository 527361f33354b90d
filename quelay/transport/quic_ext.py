"""Our aioquic subclasses: credit by consumption, client certs, loss recovery for satellites.

aioquic raises receive windows when data *arrives*; for a relay that means a
slow local reader never slows the sender. We replace the two window-writing
hooks so that MAX_STREAM_DATA / MAX_DATA advance only by what the local
consumer has taken (``consume``). The server side also requests a client
certificate, so both agents can be pinned.

Loss recovery (:class:`QuelayPacketRecovery`) is aioquic's with four changes
for long, jittery, intermittent links (see docs/performance.md):

* **Reordering is not loss.** A packet declared lost and then acknowledged
  is a *spurious* loss: the packet threshold grows past the reordering seen
  and the time threshold past the delay seen (both bounded, RFC 9002 §6.1 /
  Linux RACK style), and the congestion response to it is undone. On the
  receiving side, an acknowledged ACK frame retires only the ranges it
  reported, so a packet that arrives late is still acknowledged.
* **Short tails.** When no stream has new data to send and the wire has room,
  an unacknowledged stream packet older than the loss delay is sent again
  (its data is re-queued, the original stays tracked), at most once per
  packet: the time threshold applied to the tail, which has no later ACK to
  trigger it.
* **Fast return after an outage.** The probe timeout backs off only up to
  max(1 s, smoothed RTT); the first four probes of a silence carry data, later
  ones are bare PINGs (they only have to find out that the link is back); a
  datagram from the peer during a silence triggers a data probe at once;
  probes into a silent link go in pairs, so one loss does not cost an interval;
  losses found by the first ACK after such a silence are an outage's, not
  congestion's.
* **Quick handshakes.** A remembered RTT (``seed``) sets the probe timeout
  before the first sample, so a 750 ms link does not retransmit Initials
  every 0.2–0.4 s, and a lost one is resent after about one RTT.

These hooks are private aioquic API, which is why the dependency is pinned to
one minor version (``aioquic>=1.7.2,<1.8``) and why only this module and its
short paths (:mod:`.fast_receive`, :mod:`.fast_send`) touch them.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

from aioquic import tls
from aioquic.quic import connection as _aioquic_connection
from aioquic.quic import events
from aioquic.quic import recovery as _aioquic_recovery
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import K_GRANULARITY
from aioquic.quic.connection import (
    ACK_FRAME_CAPACITY,
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    Limit,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.packet import QuicFrameType, QuicStreamFrame, push_ack_frame
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import (
    K_PACKET_THRESHOLD,
    K_TIME_THRESHOLD,
    QuicPacketPacer,
    QuicPacketRecovery,
    QuicPacketSpace,
)
from aioquic.quic.stream import QuicStream, QuicStreamSender

from . import allotted  # noqa: F401  (registers the "allotted" congestion control)
from .fast_receive import OneRttState, receive_one_rtt
from .fast_send import write_bare_probe, write_bulk
from .pacing import WireGate
from .resumption import ProvenIdentity, TicketStore

PACER_BURST_DATAGRAMS = 64
# A datagram that ends this long a silence is acknowledged at once, not after aioquic's
# 1-ms ACK delay: on a quiet link (a keep-alive PING, a small message) the delay costs a
# wake-up of its own for one ACK, and the sender gets its RTT sample later. Within a
# burst the delay stays, so a bulk transfer's ACKs still cover many packets each.
ACK_AT_ONCE_AFTER = 0.1
# -- many streams -----------------------------------------------------------------------
# aioquic visits every stream for every packet it builds (stream limits, then the send
# queue). Above this many streams, packets are built over the streams that have
# something to do (a :class:`StreamActivity` view); a full scan every
# ``FULL_SCAN_EVERY`` builds catches anything a mark missed.
VIEW_MIN_STREAMS = 64
# Streams offered to one packet build at a time. One: a stream's queued bytes go out
# before the next stream's (the DRR feed above already decides who sends how much), so
# a packet carries one stream frame, not attempts at four (1000 streams against one:
# 1.43-1.47 x the CPU per byte with one, 1.53-1.58 with four; bench/scale.py).
VIEW_WINDOW = 1
FULL_SCAN_EVERY = 256

# Consecutive data events of one stream are handed out as one, up to this many bytes.
MERGE_EVENT_BYTES = 64 * 1024

# -- loss recovery knobs --------------------------------------------------------
# ACK ranges a receiver keeps, and twice that, the window of packet numbers it tells
# apart from duplicates. aioquic keeps 64 ranges and a 128-packet window: with
# reordering at high packet rates (±25 ms at 50 Mbit/s: ~230 places) a late packet
# falls below the window and is dropped as a "duplicate" (or its range, the oldest,
# is dropped from the ACK queue at once): never acknowledged, it is declared lost and
# sent again on a link that lost nothing. As many as the packet threshold adapts to.
ACK_RANGES = 256
_aioquic_connection.MAX_ACK_RANGES = _aioquic_recovery.MAX_ACK_RANGES = ACK_RANGES
MAX_PACKET_THRESHOLD = 256  # reordering deeper than this many packets is still loss
MAX_TIME_THRESHOLD = 2.0  # loss delay at most 2 RTTs (RACK: reordering window <= SRTT)...
MAX_REORDER_DELAY = 0.1  # ...or RTT + 100 ms on a short path with long jitter
TIME_THRESHOLD_MARGIN = 1 / 8  # added to the delay a spurious loss showed
PROBE_INTERVAL_FLOOR = 1.0  # probes during silence: every max(1 s, SRTT), no further backoff
TAIL_SMALL_BYTES = 4096  # an open stream with this little unacknowledged is at a tail
TAIL_RECENT = 1 / 8  # at a tail, packets sent in the last RTT/8 are copied at once
SILENT_PROBES = 4  # after this many unanswered probes, probes are bare PINGs
# Datagrams per probe once the handshake is confirmed, when the link has been silent
# (RFC 9002 6.2.4 allows two): on a link that loses 6 % of datagrams, one lost probe
# costs a whole probe interval (1 s or more) after an outage; with a twin carrying the
# same bytes, both are lost 0.4 % of the time. The twin costs one datagram per probe.
PROBE_DATAGRAMS = 2
OUTAGE_PROBES = 2  # losses found after this many unanswered probes are an outage's
DECLARED_MEMORY = 512  # packets declared lost that we remember, to spot spurious losses
MAX_SEED_RTT = 5.0  # a remembered RTT beyond this is not believed

# -- DATAGRAM frames ------------------------------------------------------------------
DATAGRAM_FRAME_LIMIT = 65535  # the largest DATAGRAM frame we accept (transport parameter)
# A 1-RTT packet around a datagram: flags, the peer's connection ID (at most 20 bytes),
# aioquic's 2-byte packet number, and the 16-byte AEAD tag.
DATAGRAM_PACKET_OVERHEAD = 1 + 20 + 2 + 16


def _varint_size(n: int) -> int:
    """Bytes of a QUIC variable-length integer (RFC 9000 §16) holding ``n`` (datagram frames)."""
    return 1 if n < 64 else 2 if n < 16384 else 4 if n < 2**30 else 8


def max_time_threshold(rtt: float) -> float:
    """The widest time threshold (× RTT): 2 RTTs, or RTT + 100 ms if that is more (a
    LAN-short path behind ±25 ms of jitter reorders by many RTTs)."""
    return max(MAX_TIME_THRESHOLD, 1.0 + MAX_REORDER_DELAY / max(rtt, 1e-3))


@dataclass(frozen=True)
class PathStats:
    """What loss recovery knows about the path, for logs, health and path memory.

    Times in seconds. ``rtt`` / ``rtt_var`` / ``min_rtt`` / ``latest_rtt`` are
    ``None`` before the first sample. ``lost_*`` count packets declared lost by
    the thresholds (congestion losses and outage losses), not probes;
    ``spurious_losses`` those of them acknowledged later (reordering);
    ``spurious_probes`` probe retransmissions whose original was acknowledged;
    ``tail_copies`` / ``tail_copy_bytes`` the tail protection's re-sent packets
    and stream bytes; ``probes`` probe timeouts fired; ``undone`` congestion
    responses undone because every loss that caused them was spurious.
    """

    rtt: float | None
    rtt_var: float | None
    min_rtt: float | None
    latest_rtt: float | None
    cwnd: int
    bytes_in_flight: int
    lost_packets: int
    lost_bytes: int
    outage_losses: int
    spurious_losses: int
    spurious_probes: int
    undone: int
    tail_copies: int
    tail_copy_bytes: int
    probes: int
    pto_count: int
    packet_threshold: int
    time_threshold: float
    probe_interval: float


@dataclass
class _Declared:
    """A packet we declared lost, kept for a while to notice a late ACK for it."""

    packet: QuicSentPacket
    at: float
    largest_acked: int
    by_packet: bool
    by_time: bool
    congestion: bool  # reported to congestion control as a loss


@dataclass
class _Episode:
    """A congestion response (window reduced) that can be undone if all its losses were spurious."""

    snapshot: dict[str, Any]
    pending: set[tuple[int, int]]
    genuine: bool = False


class RobustStreamSender(QuicStreamSender):
    """aioquic's stream sender, tolerant of a range being acknowledged or lost twice,
    and holding what it was given instead of copying it.

    aioquic assumes each byte range lives in exactly one tracked packet; tail
    copies and late ACKs of packets already declared lost break that, so
    delivery is clipped to the bytes not yet acknowledged (an ACK also
    withdraws those bytes from the retransmission queue).

    aioquic appends every write to one ``bytearray`` and deletes acknowledged
    bytes from its front, so the live buffer (up to the 2 MiB high-water mark)
    is copied whole each time it grows: ~0.13 s of CPU per 100 MB measured,
    most of ``write``'s cost. Here written ``bytes`` are kept as they are (a
    list of chunks, dropped once all their bytes are acknowledged) and a frame
    slices its bytes out of them.
    """

    _copied: RangeSet | None = None  # bytes tail protection already sent an extra time
    _retransmitted: dict[int, int] | None = None  # the connection's count, by stream id
    _activity: StreamActivity | None = None  # told when this stream has work again
    # The written bytes: chunk i holds the stream's bytes from _starts[i]; the chunks
    # before _head are acknowledged (dropped in batches). Set up on the first write
    # (the class is swapped onto aioquic's senders, so __init__ does not run).
    _chunks: list[bytes] | None = None
    _starts: list[int] | None = None
    _head = 0
    _unsent_total: UnsentBytes | None = None  # the connection's, kept up to date here

    def _mark(self) -> None:
        if self._activity is not None and self._stream_id is not None:
            self._activity.mark_id(self._stream_id)

    def _count_retransmit(self, nbytes: int) -> None:
        if nbytes and self._retransmitted is not None and self._stream_id is not None:
            counts = self._retransmitted
            counts[self._stream_id] = counts.get(self._stream_id, 0) + nbytes

    # -- the buffer -------------------------------------------------------------------

    def write(self, data: bytes, end_stream: bool = False) -> None:
        if self._buffer_fin is not None:
            raise RuntimeError("Cannot send data after FIN")
        if self._reset_error_code is not None:
            raise RuntimeError("Cannot send data after the stream was reset")
        chunks, starts = self._chunks, self._starts
        if chunks is None or starts is None:
            chunks, starts = [], []
            self._chunks, self._starts = chunks, starts
            if self._buffer:  # written before the class was swapped (never, but keep it)
                chunks.append(bytes(self._buffer))
                starts.append(self._buffer_start)
                self._buffer = bytearray()
        size = len(data)
        if size:
            self.buffer_is_empty = False
            stop = self._buffer_stop
            self._pending.add(stop, stop + size)
            chunks.append(data if type(data) is bytes else bytes(data))
            starts.append(stop)
            self._buffer_stop = stop + size
            if self._unsent_total is not None:
                self._unsent_total.bytes += size
        if end_stream:
            self.buffer_is_empty = False
            self._buffer_fin = self._buffer_stop
            self._pending_eof = True

    @property
    def next_offset(self) -> int:
        pending = _ranges(self._pending)
        return pending[0].start if pending else self._buffer_stop

    def _bytes(self, start: int, stop: int) -> bytes:
        """The stream's bytes ``[start, stop)`` (written, not yet all acknowledged)."""
        chunks, starts = self._chunks, self._starts
        assert chunks is not None and starts is not None
        i = bisect_right(starts, start, self._head) - 1
        chunk = chunks[i]
        offset = start - starts[i]
        end = offset + stop - start
        if end <= len(chunk):
            return chunk if offset == 0 and end == len(chunk) else chunk[offset:end]
        parts = [chunk[offset:]]
        got = len(chunk) - offset
        want = stop - start
        while got < want:
            i += 1
            chunk = chunks[i]
            piece = chunk if got + len(chunk) <= want else chunk[:want - got]
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def reset(self, error_code: int) -> None:
        live = self._reset_error_code is None and not self.is_finished
        super().reset(error_code)
        if live and self._reset_error_code is not None:
            # never sent again: neither unsent nor worth keeping
            if self._unsent_total is not None:
                self._unsent_total.bytes -= max(0, self._buffer_stop - self.highest_offset)
            self._chunks, self._starts, self._head = [], [], 0

    def _trim(self) -> None:
        """Drop the chunks whose bytes are all acknowledged, and forget the tail copies
        below the acknowledged offset (on a long-lived control stream they would pile
        up, a range per copy, and ``uncopied`` walks them all)."""
        copied = self._copied
        if copied is not None:
            ranges = _ranges(copied)
            if ranges and ranges[0].start < self._buffer_start:
                copied.subtract(ranges[0].start, self._buffer_start)
        chunks, starts = self._chunks, self._starts
        if chunks is None or starts is None:
            return
        head, n, acked = self._head, len(chunks), self._buffer_start
        while head < n and starts[head] + len(chunks[head]) <= acked:
            chunks[head] = b""
            head += 1
        if head >= 64 or head == n:
            del chunks[:head], starts[:head]
            head = 0
        self._head = head

    def get_frame(self, max_size: int, max_offset: int | None = None) -> QuicStreamFrame | None:
        """aioquic's, with the data sliced out of the written chunks."""
        assert self._reset_error_code is None, "cannot call get_frame() after reset()"
        if max_size < 0:
            return None
        pending = self._pending
        ranges = _ranges(pending)
        if not ranges:
            if self._pending_eof:
                self._pending_eof = False
                return QuicStreamFrame(fin=True, offset=cast(int, self._buffer_fin))
            self.buffer_is_empty = True
            return None
        r = ranges[0]
        start = r.start
        stop = min(r.stop, start + max_size)
        if max_offset is not None and stop > max_offset:
            stop = max_offset
        if stop <= start:
            return None
        frame = QuicStreamFrame(data=self._bytes(start, stop), offset=start)
        if stop == r.stop:
            del ranges[0]  # the common case of RangeSet.subtract, without its loop
        else:
            pending.subtract(start, stop)
        if stop > self.highest_offset:
            if self._unsent_total is not None:
                self._unsent_total.bytes -= stop - self.highest_offset
            self.highest_offset = stop
        if self._buffer_fin == stop:
            frame.fin = True
            self._pending_eof = False
        return frame

    # -- delivery ---------------------------------------------------------------------

    def _unacked(self, start: int, stop: int) -> RangeSet:
        left = RangeSet([range(start, stop)]) if stop > start else RangeSet()
        if len(left) and start < self._buffer_start:
            left.subtract(start, self._buffer_start)
        for r in list(self._acked):
            if not len(left):
                break
            left.subtract(r.start, r.stop)
        return left

    def _unacked_parts(self, start: int, stop: int) -> Iterable[range]:
        """``_unacked`` as ranges; without building range sets in the common case (the
        range lies beyond the acknowledged prefix and outside every acknowledged range)."""
        acked = _ranges(self._acked)
        if start >= self._buffer_start and (
                not acked or stop <= acked[0].start or start >= acked[-1].stop):
            return (range(start, stop),) if stop > start else ()
        return list(self._unacked(start, stop))

    def on_data_delivery(
        self, delivery: QuicDeliveryState, start: int, stop: int, fin: bool
    ) -> None:
        if self._reset_error_code is not None:
            return
        if delivery == QuicDeliveryState.ACKED and start == self._buffer_start \
                and stop > start and not fin and not _ranges(self._acked):
            # In order (nearly every ACK): aioquic's delivery without its range sets.
            _withdraw(self._pending, start, stop)
            self._buffer_start = stop
            if self._chunks or self._copied is not None:
                self._trim()
            if stop == self._buffer_fin and self._acked_fin:  # the FIN's ACK came first
                self.is_finished = True
                self._mark()
            return
        parts = self._unacked_parts(start, stop)
        deliver = QuicStreamSender.on_data_delivery
        if delivery == QuicDeliveryState.ACKED:
            for r in parts:
                _withdraw(self._pending, r.start, r.stop)
                deliver(self, delivery, r.start, r.stop, False)
            if fin and self._buffer_fin is not None:
                self._pending_eof = False
                deliver(self, delivery, self._buffer_fin, self._buffer_fin, True)
                self._mark()  # all acknowledged: the stream may be finished (discarded)
            if self._chunks or self._copied is not None:
                self._trim()
        else:
            n = 0
            for r in parts:
                deliver(self, delivery, r.start, r.stop, False)
                n += r.stop - r.start
            self._count_retransmit(n)
            self._mark()
            if fin and self._buffer_fin is not None and not self._acked_fin:
                deliver(self, delivery, self._buffer_fin, self._buffer_fin, True)

    def uncopied(self, start: int, stop: int) -> RangeSet:
        """The unacknowledged part of ``[start, stop)`` not yet sent an extra time."""
        left = self._unacked(start, stop)
        if self._copied is not None:
            for r in list(self._copied):
                if not len(left):
                    break
                left.subtract(r.start, r.stop)
        return left

    def requeue(self, start: int, stop: int, fin: bool) -> int:
        """Send the unacknowledged part of ``[start, stop)`` once more (each byte at most
        once over the stream's life); returns the bytes re-queued."""
        if self._reset_error_code is not None:
            return 0
        if self._copied is None:
            self._copied = RangeSet()
        n = 0
        for r in self.uncopied(start, stop):
            self._pending.add(r.start, r.stop)
            self._copied.add(r.start, r.stop)
            n += r.stop - r.start
        if n:
            self.buffer_is_empty = False
            self._count_retransmit(n)
            self._mark()
        return n

    @property
    def idle(self) -> bool:
        """Nothing queued to send (new data or retransmissions)."""
        return not len(self._pending) and not self._pending_eof and not self.reset_pending

    @property
    def at_tail(self) -> bool:
        """Idle, and the writer has finished (FIN queued) or only a few bytes are
        unacknowledged (a control message on a long-lived stream): what is in flight
        is the end of something, not a pause in the middle of a bulk stream."""
        return self.idle and (self._buffer_fin is not None
                              or self._buffer_stop - self._buffer_start <= TAIL_SMALL_BYTES)


class UnsentBytes:
    """Bytes written to a connection's streams and never put in a packet (reset streams'
    not counted): kept by the senders as they write and frame, so that asking costs
    nothing with a thousand streams (the feed asks every tick)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


def _unsent(stream: QuicStream) -> int:
    """Bytes queued on the stream that were never put in a packet."""
    sender = stream.sender
    return max(0, int(sender._buffer_stop - sender.highest_offset))


def _ranges(ranges: RangeSet) -> list[range]:
    """A RangeSet's sorted list of ranges (read in hot paths without its Python-level
    ``__len__`` / ``__getitem__``; changed only through the RangeSet)."""
    return ranges._RangeSet__ranges  # type: ignore[attr-defined,no-any-return]


def _withdraw(pending: RangeSet, start: int, stop: int) -> None:
    """Take ``[start, stop)`` out of a retransmission queue (acknowledged after all);
    nearly always it overlaps nothing there, and the check costs no range set."""
    waiting = _ranges(pending)
    if waiting and start < waiting[-1].stop and stop > waiting[0].start:
        pending.subtract(start, stop)


def _regroup(queue: Any) -> None:
    """Join the data events of each stream in aioquic's event queue (see ``next_event``).

    A stream's data events are joined (in order, up to :data:`MERGE_EVENT_BYTES`) into
    the position of the first of them; any other event of that stream (a reset, a
    STOP_SENDING) ends the run, so it still comes after all the data before it.
    Events of other streams and of the connection keep their order.
    """
    out: list[Any] = []  # events, or lists of a stream's data events to join
    runs: dict[int, tuple[list[events.StreamDataReceived], list[int]]] = {}
    for event in queue:
        if type(event) is events.StreamDataReceived:
            sid = event.stream_id
            run = runs.get(sid)
            if run is None:
                run = ([event], [len(event.data)])
                out.append(run[0])
                runs[sid] = run
            else:
                run[0].append(event)
                run[1][0] += len(event.data)
            if event.end_stream or run[1][0] >= MERGE_EVENT_BYTES:
                del runs[sid]
        else:
            other = getattr(event, "stream_id", None)
            if other is not None:
                runs.pop(other, None)
            out.append(event)
    if len(out) == len(queue):
        return  # nothing to join
    queue.clear()
    for item in out:
        if type(item) is not list:
            queue.append(item)
        elif len(item) == 1:
            queue.append(item[0])
        else:
            last = item[-1]
            queue.append(events.StreamDataReceived(
                data=b"".join([e.data for e in item]), end_stream=last.end_stream,
                stream_id=last.stream_id))


def _sid(stream: QuicStream) -> int:
    return cast(int, stream.stream_id)  # None only for aioquic's crypto streams


class StreamActivity:
    """Which streams a packet build must visit, so that per-packet work follows the
    streams with something to do, not every open stream.

    ``busy``: streams that may have data, a reset, a STOP_SENDING, a flow-control
    credit to announce or that may have finished (to be discarded), marked where
    that can start (a write, a loss, a tail copy, a reset, a consumed byte, a
    received frame, a lost MAX_STREAM_DATA) and dropped once a build left them with
    nothing to do. ``unsettled``: our send streams with bytes not all acknowledged
    (what the tail logic asks about).
    """

    def __init__(self, streams: dict[int, QuicStream]) -> None:
        self._streams = streams
        self.busy: dict[int, QuicStream] = {}
        self.unsettled: dict[int, QuicStream] = {}
        # Packets are built over ``busy`` only while viewing (many streams); until then
        # marks are not kept (a switch to viewing rescans every stream first).
        self.viewing = False

    def mark_id(self, stream_id: int) -> None:
        if not self.viewing:
            return
        stream = self._streams.get(stream_id)
        if stream is not None:
            self.busy[stream_id] = stream

    def sent(self, stream: QuicStream) -> None:
        self.busy[_sid(stream)] = stream
        self.unsettled[_sid(stream)] = stream

    def rescan(self, streams: Iterable[QuicStream],
               has_work: Callable[[QuicStream], bool]) -> None:
        """Rebuild ``busy`` from every stream (the fallback, O(streams))."""
        for stream in streams:
            if has_work(stream):
                self.busy[_sid(stream)] = stream

    def not_at_tail(self) -> bool:
        """Whether any of our send streams is mid-flight (see ``at_tail``); forgets
        streams that are settled."""
        settled = []
        found = False
        for sid, stream in self.unsettled.items():
            sender = stream.sender
            if stream.is_finished or (sender.buffer_is_empty and not sender._pending_eof
                                      and sender._buffer_start >= sender._buffer_stop):
                settled.append(sid)
            elif isinstance(sender, RobustStreamSender) and not sender.at_tail:
                found = True
                break
        for sid in settled:
            del self.unsettled[sid]
        return found


def _stream_handlers(packet: QuicSentPacket) -> list[tuple[RobustStreamSender, tuple[Any, ...]]]:
    out = []
    for handler, args in packet.delivery_handlers:
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, RobustStreamSender) and \
                getattr(handler, "__func__", None) is RobustStreamSender.on_data_delivery:
            out.append((owner, args))
    return out


class QuelayPacketRecovery(QuicPacketRecovery):
    """aioquic's loss recovery with adaptive reordering thresholds, tail protection,
    bounded probing during silence and a remembered RTT (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.packet_threshold = K_PACKET_THRESHOLD
        self.time_threshold = K_TIME_THRESHOLD
        self.lost_packets = 0
        self.lost_bytes = 0
        self.outage_losses = 0
        self.spurious_losses = 0
        self.spurious_probes = 0
        self.undone = 0
        self.tail_copies = 0
        self.tail_copy_bytes = 0
        self.probes = 0
        self.return_probes = 0  # immediate probes when the peer was heard after a silence
        self._probe_armed = -1.0  # the last send before the latest probe timeout
        self._return_probe_at: tuple[int, float | None] | None = None
        # A probe's twin still to build: the stream ranges the probe carries again
        # (None: no twin due; empty: a bare one).
        self.twin: list[tuple[RobustStreamSender, tuple[Any, ...]]] | None = None
        self.twins = 0  # probes sent twice
        self._returning = False  # within return_probe()
        self._last_ack_at: float | None = None
        # Set by the connection: "no stream has anything queued" and "the wire has room".
        self.app_idle: Callable[[], bool] = lambda: False
        self.spare_cap: Callable[[], bool] = lambda: True
        self._seed: tuple[float, float] | None = None
        self._declared: OrderedDict[tuple[int, int], _Declared] = OrderedDict()
        self._rules: dict[int, tuple[bool, bool]] = {}
        self._episode: _Episode | None = None
        self._protected: set[int] = set()
        # The pending probe is a PING alone (a long silence): the connection builds
        # it without stream frames (aioquic would fill its datagram with new data).
        self.bare_probe = False
        self._after_silence = False

    def _srtt(self) -> float:
        """The smoothed RTT, or the initial guess before the first sample."""
        return self._rtt_smoothed if self._rtt_initialized else self._rtt_initial

    def _loss_rtt(self) -> float:
        """The RTT loss detection scales by (RFC 9002 6.1.2: the larger of the latest
        and the smoothed), or the initial guess before the first sample."""
        return max(self._rtt_latest, self._rtt_smoothed) if self._rtt_initialized \
            else self._rtt_initial

    @property
    def congestion(self) -> Any:
        """The congestion controller (``allotted``, ``reno`` or ``cubic``)."""
        return self._cc

    # -- remembered path ------------------------------------------------------------

    def seed(self, rtt: float, rtt_var: float) -> None:
        """Start from a remembered RTT: it sets the probe timeout until the first sample."""
        if not (0 < rtt <= MAX_SEED_RTT) or not math.isfinite(rtt_var) or rtt_var < 0:
            return
        self._seed = (rtt, min(rtt_var, rtt))
        self._rtt_initial = rtt

    def get_probe_timeout(self, *, include_max_ack_delay: bool = True) -> float:
        if not self._rtt_initialized and self._seed is not None:
            # At least 1.25 RTT: a dial attempt that hears nothing is replaced by the
            # agent after 1.2 RTT with a fresh Initial, so resending within it is waste.
            rtt, var = self._seed
            return rtt + max(4 * var, K_GRANULARITY, rtt / 4)
        return super().get_probe_timeout(include_max_ack_delay=include_max_ack_delay)

    # -- timers ---------------------------------------------------------------------

    def reschedule_data(self, *, now: float, speed_up_handshake: bool = False,
                        fresh_ack: bool = False) -> None:
        """A probe's data. aioquic resends the oldest unacknowledged packet; after a
        silence that one has most likely arrived (its ACK was what the outage ate),
        so its copy is no news to the receiver. We resend the oldest one sent after
        half an RTT before the last ACK we got: the first one the outage likely ate.
        Unless an ACK just came with the peer's return (``fresh_ack``: its keep-alive
        carries one): then the oldest unacknowledged packet is really missing."""
        self.bare_probe = False
        space = self._app_space()
        if not self.handshake_confirmed or speed_up_handshake or space is None:
            super().reschedule_data(now=now, speed_up_handshake=speed_up_handshake)
            return
        if self._last_ack_at is None or fresh_ack:
            self._resend_oldest(now, space)
            return
        rtt = self._srtt()
        cutoff = self._last_ack_at - rtt / 2
        for packet in space.sent_packets.values():
            assert packet.sent_time is not None
            handlers = _stream_handlers(packet) if packet.is_ack_eliciting \
                and packet.sent_time >= cutoff else []
            if handlers:
                self._on_packets_lost(congestion_event=False, now=now, packets=[packet],
                                      space=space)
                self._probe(handlers)
                return
        self._resend_oldest(now, space)

    def _resend_oldest(self, now: float, space: QuicPacketSpace) -> None:
        """aioquic's probe (the oldest ack-eliciting packet again), with a twin."""
        oldest = next((p for p in space.sent_packets.values() if p.is_ack_eliciting), None)
        super().reschedule_data(now=now)
        self._twin_due(_stream_handlers(oldest) if oldest is not None else [])

    def _probe(self, carries: list[tuple[RobustStreamSender, tuple[Any, ...]]]) -> None:
        """Send a probe (its datagram carries ``carries``' ranges first) and its twin."""
        self._send_probe()
        self._twin_due(carries)

    def _twin_due(self, carries: list[tuple[RobustStreamSender, tuple[Any, ...]]]) -> None:
        # Only where a lost probe costs a probe interval of a silent link: the return
        # probe, and probes once one went unanswered. An ordinary first PTO (a lost
        # tail on a lossy link) is answered by the next ACK anyway; a twin there
        # would only spend the cap (1-2 % of a 100 kbit/s Degraded-BLOS link).
        if self.handshake_confirmed and PROBE_DATAGRAMS > 1 \
                and (self._returning or self._pto_count >= OUTAGE_PROBES):
            self.twin = carries

    def return_probe(self, now: float, *, fresh_ack: bool) -> None:
        """The probe sent when the peer is heard after a silence (with its twin)."""
        self._returning = True
        try:
            self.reschedule_data(now=now, fresh_ack=fresh_ack)
        finally:
            self._returning = False

    def silent(self, now: float) -> bool:
        """Whether our probes go unanswered, or data has been in flight with no ACK for
        longer than a probe interval (an outage shorter than the first probe timeout
        shows only this way)."""
        if self._pto_count > 0:
            return True
        if not self.bytes_in_flight:
            return False  # (what stale() answers first; a receiver's usual case, cheaply)
        last = self._last_ack_at
        return last is not None and now - last > self._quiet() and self.stale(now)

    def _quiet(self) -> float:
        """How long without an ACK is a silence: a probe interval."""
        rtt = self._srtt()
        return max(PROBE_INTERVAL_FLOOR, rtt)

    def stale(self, now: float) -> bool:
        """Whether unacknowledged data is older than a silence (after an idle spell the
        last ACK is old too, but the data in flight is new)."""
        if not self.bytes_in_flight:
            return False
        space = self._app_space()
        if space is None or not space.sent_packets:
            return False
        oldest = next(iter(space.sent_packets.values())).sent_time
        return oldest is not None and now - oldest > self._quiet()

    def return_probe_due(self) -> bool:
        """A datagram arrived during a silence: one immediate probe per silent PTO (and
        one per ACK-silence)."""
        key = (self._pto_count, self._last_ack_at)
        if self._return_probe_at == key:
            return False
        self._return_probe_at = key
        self.return_probes += 1
        return True

    def probe_interval(self) -> float:
        """The first probe after one PTO; while silence lasts, backed off only up to
        max(1 s, SRTT), so the first probe after the path's return is never far off."""
        pto = self.get_probe_timeout(include_max_ack_delay=self.handshake_confirmed)
        if self._pto_count == 0:
            return pto
        rtt = self._srtt()
        if not self.handshake_confirmed:
            # A dial attempt's Initial: the agent replaces an unanswered attempt after
            # 1.2 RTT, so resending within that is waste (the seeded first PTO's rule).
            rtt *= 1.25
        return min(pto * 2 ** min(self._pto_count, 20), max(PROBE_INTERVAL_FLOOR, rtt))

    def get_loss_detection_time(self, *, amplification_limited: bool) -> float | None:
        tail = self._tail_due()
        loss_space = self._get_loss_space()
        if loss_space is not None:
            assert loss_space.loss_time is not None
            return loss_space.loss_time if tail is None else min(loss_space.loss_time, tail)
        if amplification_limited:
            return None
        ack_eliciting_in_flight = sum(
            space.ack_eliciting_in_flight
            for space in self.spaces
            if self.handshake_confirmed or not space.is_application_data
        )
        if self._pto_count and self._probe_armed == self._time_of_last_sent_ack_eliciting_packet:
            # The last probe has not left yet (the wire gate holds the driver's
            # datagrams): another timeout now would only count probes, and with the
            # bounded interval the timer would stay in the past (a busy loop).
            return tail
        if not self.peer_completed_address_validation or ack_eliciting_in_flight:
            at = self._time_of_last_sent_ack_eliciting_packet + self.probe_interval()
            return at if tail is None else min(at, tail)
        return tail

    def on_loss_detection_timeout(self, *, now: float) -> None:
        loss_space = self._get_loss_space()
        if loss_space is not None and loss_space.loss_time is not None \
                and loss_space.loss_time <= now:
            self._detect_loss(now=now, space=loss_space)
            return
        tail = self._tail_due()
        if tail is not None and tail <= now:
            self._protect_tail(now)
            return
        if loss_space is not None:
            return  # woken early (the tail timer moved): nothing is due yet
        self._pto_count += 1
        self.probes += 1
        self._probe_armed = self._time_of_last_sent_ack_eliciting_packet
        if self.handshake_confirmed and self._pto_count > SILENT_PROBES:
            # A long silence: a bare PING finds out when the path is back; data would
            # only be lost again (and cost the cap). The first ACK brings retransmission.
            # The first probes carry data, so that if the path is back the receiver's
            # first new byte is the probe itself (the dead-link bound ends most
            # connections within these: 3 s, or 4 RTTs). Bare means bare: aioquic
            # fills a probe's datagram with new stream bytes (see bare_probe).
            self.bare_probe = True
            self._probe([])
        else:
            self.reschedule_data(now=now)

    # -- tail protection ------------------------------------------------------------

    def _app_space(self) -> QuicPacketSpace | None:
        for space in self.spaces:
            if space.is_application_data:
                return space
        return None

    def _tail_delay(self) -> float:
        """How long a tail packet may go unacknowledged: the loss delay (which grows
        with the reordering seen) or one PTO, whichever is shorter."""
        rtt = self._loss_rtt()
        return min(self.time_threshold * rtt, self.get_probe_timeout())

    def _is_candidate(self, packet: QuicSentPacket) -> bool:
        """Unprotected, ack-eliciting and carrying stream bytes not yet copied."""
        if packet.packet_number in self._protected or not packet.is_ack_eliciting:
            return False
        handlers = _stream_handlers(packet)
        if any(len(sender.uncopied(args[0], args[1])) for sender, args in handlers):
            return True
        if handlers:
            self._protected.add(packet.packet_number)  # nothing left to copy in it
        return False

    def _tail_candidates(self, space: QuicPacketSpace) -> Iterable[QuicSentPacket]:
        for packet in space.sent_packets.values():
            if self._is_candidate(packet):
                yield packet

    def _tail_windows(self) -> tuple[float, float]:
        """(newest send time, recent window): packets sent within the window before the
        newest are the very end of the flight, which no later ACK can reveal as lost."""
        rtt = self._srtt()
        return self._time_of_last_sent_ack_eliciting_packet, rtt * TAIL_RECENT

    def _tail_due(self) -> float | None:
        """When the next tail copy is due (None: not at a tail, or nothing to protect).

        At the tail (every stream finished writing, nothing queued, the gate not
        holding anything, no probe outstanding), the packets sent last are copied at
        once, and any other unacknowledged stream packet once it has gone
        unacknowledged for min(loss delay, PTO).
        """
        if not self.handshake_confirmed or self._pto_count > 0:
            return None
        space = self._app_space()
        if space is None or not space.sent_packets or not self.app_idle() \
                or not self.spare_cap():
            return None
        newest, recent = self._tail_windows()
        due: float | None = None
        # The oldest candidate is due first among the old ones (packets are kept in
        # send order); the recent ones are due at once: look only at the recent end.
        for packet in self._tail_candidates(space):
            assert packet.sent_time is not None
            due = packet.sent_time if packet.sent_time >= newest - recent \
                else packet.sent_time + self._tail_delay()
            break
        if due is None:
            return None
        for packet in reversed(space.sent_packets.values()):
            assert packet.sent_time is not None
            if packet.sent_time < newest - recent:
                break
            if self._is_candidate(packet):
                due = min(due, packet.sent_time)
        return due

    def _protect_tail(self, now: float) -> None:
        space = self._app_space()
        if space is None:
            return
        newest, recent = self._tail_windows()
        delay = self._tail_delay()
        for packet in list(self._tail_candidates(space)):
            assert packet.sent_time is not None
            # The same sums as in _tail_due, so a timer due now always finds its packet.
            if packet.sent_time < newest - recent and packet.sent_time + delay > now:
                continue
            self._protected.add(packet.packet_number)
            copied = 0
            for sender, args in _stream_handlers(packet):
                copied += sender.requeue(*args)
            if copied:
                self.tail_copies += 1
                self.tail_copy_bytes += copied
        if len(self._protected) > 2 * len(space.sent_packets) + 64:
            self._protected &= set(space.sent_packets)

    # -- loss detection ---------------------------------------------------------------

    def _detect_loss(self, *, now: float, space: QuicPacketSpace) -> None:
        rtt = self._loss_rtt()
        loss_delay = self.time_threshold * rtt
        packet_threshold = space.largest_acked_packet - self.packet_threshold

        lost_packets = []
        space.loss_time = None
        for packet_number, packet in space.sent_packets.items():
            if packet_number > space.largest_acked_packet:
                break
            assert packet.sent_time is not None
            by_packet = packet_number <= packet_threshold
            # The same sum as the loss time it set: a timer firing exactly then must
            # find the packet lost (aioquic's ``sent <= now - delay`` can miss by one ulp
            # and spin on a timer that never makes progress).
            packet_loss_time = packet.sent_time + loss_delay
            by_time = packet_loss_time <= now
            if by_packet or by_time:
                lost_packets.append(packet)
                self._rules[packet_number] = (by_packet, by_time)
            else:
                if space.loss_time is None or space.loss_time > packet_loss_time:
                    space.loss_time = packet_loss_time
        if not lost_packets:
            return
        congestion = not self._after_silence
        try:
            self._on_packets_lost(
                congestion_event=congestion,
                now=now,
                packets=lost_packets,
                persistent_congestion=congestion
                and self._in_persistent_congestion(packets=lost_packets),
                space=space,
            )
        finally:
            self._rules.clear()

    def _on_packets_lost(
        self,
        *,
        congestion_event: bool = True,
        now: float,
        packets: Iterable[QuicSentPacket],
        persistent_congestion: bool = False,
        space: QuicPacketSpace,
    ) -> None:
        packets = list(packets)
        key = id(space)
        declared = self._declared
        for packet in packets:
            rule = self._rules.get(packet.packet_number)
            if rule is not None:
                self.lost_packets += 1
                self.lost_bytes += packet.sent_bytes
                if not congestion_event:
                    self.outage_losses += 1
            declared[(key, packet.packet_number)] = _Declared(
                packet=packet, at=now, largest_acked=space.largest_acked_packet,
                by_packet=rule[0] if rule else False, by_time=rule[1] if rule else False,
                congestion=congestion_event and packet.in_flight)
        while len(declared) > DECLARED_MEMORY:
            self._expire(declared.popitem(last=False)[1], key)
        cc = self._cc
        undoable = congestion_event and not hasattr(cc, "on_spurious_loss") and any(
            p.in_flight for p in packets)
        before = _cc_snapshot(cc) if undoable else None
        super()._on_packets_lost(congestion_event=congestion_event, now=now, packets=packets,
                                 persistent_congestion=persistent_congestion, space=space)
        if before is None:
            return
        keys = {(key, p.packet_number) for p in packets if p.in_flight}
        episode = self._episode
        if episode is not None and not episode.genuine:
            episode.pending |= keys
        elif cc.congestion_window < before["congestion_window"]:
            self._episode = _Episode(snapshot=before, pending=keys)

    def _expire(self, record: _Declared, space_key: int) -> None:
        """A declared loss nobody acknowledged in time: it was genuine."""
        episode = self._episode
        if episode is not None and (space_key, record.packet.packet_number) in episode.pending:
            episode.genuine = True

    def on_ack_received(self, *, ack_rangeset: RangeSet, ack_delay: float, now: float,
                        space: QuicPacketSpace) -> None:
        self._last_ack_at = now
        declared = self._declared
        key = id(space)
        if declared:
            rtt = self._loss_rtt()
            keep = max(2 * rtt, 0.05) + self.max_ack_delay
            while declared:
                first_key, first = next(iter(declared.items()))
                if now - first.at <= keep:
                    break
                declared.popitem(last=False)
                self._expire(first, first_key[0])
            bounds = ack_rangeset.bounds()
            late = [k for k in declared
                    if k[0] == key and bounds.start <= k[1] < bounds.stop and k[1] in ack_rangeset]
            largest_before = space.largest_acked_packet
            for k in late:
                self._on_spurious(declared.pop(k), k, largest_before, now)
        self._after_silence = self._pto_count >= OUTAGE_PROBES
        try:
            super().on_ack_received(ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now,
                                    space=space)
        finally:
            self._after_silence = False

    def _on_spurious(self, record: _Declared, key: tuple[int, int], largest_before: int,
                     now: float) -> None:
        packet = record.packet
        # The late ACK still delivers the packet's stream data (a retransmission
        # not yet sent is withdrawn; the robust sender ignores what is already acked).
        for sender, args in _stream_handlers(packet):
            sender.on_data_delivery(QuicDeliveryState.ACKED, *args)
        if not (record.by_packet or record.by_time):
            self.spurious_probes += 1
            return
        self.spurious_losses += 1
        if record.by_packet:
            distance = max(record.largest_acked, largest_before) - packet.packet_number
            wanted = distance + distance // 4 + 1
            self.packet_threshold = min(MAX_PACKET_THRESHOLD, max(self.packet_threshold, wanted))
        if record.by_time:
            rtt = self._loss_rtt()
            assert packet.sent_time is not None
            wanted_t = (now - packet.sent_time) / max(rtt, 1e-3) + TIME_THRESHOLD_MARGIN
            self.time_threshold = min(max_time_threshold(rtt),
                                      max(self.time_threshold, wanted_t))
        if not record.congestion:
            return
        cc = self._cc
        on_spurious = getattr(cc, "on_spurious_loss", None)
        if on_spurious is not None:
            on_spurious(now=now, packet=packet)
        else:
            episode = self._episode
            if episode is None or key not in episode.pending:
                return
            episode.pending.discard(key)
            if episode.pending or episode.genuine:
                return
            self._episode = None
            window = cc.congestion_window
            for name, value in episode.snapshot.items():
                setattr(cc, name, value)
            cc.congestion_window = max(window, cc.congestion_window)
            self.undone += 1
        self._pacer.update_rate(congestion_window=cc.congestion_window,
                                smoothed_rtt=self._rtt_smoothed)


def _cc_snapshot(cc: Any) -> dict[str, Any]:
    """The congestion controller's scalar state (not bytes in flight), to undo a response."""
    return {name: value for name, value in vars(cc).items()
            if name != "bytes_in_flight" and (value is None or isinstance(value, (int, float)))}


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
        # The bucket holds the burst in packets at the packet time actually charged:
        # uncapped on a short path the rate is far above what the 1 µs floor charges,
        # and ``burst / pacing_rate`` would leave room for only a few datagrams per
        # wake-up (measured: 3.4 per transmit on loopback instead of 64).
        self.bucket_max = burst / self._max_datagram_size * self.packet_time
        self.bucket_time = min(self.bucket_time, self.bucket_max)


class QuelayQuicConnection(QuicConnection):
    def __init__(
        self,
        *,
        stream_window: int,
        connection_window: int,
        max_streams: int,
        configuration: QuicConfiguration,
        remembered_rtt: float | None = None,
        remembered_rtt_var: float | None = None,
        tickets: TicketStore | None = None,
        ticket_key: str = "peer",
        **kwargs: Any,
    ) -> None:
        """``remembered_rtt`` / ``remembered_rtt_var``: this path's last smoothed RTT and
        its variation (seconds, e.g. from :class:`~quelay.transport.path_memory.PathMemory`);
        they set the handshake's probe timeout instead of aioquic's 100 ms guess.
        ``tickets``: TLS session tickets to resume with and to remember (see
        :mod:`~quelay.transport.resumption`); a dialler looks its ticket up by ``ticket_key``."""
        if remembered_rtt is not None and 0 < remembered_rtt <= MAX_SEED_RTT:
            configuration = replace(configuration, initial_rtt=remembered_rtt)
        else:
            remembered_rtt = None
        self._tickets = tickets
        self._ticket_key = ticket_key
        # The identity a resumed handshake stands for: the one proven when the ticket
        # was earned (a dialler knows it before it dials, a listener when it redeems).
        self.resumed_identity: ProvenIdentity | None = None
        if tickets is not None:
            if configuration.is_client:
                held = tickets.held(ticket_key)
                if held is not None:
                    configuration = replace(configuration, session_ticket=held.ticket)
                    self.resumed_identity = held.identity
                kwargs["session_ticket_handler"] = self._ticket_received
            else:
                kwargs["session_ticket_fetcher"] = self._redeem_ticket
                kwargs["session_ticket_handler"] = self._ticket_issued
        super().__init__(configuration=configuration, **kwargs)
        self._stream_window = stream_window
        # Bytes of each of our streams sent again (declared lost, or copied by tail
        # protection): per-transfer statistics (quelay get).
        self.retransmitted_by_stream: dict[int, int] = {}
        self._activity = StreamActivity(self._streams)
        self._builds_since_scan = 0
        self.view_builds = 0  # packet builds done over a view (many streams)
        # Streams served before all others in every packet (the control stream: an open,
        # an ack or a cancel must not wait a round of a thousand data streams).
        self.urgent_streams: set[int] = set()
        self._connection_window = connection_window
        self._consumed: dict[int, int] = {}
        self._consumed_total = 0
        self._grouped_tail: events.QuicEvent | None = None  # see next_event
        self._one_rtt: OneRttState | None = None  # see _receive
        self._last_received_at = -math.inf
        self._unsent_bytes = UnsentBytes()
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
        old = self._loss
        self._recovery = QuelayPacketRecovery(
            congestion_control_algorithm=self._configuration.congestion_control_algorithm,
            initial_rtt=self._configuration.initial_rtt,
            max_datagram_size=self._max_datagram_size,
            peer_completed_address_validation=old.peer_completed_address_validation,
            quic_logger=self._quic_logger,
            send_probe=self._send_probe,
            logger=self._logger,
        )
        self._loss = self._recovery
        self._loss._pacer = CoarsePacer(max_datagram_size=self._max_datagram_size)
        self._recovery.app_idle = self._app_idle
        if remembered_rtt is not None:
            self._recovery.seed(remembered_rtt, remembered_rtt_var or 0.0)

    # -- fast return after an outage ---------------------------------------------

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """Like aioquic's; and if this is the first sign of the peer after a silence
        (probes unanswered, or old data unacknowledged for a probe interval), probe
        at once unless its ACK shows the path flowing: the path is back, and our data
        (stuck behind a full congestion window, the next probe up to max(1 s, SRTT)
        away) should not wait for the timer."""
        rec = self._recovery
        if not (self._handshake_confirmed and rec.silent(now)):
            self._receive(data, addr, now)
            return
        last_ack = rec._last_ack_at
        self._receive(data, addr, now)
        fresh_ack = rec._last_ack_at != last_ack
        if fresh_ack and not rec.stale(now):
            return  # the ACK shows the path flowing: nothing old is missing
        self.path_is_back(now, fresh_ack=fresh_ack)

    def _receive(self, data: bytes, addr: Any, now: float) -> None:
        """aioquic's receive_datagram, through the short path for an ordinary 1-RTT
        datagram once the handshake is confirmed (see :mod:`.fast_receive`)."""
        one_rtt = self._one_rtt
        if one_rtt is None and self._handshake_confirmed:
            one_rtt = self._one_rtt = OneRttState(self)
        quiet = now - self._last_received_at >= ACK_AT_ONCE_AFTER
        self._last_received_at = now
        if one_rtt is None or not receive_one_rtt(self, one_rtt, data, addr, now):
            super().receive_datagram(data, addr, now)
        if quiet and one_rtt is not None:
            space = one_rtt.space
            if space.ack_at is not None and space.ack_at > now:
                space.ack_at = now  # see ACK_AT_ONCE_AFTER

    def path_is_back(self, now: float, *, fresh_ack: bool = False) -> None:
        """The peer was heard (here, or on another connection: a dial attempt made
        while this one was held through an outage): if we are in a silence, probe
        now with data — the first new byte the receiver gets, half an RTT from now —
        instead of at the next probe timer. ``fresh_ack``: the datagram that ended
        the silence acknowledged something (so we know what arrived)."""
        rec = self._recovery
        if self._handshake_confirmed and (fresh_ack or rec.silent(now)) \
                and rec.return_probe_due():
            rec.return_probe(now, fresh_ack=fresh_ack)

    def send_keepalive(self, uid: int, now: float) -> None:
        """A keep-alive PING that also carries an ACK of whatever the peer has not
        confirmed hearing: after an outage that ate our ACKs, the first keep-alive
        that gets through tells the sender which of its packets arrived, so it
        resends the first one missing at once (not one we already have)."""
        self.send_ping(uid)
        space = self._spaces[tls.Epoch.ONE_RTT]
        if len(space.ack_queue) and (space.ack_at is None or space.ack_at > now):
            space.ack_at = now

    # -- path statistics ----------------------------------------------------------

    def path_stats(self) -> PathStats:
        """A snapshot of what loss recovery knows about the path (see :class:`PathStats`)."""
        loss = self._recovery
        sampled = loss._rtt_initialized
        return PathStats(
            rtt=loss._rtt_smoothed if sampled else None,
            rtt_var=loss._rtt_variance if sampled else None,
            min_rtt=loss._rtt_min if sampled else None,
            latest_rtt=loss._rtt_latest if sampled else None,
            cwnd=int(loss.congestion_window),
            bytes_in_flight=int(loss.bytes_in_flight),
            lost_packets=loss.lost_packets,
            lost_bytes=loss.lost_bytes,
            outage_losses=loss.outage_losses,
            spurious_losses=loss.spurious_losses,
            spurious_probes=loss.spurious_probes,
            undone=loss.undone,
            tail_copies=loss.tail_copies,
            tail_copy_bytes=loss.tail_copy_bytes,
            probes=loss.probes,
            pto_count=loss._pto_count,
            packet_threshold=loss.packet_threshold,
            time_threshold=loss.time_threshold,
            probe_interval=loss.probe_interval(),
        )

    @property
    def lost_packets(self) -> int:
        return self._recovery.lost_packets

    @property
    def lost_bytes(self) -> int:
        return self._recovery.lost_bytes

    def set_spare_cap(self, spare: Callable[[], bool]) -> None:
        """Tell tail protection whether the wire has room now (the driver's gate knows)."""
        self._recovery.spare_cap = spare

    # -- DATAGRAM frames (RFC 9221) -------------------------------------------------
    # aioquic queues datagrams without a size check, and one that never fits a packet
    # blocks its queue for good; a DATAGRAM frame has no delivery handler, so a lost
    # one is never sent again (nor copied by tail protection, which copies streams).

    def datagram_capacity(self) -> int:
        """The most bytes one DATAGRAM frame can carry on this connection: what the
        peer accepts (its max_datagram_frame_size; 0 if it takes none) and what fits
        an otherwise empty 1-RTT packet (with the longest connection ID a peer may
        switch to)."""
        remote = self._remote_max_datagram_frame_size
        if not remote:
            return 0
        room = min(remote, self._max_datagram_size - DATAGRAM_PACKET_OVERHEAD)
        size = room - 1 - _varint_size(room)  # frame type, then the length, then the data
        while size > 0 and 1 + _varint_size(size) + size > room:
            size -= 1
        return max(0, size)

    def datagram_overhead(self) -> int:
        """Bytes a datagram alone in a packet costs beyond its data (frame and packet
        headers, AEAD tag; not IP/UDP): what a share of the cap is charged per datagram."""
        return DATAGRAM_PACKET_OVERHEAD + 3

    def datagrams_pending(self) -> int:
        """Datagrams handed to aioquic and not yet written into a packet."""
        return len(self._datagrams_pending)

    def withdraw_datagrams(self) -> int:
        """Take back every datagram aioquic has not written into a packet; how many."""
        n = len(self._datagrams_pending)
        self._datagrams_pending.clear()
        return n

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """aioquic's; and once a probe has left, its twin (the probe's stream bytes
        again, or a bare PING), under its own one-datagram allowance."""
        for space in self._loss.spaces:
            if space.ack_at == now:
                # aioquic sends an ACK past the pacer only once its deadline is in the
                # past; one due exactly now would wait for the pacer while get_timer()
                # keeps returning now: a busy loop on a clock that only moves when
                # every task sleeps (MockClock), a short spin on a real one.
                space.ack_at = math.nextafter(now, -math.inf)
        out = super().datagrams_to_send(now)
        rec = self._recovery
        if rec.twin is None or self._probe_pending or not out:
            return out
        twin, rec.twin = rec.twin, None
        for sender, args in twin:
            sender.requeue(*args)
        self._probe_pending = True  # the pacer may hold it a moment: it stays pending
        rec.twins += 1
        return out + super().datagrams_to_send(now)

    def _write_ack_frame(self, builder: Any, space: QuicPacketSpace, now: float) -> None:
        """aioquic's ACK frame, except for what its ACK-of-ACK forgets.

        aioquic forgets every packet number up to the frame's largest once the frame is
        acknowledged, including packets that arrived late (reordered) after the frame
        left and were never reported: they are never acknowledged, and the sender
        declares them lost and sends them again on a link that lost nothing (clean
        with ±25 ms of reordering at 20 Mbit/s: ~900 such packets in 15 s each way).
        Here the ACK-of-ACK forgets only the ranges the frame reported.
        """
        assert space.largest_received_time is not None
        ack_delay = now - space.largest_received_time
        ack_delay_encoded = int(ack_delay * 1000000) >> self._local_ack_delay_exponent
        reported: list[range] = []
        buf = builder.start_frame(QuicFrameType.ACK, capacity=ACK_FRAME_CAPACITY,
                                  handler=self._on_ack_frame_delivery,
                                  handler_args=(space, reported))
        queue = space.ack_queue
        ranges = push_ack_frame(buf, queue, ack_delay_encoded, builder.remaining_buffer_space)
        reported.extend(queue[i] for i in range(len(queue) - ranges, len(queue)))
        space.ack_at = None
        if self._quic_logger is not None:
            builder.quic_logger_frames.append(
                self._quic_logger.encode_ack_frame(ranges=reported, delay=ack_delay))
        if ranges > 1 and builder.packet_number % 8 == 0:
            self._write_ping_frame(builder, comment="ACK-of-ACK trigger")

    @staticmethod
    def _on_ack_frame_delivery(delivery: QuicDeliveryState, space: QuicPacketSpace,
                               reported: list[range]) -> None:
        if delivery == QuicDeliveryState.ACKED:
            for r in reported:
                space.ack_queue.subtract(r.start, r.stop)

    def get_timer_held(self) -> float | None:
        """``get_timer()`` for a driver that holds datagrams for its wire gate.

        While datagrams wait for the gate, ``datagrams_to_send`` is not called, so
        aioquic's pacing and ACK deadlines can lie in the past and would wake the
        driver in a busy loop; they mean nothing until the gate opens (the driver
        wakes then anyway), so only the loss, idle and path timers count.
        """
        saved_pacing = self._pacing_at
        saved_acks = [space.ack_at for space in self._loss.spaces]
        self._pacing_at = None
        for space in self._loss.spaces:
            space.ack_at = None
        try:
            return self.get_timer()
        finally:
            self._pacing_at = saved_pacing
            for space, ack_at in zip(self._loss.spaces, saved_acks, strict=True):
                space.ack_at = ack_at

    def _app_idle(self) -> bool:
        if self._activity.viewing:  # packets built over the busy streams only
            return not self._activity.not_at_tail()
        for stream in self._streams.values():
            sender = stream.sender
            if isinstance(sender, RobustStreamSender) and not sender.at_tail:
                return False
        return True

    # -- many streams: per-packet work over the streams with work ----------------------

    def _stream_has_work(self, stream: QuicStream) -> bool:
        sender = stream.sender
        if stream.is_finished or stream.receiver.stop_pending or sender.reset_pending:
            return True
        if not sender.buffer_is_empty:
            return True
        if stream.max_stream_data_local:
            return (stream.max_stream_data_local_sent != stream.max_stream_data_local
                    or self._credit_due(stream) is not None)
        return False

    def _write_application(self, builder: Any, network_path: Any, now: float) -> None:
        if self._probe_pending and self._recovery.bare_probe:
            write_bare_probe(self, builder, now)
            return
        streams = self._streams
        activity = self._activity
        if len(streams) <= VIEW_MIN_STREAMS:
            if activity.viewing:  # back to aioquic's own order over every stream
                activity.viewing = False
                self._streams_queue = list(streams.values())
            activity.busy.clear()  # marks matter only while viewing
            self._urgent_first()
            self._write_packets(builder, network_path, now)
            return
        if not activity.viewing or self._builds_since_scan >= FULL_SCAN_EVERY:
            activity.viewing = True
            self._builds_since_scan = 0
            activity.busy.clear()
            activity.rescan(streams.values(), self._stream_has_work)
        self._builds_since_scan += 1
        self.view_builds += 1
        busy = activity.busy
        for stream in self._streams_queue:  # created since the last build
            if _sid(stream) in streams:
                busy[_sid(stream)] = stream
        # A window of streams at a time: a full packet is not offered to a thousand
        # streams that cannot fit in it. The next window gets its turn when this one
        # has nothing more to send; visited streams go to the back (round robin).
        left = len(busy)
        while True:  # at least once: ACKs, limits, pings and datagrams need no stream
            window = [busy.pop(sid) for sid in self.urgent_streams if sid in busy]
            for sid in list(itertools.islice(busy, VIEW_WINDOW - len(window))):
                window.append(busy.pop(sid))
            left -= len(window)
            order: list[QuicStream] = []
            try:
                order = self._build_over(window, builder, network_path, now)
            finally:
                for stream in window:  # back into the ring if still busy: served last
                    if _sid(stream) in streams and self._stream_has_work(stream):
                        busy.pop(_sid(stream), None)
                for stream in order or window:  # aioquic's new order: the served ones last
                    if _sid(stream) in streams and self._stream_has_work(stream):
                        busy[_sid(stream)] = stream
            if left <= 0 or self._pacing_at is not None:
                break  # paced: the next build continues with the next window

    def _write_packets(self, builder: Any, network_path: Any, now: float) -> None:
        """aioquic's packet loop, lean when nothing rare is due (see :mod:`.fast_send`)."""
        if not write_bulk(self, builder, network_path, now):
            super()._write_application(builder, network_path, now)

    def _build_over(self, window: list[QuicStream], builder: Any, network_path: Any,
                    now: float) -> list[QuicStream]:
        """aioquic's packet building, with only ``window`` as the connection's streams.
        Returns them in aioquic's new service order (discarded ones removed)."""
        streams, activity = self._streams, self._activity
        view = {_sid(stream): stream for stream in window}
        self._streams, self._streams_queue = view, list(window)
        order: list[QuicStream] = []
        try:
            self._write_packets(builder, network_path, now)
            order = self._streams_queue
        finally:
            self._streams, self._streams_queue = streams, []
            for stream in window:
                sid = _sid(stream)
                if sid not in view:  # discarded by aioquic: finished
                    streams.pop(sid, None)
                    activity.unsettled.pop(sid, None)
                    activity.busy.pop(sid, None)
                    self._consumed.pop(sid, None)
        return [stream for stream in order if _sid(stream) in view]

    def _urgent_first(self) -> None:
        queue = self._streams_queue
        if self.urgent_streams and queue and _sid(queue[0]) not in self.urgent_streams:
            first = [s for s in queue if _sid(s) in self.urgent_streams]
            if first:
                self._streams_queue = first + [s for s in queue
                                               if _sid(s) not in self.urgent_streams]

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._activity.sent(stream)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        super().reset_stream(stream_id, error_code)
        self._activity.mark_id(stream_id)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        super().stop_stream(stream_id, error_code)
        self._activity.mark_id(stream_id)

    def next_event(self) -> events.QuicEvent | None:
        """aioquic's next event; the data events of a stream that arrived together come
        as one.

        aioquic makes an event per packet (~1.3 KB); a driver that lets a batch of
        datagrams in before it takes the events would hand each to the stream's
        consumer. Joined (see :func:`_regroup`) they cost one hand-off.
        """
        queue = self._events
        if len(queue) > 1 and queue[-1] is not self._grouped_tail:  # new events came
            _regroup(queue)
            self._grouped_tail = queue[-1]
        event = super().next_event()
        if type(event) is events.StreamDataReceived or type(event) is events.StreamReset:
            self._activity.mark_id(event.stream_id)  # it may have finished
        return event

    def _on_max_stream_data_delivery(self, delivery: QuicDeliveryState,
                                     stream: QuicStream) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if delivery != QuicDeliveryState.ACKED:
            self._activity.mark_id(_sid(stream))  # to be sent again

    def _get_or_create_stream_for_send(self, stream_id: int) -> QuicStream:
        stream = super()._get_or_create_stream_for_send(stream_id)
        if type(stream.sender) is QuicStreamSender:
            stream.sender.__class__ = RobustStreamSender
            stream.sender._retransmitted = self.retransmitted_by_stream  # type: ignore[attr-defined]
            stream.sender._activity = self._activity  # type: ignore[attr-defined]
            stream.sender._unsent_total = self._unsent_bytes  # type: ignore[attr-defined]
        self._activity.busy[stream_id] = stream
        return stream

    # -- peer authentication ----------------------------------------------

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # Ask the client for its certificate; we check it against the pins.
            self.tls._request_client_certificate = True

    @property
    def close_pending(self) -> bool:
        """close() was called and its CONNECTION_CLOSE is not yet in a packet."""
        return bool(self._close_pending)

    @property
    def closed_by_peer(self) -> events.ConnectionTerminated | None:
        """The peer's CONNECTION_CLOSE, as soon as it arrived (aioquic emits the event
        only at the end of the draining period)."""
        if self._state is QuicConnectionState.DRAINING and self._close_event is not None:
            return self._close_event
        return None

    @property
    def session_resumed(self) -> bool:
        """The handshake resumed a TLS session: no certificates were exchanged."""
        return bool(getattr(self.tls, "session_resumed", False))

    def peer_certificate_chain(self) -> list[Any]:
        """The certificates the peer sent after its own (parsed, unverified); on a
        resumed connection, the chain proven when the ticket was earned."""
        if self.session_resumed and self.resumed_identity is not None:
            from cryptography import x509

            return [x509.load_der_x509_certificate(der) for der in self.resumed_identity.chain]
        return list(getattr(self.tls, "_peer_certificate_chain", None) or [])

    def peer_certificate_der(self) -> bytes | None:
        """DER of the certificate the peer proved it holds the key of, if any; on a
        resumed connection, the one proven when the ticket was earned (the peer proves
        it again in its hello, see :func:`quelay.identity.verify_binding`)."""
        if self.session_resumed:
            identity = self.resumed_identity
            return identity.certificate if identity is not None else None
        cert = getattr(self.tls, "_peer_certificate", None)
        if cert is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding

        return bytes(cert.public_bytes(Encoding.DER))

    def tls_binding(self) -> bytes:
        """A value both ends of this connection share and nobody else can know: a hash
        of the two 1-RTT traffic secrets (read once the handshake completed, before any
        key update). Signing it proves an identity *on this connection*."""
        crypto = self._cryptos[tls.Epoch.ONE_RTT]
        mine, theirs = crypto.send.secret, crypto.recv.secret
        if mine is None or theirs is None:
            raise RuntimeError("tls_binding() before the 1-RTT keys exist")
        client, server = (mine, theirs) if self._is_client else (theirs, mine)
        return hashlib.sha256(b"quelay tls binding v1\0" + client + server).digest()

    def _proven_identity(self) -> ProvenIdentity | None:
        der = self.peer_certificate_der()
        if der is None:
            return None
        if self.session_resumed:
            return self.resumed_identity
        from cryptography.hazmat.primitives.serialization import Encoding

        chain = tuple(bytes(c.public_bytes(Encoding.DER)) for c in self.peer_certificate_chain())
        return ProvenIdentity(der, chain)

    def _ticket_received(self, ticket: tls.SessionTicket) -> None:
        identity = self._proven_identity()
        if self._tickets is not None and identity is not None:
            self._tickets.hold(self._ticket_key, ticket, identity)

    def _ticket_issued(self, ticket: tls.SessionTicket) -> None:
        identity = self._proven_identity()
        if self._tickets is not None and identity is not None:
            self._tickets.issued(ticket, identity)

    def _redeem_ticket(self, label: bytes) -> tls.SessionTicket | None:
        entry = self._tickets.redeem(label) if self._tickets is not None else None
        if entry is None:
            return None
        self.resumed_identity = entry.identity
        # A resumed handshake has no CertificateRequest: the client proves itself in
        # its hello instead (aioquic would otherwise wait for a certificate forever).
        self.tls._request_client_certificate = False
        return entry.ticket

    # -- consumption-driven flow control ------------------------------------

    def consume(self, stream_id: int, nbytes: int) -> None:
        """Record that the local consumer took ``nbytes`` of ``stream_id``."""
        self._consumed[stream_id] = self._consumed.get(stream_id, 0) + nbytes
        self._consumed_total += nbytes
        self._activity.mark_id(stream_id)  # credit to announce; maybe finished

    def follow_cap(self, gate: WireGate) -> None:
        """Pace at ``gate``'s cap, in datagrams cut to fill its one-second window."""
        self.set_cap(gate.payload_bytes_per_second, gate.datagram_size)

    def set_cap(self, bytes_per_second: float, datagram_size: int | None = None) -> None:
        """Tell pacing (and an allotment-aware congestion control) the operator's cap;
        and send datagrams of ``datagram_size`` UDP bytes at most (never more than
        configured): the size whose datagrams fill the cap's window
        (:func:`~quelay.transport.pacing.tiled_datagram`)."""
        if datagram_size is not None:
            size = min(datagram_size, self._configuration.max_datagram_size)
            self._max_datagram_size = size
            # The pacer spends one packet time per packet: it must know their size.
            self._loss._pacer._max_datagram_size = size
        pacer = self._loss._pacer
        if isinstance(pacer, CoarsePacer):
            pacer.cap_bytes_per_second = bytes_per_second
        set_allotment = getattr(self._loss._cc, "set_allotment", None)
        if set_allotment is not None:
            set_allotment(bytes_per_second)

    def unsent_except(self, excluded: set[int]) -> int:
        """Bytes queued on our streams (but ``excluded``; reset ones not counted) never
        put in a packet: the connection's running total, less the excluded streams'."""
        total = self._unsent_bytes.bytes
        for stream_id in excluded:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.sender._reset_error_code is None:
                total -= _unsent(stream)
        return max(0, total)

    def stream_unsent(self, stream_id: int) -> int:
        """Bytes queued on one of our streams that were never put in a packet."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else _unsent(stream)

    def stream_in_flight(self, stream_id: int) -> int:
        """Bytes of one of our streams put in packets and not yet acknowledged."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        acked = sum(r.stop - r.start for r in sender._acked)
        return max(0, int(sender.highest_offset - sender._buffer_start - acked))

    def forget_stream(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)
        self._activity.mark_id(stream_id)  # it may be finished: to be discarded

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
        bidi, uni = self._local_max_streams_bidi, self._local_max_streams_uni
        if max_data.value == max_data.sent and bidi.value == bidi.sent \
                and uni.value == uni.sent:
            return  # nothing to announce (nearly every packet)
        for limit in (max_data, bidi, uni):
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

    def _credit_due(self, stream: QuicStream) -> int | None:
        """The stream's new receive limit if the consumer freed a quarter window or more
        since the last grant (consumption-driven flow control), else None."""
        target = self._consumed.get(_sid(stream), 0) + self._stream_window
        if target - stream.max_stream_data_local >= self._stream_window // 4:
            return target
        return None

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        local = stream.max_stream_data_local
        if not local:
            return  # our own unidirectional streams: nothing to grant
        # _credit_due, inline: this runs for every stream in every packet
        window = self._stream_window
        target = self._consumed.get(stream.stream_id, 0) + window
        if target - local >= window // 4:
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
