"""Best-effort datagrams (QUIC DATAGRAM frames, RFC 9221): the pure logic.

A datagram is a small named message that must not wait behind bulk data and
may be dropped if it is late: a position report, a heartbeat, a command
acknowledgement. It is sent once (QUIC never retransmits a DATAGRAM frame)
and either arrives whole or not at all. This module holds everything about
it that needs no I/O, on explicit times:

* the wire format (:func:`encode_datagram`, :func:`decode_datagram_untrusted`);
* :class:`SendQueue`: messages waiting for the link, each dropped once it is
  older than its ``max_age`` (never delayed past it), and a token bucket
  that limits datagrams to a share of the operator's cap so bulk is not
  starved;
* :class:`Inboxes`: what arrived, per name, bounded (the oldest goes first);
* :class:`Counters`: sent, delivered and dropped (by reason), per name and
  in total.

The Trio side (the pump that hands datagrams to QUIC, the waiting readers)
is :mod:`quelay.agent.datagrams`.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import dataclass, field

from ..errors import RemoteProtocolError

VERSION = 1
#: version (uint8), sent_at (uint64: µs since the Unix epoch, the sender's clock),
#: name length (uint8); then the name (UTF-8) and the payload.
HEADER = struct.Struct(">BQB")
HEADER_BYTES = HEADER.size  # 10
MAX_NAME_BYTES = 64

MAX_AGE_LIMIT = 3600.0  # seconds: the longest max_age a message may ask for
MAX_QUEUED = 1024  # messages waiting to be sent (all names)
MAX_QUEUED_BYTES = 1024 * 1024  # their encoded bytes
INBOX_MESSAGES = 1000  # received messages kept per name until read
INBOX_BYTES = 8 * 1024 * 1024  # received payload bytes kept, all names together
MAX_NAMES = 256  # names with their own inbox and counters
SHARE_BURST_SECONDS = 0.1  # the share bucket holds 100 ms of the share (>= two datagrams)
EPSILON = 1e-6  # bytes of float slack in the share bucket

#: Why a message was not sent (send side) or not read (receive side).
DROP_REASONS = ("too_big", "late", "link_down", "queue_full", "unread")
COUNTERS = ("sent", "sent_bytes", "delivered", "delivered_bytes",
            *(f"dropped_{reason}" for reason in DROP_REASONS))


class MalformedDatagram(RemoteProtocolError):
    """A DATAGRAM frame from the peer is not a quelay datagram: counted and dropped."""


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name datagrams, or None (1..64 UTF-8 bytes, printable)."""
    if not isinstance(name, str):
        return "must be a string"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if not 1 <= size <= MAX_NAME_BYTES:
        return f"must be 1..{MAX_NAME_BYTES} UTF-8 bytes (got {size})"
    if not name.isprintable():
        return "must not contain control or other non-printable characters"
    return None


def encode_datagram(name: str, payload: bytes, sent_at: float) -> bytes:
    """The DATAGRAM frame's content for ``payload`` named ``name``, sent at Unix time
    ``sent_at`` (the name must pass :func:`name_problem`)."""
    raw = name.encode("utf-8")
    micros = min(max(0, round(sent_at * 1_000_000)), 2**64 - 1)
    return HEADER.pack(VERSION, micros, len(raw)) + raw + payload


@dataclass(frozen=True, slots=True)
class Datagram:
    """A decoded datagram: ``sent_at`` is the sender's Unix time when it was accepted."""

    name: str
    payload: bytes
    sent_at: float


