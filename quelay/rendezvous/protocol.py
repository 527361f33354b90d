"""The rendezvous wire format and the relay's pairing table, sans-IO.

Every rendezvous datagram starts with :data:`MAGIC`, a byte whose QUIC fixed
bit (0x40) is clear: QUIC v1 packets always have it set (RFC 9000 §17), so an
agent tells rendezvous datagrams from QUIC on the same socket by the first
byte alone (:func:`is_rendezvous`).

Datagram layout (big-endian), every type::

    magic(1)=0x1D  type(1)  version(1)=1  flags(1)
    session(1+n)   fingerprint(1+n)   wall-clock ms(8)   nonce(16)
    body(2+n)      mac(32) = HMAC-SHA256(secret, LABEL || every byte before the mac)

``LABEL`` differs per direction (agent → relay, relay → agent, agent → agent),
so a datagram valid in one role is worthless in another. The relay accepts a
registration only if its MAC verifies, its timestamp is within
``window`` seconds of the relay's clock, and its nonce was not seen within
that window (:class:`ReplayCache`). Nothing here does I/O: the table takes
``(data, address, now, wall)`` and returns the datagrams to send.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from ..errors import ProtocolError

Address = tuple[str, int]

MAGIC = 0x1D
VERSION = 1
MAC_SIZE = 32
NONCE_SIZE = 16
MAX_SESSION = 64
MAX_FINGERPRINT = 100
MAX_BODY = 512
LABEL_REGISTER = b"quelay-rendezvous/1 agent->relay\x00"
LABEL_RELAY = b"quelay-rendezvous/1 relay->agent\x00"
LABEL_PUNCH = b"quelay-rendezvous/1 agent->agent\x00"

UNREGISTERED_MIN = 64  # smaller datagrams from unknown sources get no answer (amplification)
FLAG_PUNCH = 0x01  # register: "tell both of us to punch now"; peer: "punch now"
FLAG_HEARD = 0x02  # punch: "I have heard a valid punch from you"

_HEAD = struct.Struct("!BBBB")
_TAIL = struct.Struct("!Q16s")


class Kind(IntEnum):
    REGISTER = 1  # agent -> relay
    REGISTERED = 2  # relay -> agent: your observed address (+ the peer, when paired)
    PEER = 3  # relay -> agent, unsolicited: the peer (re)registered
    REFUSED = 4  # relay -> agent: code and reason
    PUNCH = 5  # agent -> agent, direct


class Refusal(IntEnum):
    MALFORMED = 1
    BAD_TOKEN = 2  # MAC does not verify (wrong secret or forged)
    STALE = 3  # timestamp outside the window
    REPLAYED = 4  # nonce already seen inside the window
    SESSION_FULL = 5  # a third agent
    TABLE_FULL = 6  # max_sessions reached
    RATE_LIMITED = 7
    UNREGISTERED = 8  # a non-rendezvous datagram from an address the relay does not know

    @property
    def text(self) -> str:
        return self.name.lower()


def is_rendezvous(data: bytes) -> bool:
    """A rendezvous datagram (not QUIC): first byte is MAGIC (fixed bit 0x40 clear)."""
    return bool(data) and data[0] == MAGIC


@dataclass(frozen=True)
class Datagram:
    kind: Kind
    flags: int
    session: str
    fingerprint: str
    wall_ms: int
    nonce: bytes
    body: bytes


def _label(kind: Kind) -> bytes:
    if kind is Kind.REGISTER:
        return LABEL_REGISTER
    if kind is Kind.PUNCH:
        return LABEL_PUNCH
    return LABEL_RELAY


def _short(text: str, limit: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > limit:
        raise ValueError(f"{what} longer than {limit} bytes")
    return bytes([len(raw)]) + raw


def encode(secret: bytes, kind: Kind, *, session: str, fingerprint: str, wall: float,
           flags: int = 0, body: bytes = b"", nonce: bytes | None = None) -> bytes:
    """One authenticated rendezvous datagram."""
    if len(body) > MAX_BODY:
        raise ValueError("rendezvous body too long")
    nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
    msg = b"".join((
        _HEAD.pack(MAGIC, int(kind), VERSION, flags),
        _short(session, MAX_SESSION, "session name"),
        _short(fingerprint, MAX_FINGERPRINT, "fingerprint"),
        _TAIL.pack(max(0, int(wall * 1000)), nonce),
        struct.pack("!H", len(body)), body,
    ))
    return msg + hmac.new(secret, _label(kind) + msg, hashlib.sha256).digest()


def decode_untrusted(data: bytes) -> tuple[Datagram, bytes, bytes]:
    """Parse a rendezvous datagram without checking its MAC.

    Returns the datagram, the signed bytes and the MAC; raises ProtocolError.
    """
    try:
        magic, kind, version, flags = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise ProtocolError("not a quelay rendezvous datagram")
        pos = _HEAD.size
        fields = []
        for _ in range(2):
            n = data[pos]
            fields.append(data[pos + 1 : pos + 1 + n].decode())
            pos += 1 + n
        wall_ms, nonce = _TAIL.unpack_from(data, pos)
        pos += _TAIL.size
        (blen,) = struct.unpack_from("!H", data, pos)
        pos += 2
        body = data[pos : pos + blen]
        pos += blen
        mac = data[pos:]
        if len(body) != blen or len(mac) != MAC_SIZE:
            raise ProtocolError("truncated rendezvous datagram")
        return Datagram(Kind(kind), flags, fields[0], fields[1], wall_ms, nonce,
                        bytes(body)), data[:pos], mac
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed rendezvous datagram: {exc}") from None


def verify_untrusted(secret: bytes, data: bytes) -> Datagram:
    """Parse and authenticate; raises ProtocolError if malformed or the MAC is wrong."""
    dgram, signed, mac = decode_untrusted(data)
    want = hmac.new(secret, _label(dgram.kind) + signed, hashlib.sha256).digest()
    if not hmac.compare_digest(want, mac):
        raise ProtocolError("rendezvous datagram with a bad MAC")
    return dgram


# -- bodies ------------------------------------------------------------------------------

def pack_address(addr: Address | None) -> bytes:
    if addr is None:
        return b"\x00"
    ip = ipaddress.ip_address(addr[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bytes([ip.version]) + ip.packed + struct.pack("!H", addr[1])


def unpack_address_untrusted(data: bytes, pos: int) -> tuple[Address | None, int]:
    if not 0 <= pos < len(data):
        raise ProtocolError("truncated address in rendezvous datagram")
    version = data[pos]
    if version == 0:
        return None, pos + 1
    size = {4: 4, 6: 16}.get(version)
    if size is None or len(data) < pos + 1 + size + 2:
        raise ProtocolError("bad address in rendezvous datagram")
    ip = ipaddress.ip_address(data[pos + 1 : pos + 1 + size])
    (port,) = struct.unpack_from("!H", data, pos + 1 + size)
    return (str(ip), port), pos + 3 + size


@dataclass(frozen=True)
class PeerInfo:
    """What the relay tells an agent: its own observed address and its peer's."""

    observed: Address | None
    peer_fingerprint: str
    peer_address: Address | None


def pack_peer_info(info: PeerInfo) -> bytes:
    return (pack_address(info.observed) + _short(info.peer_fingerprint, MAX_FINGERPRINT, "fp")
            + pack_address(info.peer_address))


def unpack_peer_info_untrusted(body: bytes) -> PeerInfo:
    try:
        observed, pos = unpack_address_untrusted(body, 0)
        n = body[pos]
        fp = body[pos + 1 : pos + 1 + n].decode()
        peer, _ = unpack_address_untrusted(body, pos + 1 + n)
    except (IndexError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad peer info: {exc}") from None
    return PeerInfo(observed, fp, peer)


def pack_refusal(code: Refusal, reason: str) -> bytes:
    return bytes([int(code)]) + reason.encode()[:200]


def unpack_refusal_untrusted(body: bytes) -> tuple[Refusal, str]:
    try:
        return Refusal(body[0]), body[1:].decode(errors="replace")
    except (IndexError, ValueError):
        raise ProtocolError("bad refusal body") from None


def normalise(addr: Address) -> Address:
    host = addr[0].lower()
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


# -- the relay's state -------------------------------------------------------------------

class ReplayCache:
    """Nonces seen inside the freshness window; bounded (full means refuse, never forget)."""

    def __init__(self, window: float, limit: int = 100_000) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[bytes, float] = {}
        self._order: deque[tuple[float, bytes]] = deque()

    def _expire(self, wall: float) -> None:
        while self._order and self._order[0][0] < wall:
            _, nonce = self._order.popleft()
            self._seen.pop(nonce, None)

    def check_and_add(self, nonce: bytes, wall: float) -> bool | None:
        """True if fresh (now remembered), False if replayed, None if the cache is full."""
        self._expire(wall)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.limit:
            return None
        # A token is valid until ts + window; remembering it for 2 windows covers that.
        until = wall + 2 * self.window
        self._seen[nonce] = until
        self._order.append((until, nonce))
        return True

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class Member:
    fingerprint: str
    address: Address
    last_seen: float


@dataclass
class Session:
    name: str
    members: dict[str, Member] = field(default_factory=dict)
    last_active: float = 0.0

    def other(self, fingerprint: str) -> Member | None:
        for fp, m in self.members.items():
            if fp != fingerprint:
                return m
        return None


@dataclass
class Counters:
    registrations: int = 0
    moves: int = 0  # a member re-registered from a new address (valid token)
    refusals: dict[str, int] = field(default_factory=lambda: {r.text: 0 for r in Refusal})
    relayed_datagrams: int = 0
    relayed_bytes: int = 0
    dropped_datagrams: int = 0  # from unknown addresses or with no peer yet
    sessions_created: int = 0
    sessions_expired: int = 0


@dataclass
class RelayLimits:
    max_sessions: int = 1024
    session_timeout: float = 60.0  # idle seconds before a member (and its session) is dropped
    window: float = 30.0  # token freshness (seconds of clock skew allowed)
    rate: float = 5.0  # registrations per second per source IP
    burst: float = 20.0
    max_sources: int = 10_000  # rate-limiter entries kept
    unsolicited_per_second: float = 100.0  # "unregistered" answers, all sources together


class RelayTable:
    """The relay's pairing table: registrations in, datagrams out (sans-IO).

    ``now`` is a monotonic clock (idle expiry, rate limits); ``wall`` is Unix
    time (token freshness, since agents and relay share no monotonic clock).
    """

    def __init__(self, secret: bytes, limits: RelayLimits | None = None) -> None:
        if not secret:
            raise ValueError("the rendezvous secret must not be empty")
        self.secret = secret
        self.limits = limits or RelayLimits()
        self.sessions: dict[str, Session] = {}
        self.by_address: dict[Address, tuple[Session, Member]] = {}
        self.replay = ReplayCache(self.limits.window)
        self.counters = Counters()
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._unregistered_told: OrderedDict[Address, float] = OrderedDict()
        self._unsolicited: tuple[float, float] = (self.limits.unsolicited_per_second, 0.0)

    # -- relaying ---------------------------------------------------------------------

    def relay(self, data: bytes, src: Address, now: float,
              wall: float) -> tuple[bytes, Address] | None:
        """Where a non-rendezvous (QUIC) datagram goes, or a refusal back, or nothing."""
        src = normalise(src)
        entry = self.by_address.get(src)
        if entry is None:
            self.counters.dropped_datagrams += 1
            # Tell an agent the relay forgot it (a restart), at most once a second per address.
            # Never an amplifier: no answer to a datagram smaller than the answer would
            # be, at most one a second per address, and a global budget.
            told = self._unregistered_told.get(src)
            if (told is not None and now - told < 1.0) or len(data) < UNREGISTERED_MIN \
                    or not self._unsolicited_ok(now):
                return None
            self._unregistered_told[src] = now
            self._unregistered_told.move_to_end(src)
            while len(self._unregistered_told) > 1024:
                self._unregistered_told.popitem(last=False)
            return self._refusal(Refusal.UNREGISTERED, "this address is not registered",
                                 "", wall, bytes(NONCE_SIZE)), src
        session, member = entry
        member.last_seen = now
        session.last_active = now
        other = session.other(member.fingerprint)
        if other is None:
            self.counters.dropped_datagrams += 1
            return None
        self.counters.relayed_datagrams += 1
        self.counters.relayed_bytes += len(data)
        return data, other.address

    # -- registration -----------------------------------------------------------------

    def _refusal(self, code: Refusal, reason: str, session: str, wall: float,
                 nonce: bytes) -> bytes:
        self.counters.refusals[code.text] += 1
        return encode(self.secret, Kind.REFUSED, session=session, fingerprint="", wall=wall,
                      body=pack_refusal(code, reason), nonce=nonce)

    def _unsolicited_ok(self, now: float) -> bool:
        rate = self.limits.unsolicited_per_second
        tokens, last = self._unsolicited
        tokens = min(rate, tokens + (now - last) * rate)
        ok = tokens >= 1.0
        self._unsolicited = (tokens - 1.0 if ok else tokens, now)
        return ok

    def _rate_ok(self, host: str, now: float) -> bool | None:
        """True if allowed; False if limited (say so); None if limited and already told."""
        lim = self.limits
        tokens, last, told = self._buckets.pop(host, (lim.burst, now, -1e9))
        tokens = min(lim.burst, tokens + (now - last) * lim.rate)
        ok = tokens >= 1.0
        result: bool | None = True
        if not ok:
            # Tell a limited source at most once a second: refusals are not an amplifier.
            result = False if now - told >= 1.0 else None
            if result is False:
                told = now
        self._buckets[host] = (tokens - 1.0 if ok else tokens, now, told)
        while len(self._buckets) > lim.max_sources:
            self._buckets.popitem(last=False)
        return result

    def handle_untrusted(self, data: bytes, src: Address, now: float,
                         wall: float) -> list[tuple[bytes, Address]]:
        """One rendezvous datagram from ``src``: the replies (to it and maybe its peer)."""
        src = normalise(src)
        allowed = self._rate_ok(src[0], now)
        if allowed is None:
            self.counters.refusals[Refusal.RATE_LIMITED.text] += 1
            return []
        if not allowed:
            return [(self._refusal(Refusal.RATE_LIMITED, "too many registrations from "
                                   "this address", "", wall, bytes(NONCE_SIZE)), src)]
        try:
            dgram, signed, mac = decode_untrusted(data)
        except ProtocolError as exc:
            return [(self._refusal(Refusal.MALFORMED, str(exc), "", wall, bytes(NONCE_SIZE)),
                     src)]
        session_name, nonce = dgram.session, dgram.nonce
        if dgram.kind is not Kind.REGISTER:
            return [(self._refusal(Refusal.MALFORMED, "only registrations go to the relay",
                                   session_name, wall, nonce), src)]
        want = hmac.new(self.secret, LABEL_REGISTER + signed, hashlib.sha256).digest()
        if not hmac.compare_digest(want, mac):
            return [(self._refusal(Refusal.BAD_TOKEN, "token does not verify (wrong secret "
                                   "or forged)", session_name, wall, nonce), src)]
        if abs(dgram.wall_ms / 1000 - wall) > self.limits.window:
            return [(self._refusal(Refusal.STALE, f"token timestamp more than "
                                   f"{self.limits.window:g} s from the relay's clock",
                                   session_name, wall, nonce), src)]
        fresh = self.replay.check_and_add(nonce, wall)
        if fresh is None:
            return [(self._refusal(Refusal.RATE_LIMITED, "replay cache full", session_name,
                                   wall, nonce), src)]
        if not fresh:
            return [(self._refusal(Refusal.REPLAYED, "token already used", session_name,
                                   wall, nonce), src)]
        if not session_name or not dgram.fingerprint:
            return [(self._refusal(Refusal.MALFORMED, "empty session or fingerprint",
                                   session_name, wall, nonce), src)]
        return self._register(dgram, src, now, wall)

    def _register(self, dgram: Datagram, src: Address, now: float,
                  wall: float) -> list[tuple[bytes, Address]]:
        self.expire(now)
        name, fp = dgram.session, dgram.fingerprint
        session = self.sessions.get(name)
        if session is None:
            if len(self.sessions) >= self.limits.max_sessions:
                return [(self._refusal(Refusal.TABLE_FULL, "the relay's session table is full",
                                       name, wall, dgram.nonce), src)]
            session = self.sessions[name] = Session(name, last_active=now)
            self.counters.sessions_created += 1
        member = session.members.get(fp)
        if member is None and len(session.members) >= 2:
            return [(self._refusal(Refusal.SESSION_FULL, "session already has two agents",
                                   name, wall, dgram.nonce), src)]
        previous = self.by_address.get(src)
        if previous is not None and previous[1] is not member:
            self._remove(*previous)  # this address now belongs to this registration
        changed = member is None or member.address != src
        if member is None:
            member = session.members[fp] = Member(fp, src, now)
        elif member.address != src:
            self.by_address.pop(member.address, None)
            member.address = src
            self.counters.moves += 1
        member.last_seen = now
        session.last_active = now
        self.by_address[src] = (session, member)
        self._unregistered_told.pop(src, None)
        self.counters.registrations += 1
        other = session.other(fp)
        punch = bool(dgram.flags & FLAG_PUNCH)
        out = [(self._tell(session, member, other, Kind.REGISTERED, wall, dgram.nonce,
                           punch or (changed and other is not None)), src)]
        if other is not None and (changed or punch):
            out.append((self._tell(session, other, member, Kind.PEER, wall, None,
                                   punch or changed), other.address))
        return out

    def _tell(self, session: Session, to: Member, peer: Member | None, kind: Kind,
              wall: float, nonce: bytes | None, punch: bool) -> bytes:
        info = PeerInfo(to.address, peer.fingerprint if peer else "",
                        peer.address if peer else None)
        return encode(self.secret, kind, session=session.name, fingerprint=to.fingerprint,
                      wall=wall, flags=FLAG_PUNCH if punch and peer else 0,
                      body=pack_peer_info(info), nonce=nonce)

    def _remove(self, session: Session, member: Member) -> None:
        session.members.pop(member.fingerprint, None)
        self.by_address.pop(member.address, None)
        if not session.members:
            self.sessions.pop(session.name, None)

    def expire(self, now: float) -> int:
        """Drop members idle for session_timeout (and sessions left empty); how many."""
        timeout = self.limits.session_timeout
        dropped = 0
        for session in list(self.sessions.values()):
            for member in list(session.members.values()):
                if now - member.last_seen > timeout:
                    self._remove(session, member)
                    dropped += 1
            if not session.members:
                self.sessions.pop(session.name, None)
                self.counters.sessions_expired += 1
        return dropped

    def snapshot(self) -> dict[str, object]:
        c = self.counters
        return {
            "sessions": len(self.sessions),
            "paired": sum(1 for s in self.sessions.values() if len(s.members) == 2),
            "registrations": c.registrations,
            "moves": c.moves,
            "refusals": dict(c.refusals),
            "relayed_datagrams": c.relayed_datagrams,
            "relayed_bytes": c.relayed_bytes,
            "dropped_datagrams": c.dropped_datagrams,
            "sessions_created": c.sessions_created,
            "sessions_expired": c.sessions_expired,
        }

    def members(self) -> Iterator[tuple[str, Member]]:
        for s in self.sessions.values():
            for m in s.members.values():
                yield s.name, m


# -- the agent's side --------------------------------------------------------------------

@dataclass(frozen=True)
class Registered:
    info: PeerInfo
    punch: bool  # the relay asks both agents to punch now


@dataclass(frozen=True)
class Refused:
    code: Refusal
    reason: str
    authentic: bool  # the refusal's MAC verified (it came from a relay with our secret)


@dataclass(frozen=True)
class Punched:
    fingerprint: str
    address: Address
    heard: bool  # the peer has heard our punches


class AgentTokens:
    """An agent's rendezvous codec: tokens out, relay answers and punches in."""

    def __init__(self, secret: bytes, session: str, fingerprint: str) -> None:
        if not secret:
            raise ValueError("the rendezvous secret must not be empty")
        _short(session, MAX_SESSION, "session name")
        if not session:
            raise ValueError("the rendezvous session name must not be empty")
        self.secret = secret
        self.session = session
        self.fingerprint = fingerprint
        self.peer_fingerprint: str | None = None

    def register(self, wall: float, *, punch: bool = False) -> bytes:
        return encode(self.secret, Kind.REGISTER, session=self.session,
                      fingerprint=self.fingerprint, wall=wall,
                      flags=FLAG_PUNCH if punch else 0)

    def punch(self, wall: float, *, heard: bool) -> bytes:
        return encode(self.secret, Kind.PUNCH, session=self.session,
                      fingerprint=self.fingerprint, wall=wall,
                      flags=FLAG_HEARD if heard else 0)

    def receive_untrusted(self, data: bytes, src: Address,
                          wall: float) -> Registered | Refused | Punched | None:
        """What a rendezvous datagram means to this agent; None if it is to be ignored."""
        try:
            dgram = verify_untrusted(self.secret, data)
        except ProtocolError:
            try:
                raw, _, _ = decode_untrusted(data)
            except ProtocolError:
                return None
            if raw.kind is Kind.REFUSED:  # e.g. our secret is wrong: still say why
                code, reason = unpack_refusal_untrusted(raw.body)
                return Refused(code, reason, authentic=False)
            return None
        if dgram.kind is Kind.PUNCH:
            if (dgram.session != self.session or dgram.fingerprint == self.fingerprint
                    or abs(dgram.wall_ms / 1000 - wall) > 120):
                return None
            return Punched(dgram.fingerprint, normalise(src), bool(dgram.flags & FLAG_HEARD))
        if dgram.kind is Kind.REFUSED:
            code, reason = unpack_refusal_untrusted(dgram.body)
            return Refused(code, reason, authentic=True)
        if dgram.kind in (Kind.REGISTERED, Kind.PEER):
            if dgram.session != self.session or dgram.fingerprint != self.fingerprint:
                return None
            info = unpack_peer_info_untrusted(dgram.body)
            if info.peer_fingerprint:
                self.peer_fingerprint = info.peer_fingerprint
            return Registered(info, bool(dgram.flags & FLAG_PUNCH))
        return None