def decode_datagram_untrusted(data: bytes) -> Datagram:
    """Parse a DATAGRAM frame from the peer; raises only :class:`MalformedDatagram`."""
    if len(data) < HEADER_BYTES:
        raise MalformedDatagram(f"datagram of {len(data)} bytes is shorter than its header")
    version, micros, size = HEADER.unpack_from(data)
    if version != VERSION:
        raise MalformedDatagram(f"unknown datagram version {version}")
    end = HEADER_BYTES + size
    if len(data) < end:
        raise MalformedDatagram("datagram name runs past its end")
    try:
        name = data[HEADER_BYTES:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedDatagram("datagram name is not UTF-8") from exc
    problem = name_problem(name)
    if problem is not None:
        raise MalformedDatagram(f"datagram name {problem}")
    return Datagram(name, bytes(data[end:]), micros / 1_000_000)


# -- counters ----------------------------------------------------------------------------


class Counters:
    """Per-name and total counts (see :data:`COUNTERS`), plus malformed frames.

    Only the first :data:`MAX_NAMES` names get counters of their own; every
    event counts in the total.
    """

    def __init__(self, max_names: int = MAX_NAMES) -> None:
        self.max_names = max_names
        self.total: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.names: dict[str, dict[str, int]] = {}
        self.malformed = 0  # frames from the peer that were not quelay datagrams

    def add(self, name: str, counter: str, n: int = 1) -> None:
        self.total[counter] += n
        per = self.names.get(name)
        if per is None:
            if len(self.names) >= self.max_names:
                return
            per = self.names[name] = dict.fromkeys(COUNTERS, 0)
        per[counter] += n

    def dropped(self, name: str, reason: str) -> None:
        self.add(name, f"dropped_{reason}")


# -- sending -----------------------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """A message waiting to be sent: its frame, its payload's size and the (monotonic)
    time it expires."""

    name: str
    frame: bytes
    size: int
    deadline: float


@dataclass(frozen=True)
class Refusal:
    """Why a message was not accepted (``reason`` is one of :data:`DROP_REASONS`)."""

    reason: str
    message: str


class SendQueue:
    """Messages waiting for the link, FIFO, dropped rather than delayed past their age.

    :meth:`take` hands out the next message if the share bucket allows it: a
    token bucket in wire bytes at ``share`` × the cap, holding
    :data:`SHARE_BURST_SECONDS` of it but at least two full datagrams (packets
    are built in bursts: a datagram that became ready between two waits for the
    next, and the bucket must keep what it earned meanwhile). A cap of 0
    (uncapped) leaves datagrams unlimited. Each message is charged its frame
    plus ``overhead`` bytes (QUIC packet and IP/UDP headers), as if it went in a
    packet of its own: the bucket never under-counts.
    """

    def __init__(self, counters: Counters, *, share: float,
                 max_messages: int = MAX_QUEUED, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        if not 0 < share <= 1:
            raise ValueError("datagram share must be in (0, 1]")
        self.counters = counters
        self.share = share
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overhead = 0
        self._queue: deque[Outgoing] = deque()
        self._bytes = 0
        self._next_expiry = math.inf  # no queued message expires before this
        self._rate = 0.0  # bytes/s for datagrams; 0 = unlimited
        self._burst = 0.0
        self._tokens = 0.0
        self._last = 0.0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def next_expiry(self) -> float:
        """No queued message expires before this (inf: none queued)."""
        return self._next_expiry if self._queue else math.inf

    def set_cap(self, cap_bytes_per_second: float, now: float, *, overhead: int,
                largest: int) -> None:
        """The operator's cap in wire bytes/s (0 = uncapped), the per-datagram
        ``overhead`` and the ``largest`` frame the path carries. Cheap when unchanged."""
        rate = self.share * cap_bytes_per_second
        burst = max(2 * (largest + overhead), rate * SHARE_BURST_SECONDS) if rate else 0.0
        self.overhead = overhead
        if rate == self._rate and burst == self._burst:
            return
        self._refill(now)
        if not self._rate:
            self._tokens = burst  # capped from now on: start with one burst
        self._rate, self._burst = rate, burst
        self._tokens = min(self._tokens, burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now

    def offer(self, msg: Outgoing, now: float, capacity: int | None) -> Refusal | None:
        """Queue ``msg`` unless it cannot go: ``capacity`` is the largest frame the
        path carries now (None: no session). Refusals are counted."""
        refusal = self._refusal(msg, capacity)
        if refusal is not None:
            self.counters.dropped(msg.name, refusal.reason)
            return refusal
        self._queue.append(msg)
        self._bytes += len(msg.frame)
        self._next_expiry = min(self._next_expiry, msg.deadline)
        return None

    def _refusal(self, msg: Outgoing, capacity: int | None) -> Refusal | None:
        if capacity is None:
            return Refusal("link_down", "the link is down: datagrams are not kept for later")
        if len(msg.frame) > capacity:
            name_bytes = len(msg.frame) - HEADER_BYTES - msg.size
            if capacity <= HEADER_BYTES + name_bytes:
                why = "the peer accepts no datagrams" if capacity == 0 else \
                    f"the path carries at most {max(0, capacity - HEADER_BYTES)} bytes of " \
                    "name and payload"
            else:
                why = (f"the path carries at most {capacity - HEADER_BYTES - name_bytes} "
                       "payload bytes with this name")
            return Refusal("too_big", f"a {msg.size}-byte message is too big: {why}")
        if len(self._queue) >= self.max_messages or \
                self._bytes + len(msg.frame) > self.max_bytes:
            return Refusal("queue_full", f"{len(self._queue)} datagrams ({self._bytes} bytes) "
                                         "already wait for the link")
        return None

    def expire(self, now: float) -> int:
        """Drop queued messages whose deadline has passed (counted ``late``)."""
        if now < self._next_expiry:
            return 0
        keep: deque[Outgoing] = deque()
        dropped = 0
        for msg in self._queue:
            if msg.deadline <= now:
                self.late(msg)
                dropped += 1
            else:
                keep.append(msg)
        self._queue = keep
        self._bytes = sum(len(msg.frame) for msg in keep)
        self._next_expiry = min((msg.deadline for msg in keep), default=math.inf)
        return dropped

    def take(self, now: float) -> Outgoing | None:
        """The next message to send now, charged to the share bucket; None if the queue
        is empty or the head must wait for the share (see :meth:`ready_at`)."""
        self.expire(now)
        if not self._queue:
            return None
        head = self._queue[0]
        if self._rate:
            self._refill(now)
            cost = len(head.frame) + self.overhead
            if self._tokens + EPSILON < cost:
                return None
            self._tokens -= cost
        self._queue.popleft()
        self._bytes -= len(head.frame)
        return head

    def ready_at(self, now: float) -> float:
        """When :meth:`take` may next return something or drop something (inf: empty)."""
        if not self._queue:
            return math.inf
        first_deadline = self._next_expiry
        if not self._rate:
            return min(now, first_deadline)
        self._refill(now)
        cost = len(self._queue[0].frame) + self.overhead
        missing = cost - self._tokens - EPSILON
        # (+1 µs: the refill then surely covers it, float rounding included)
        refill = now if missing <= 0 else now + missing / self._rate + 1e-6
        return min(refill, first_deadline)

    def drop_all(self, reason: str) -> int:
        """Drop every queued message, counted as ``reason`` (e.g. the link went down)."""
        for msg in self._queue:
            self.counters.dropped(msg.name, reason)
        n = len(self._queue)
        self._queue.clear()
        self._bytes = 0
        self._next_expiry = math.inf
        return n

    def sent(self, msg: Outgoing) -> None:
        self.counters.add(msg.name, "sent")
        self.counters.add(msg.name, "sent_bytes", msg.size)

    def late(self, msg: Outgoing) -> None:
        self.counters.dropped(msg.name, "late")

    def withdrawn(self, msg: Outgoing) -> None:
        """``msg`` was taken but never sent (late before a packet had room for it): it
        counts as late, and its share goes back to the bucket."""
        self.late(msg)
        if self._rate:
            self._tokens = min(self._burst, self._tokens + len(msg.frame) + self.overhead)


# -- receiving ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """A datagram that arrived: ``received_at`` is this agent's Unix time then."""

    name: str
    payload: bytes
    sent_at: float
    received_at: float


@dataclass
class Inboxes:
    """Received datagrams per name until a reader takes them; bounded, oldest out first.

    At most ``max_messages`` per name and ``max_bytes`` of payload in all, in
    at most ``max_names`` inboxes; what does not fit is dropped (counted
    ``dropped_unread``): the oldest of the arriving message's name, or the
    arriving message itself when its name cannot get an inbox.
    """

    counters: Counters
    max_messages: int = INBOX_MESSAGES
    max_bytes: int = INBOX_BYTES
    max_names: int = MAX_NAMES
    _boxes: dict[str, deque[Received]] = field(default_factory=dict)
    _bytes: int = 0

    def put(self, msg: Received) -> bool:
        """Keep ``msg`` for a reader; False if it was dropped at once."""
        self.counters.add(msg.name, "delivered")
        self.counters.add(msg.name, "delivered_bytes", len(msg.payload))
        box = self._boxes.get(msg.name)
        if box is None:
            if len(self._boxes) >= self.max_names or len(msg.payload) > self.max_bytes:
                self.counters.dropped(msg.name, "unread")
                return False
            box = self._boxes[msg.name] = deque()
        box.append(msg)
        self._bytes += len(msg.payload)
        while len(box) > self.max_messages or self._bytes > self.max_bytes:
            if not box:
                break
            old = box.popleft()
            self._bytes -= len(old.payload)
            self.counters.dropped(old.name, "unread")
        if not box:
            del self._boxes[msg.name]
            return False
        return box[-1] is msg

    def available(self, name: str) -> int:
        box = self._boxes.get(name)
        return len(box) if box is not None else 0

    def take(self, name: str, count: int, max_bytes: int | None = None) -> list[Received]:
        """Up to ``count`` of ``name``'s messages, oldest first (removed from the inbox),
        and no more payload than ``max_bytes`` (but always the first one)."""
        box = self._boxes.get(name)
        out: list[Received] = []
        budget = math.inf if max_bytes is None else max_bytes
        while box and len(out) < count:
            if out and len(box[0].payload) > budget:
                break
            budget -= len(box[0].payload)
            msg = box.popleft()
            self._bytes -= len(msg.payload)
            out.append(msg)
        if box is not None and not box:
            del self._boxes[name]
        return out

    @property
    def queued(self) -> int:
        return sum(len(box) for box in self._boxes.values())

    @property
    def queued_bytes(self) -> int:
        return self._bytes
