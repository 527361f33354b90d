"""Admission of new QUIC handshakes at a listening endpoint (sans-IO).

The listener answers anyone's Initial, and the peer's pin is checked only once
a full TLS handshake is done, so a flood of Initials costs CPU (a signature
per handshake) and memory (a connection per Initial, kept until the handshake
times out). :class:`HandshakeAdmission` decides, per Initial that would create
a connection, *before* any state or cryptography:

* **Bounded handshakes**: at most ``max_handshakes`` connections may be
  unauthenticated at once (``per_host`` from one host); more are dropped.
* **Retry under load**: while ``retry_above`` handshakes are in progress, or
  when new handshakes arrive faster than ``fresh_rate`` per second (burst
  ``fresh_burst``), an Initial without a valid token is answered by a QUIC
  Retry (stateless: one small datagram, no connection) whose token is an HMAC
  over the client's address, the original and the Retry connection IDs and a
  time. Only a client that receives datagrams at its source address comes back
  with the token, so spoofed floods never reach the TLS stack. Without load
  there is no Retry, and a trusted peer's reconnect costs no extra round trip.
* **Retry budget**: Retries to hosts that never authenticated are limited to
  ``retry_rate`` per second (burst ``retry_burst``); past it such Initials are
  dropped, so answering a flood costs a bounded share of the link. The host of
  a peer that authenticated before (``peer_authenticated``) always gets its
  Retry, and is exempt from the penalty below.
* **Untrusted identities**: a host whose handshake ended with an identity that
  is not pinned (:meth:`identity_refused`) is ignored, before any crypto, for
  ``penalty`` seconds, doubling per repeat up to ``max_penalty``. Such a
  handshake has proven the host's address, so a spoofer cannot get another
  host penalised.
* **Quiet logs**: refusals are counted per reason (``counters``, exported as
  metrics); the log gets the first refusal of a reason, then at most one line
  per ``log_interval`` with how many were suppressed.

No I/O here: the endpoint passes the header fields, counts and ``now``, and
sends the Retry datagram it is handed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from aioquic.quic.packet import encode_quic_retry

log = logging.getLogger("quelay.transport")

Address = tuple[str, int]

_TOKEN_HEAD = struct.Struct(">dBB")  # issued-at, len(original dcid), len(retry scid)
_MAC_SIZE = 16
MAX_TRACKED_HOSTS = 4096  # penalised hosts remembered at once (oldest forgotten first)

# Refusal reasons (the label set of quelay_handshakes_refused_total).
REASONS = ("retry", "bad_token", "busy", "host_busy", "penalised", "retry_budget", "cap")


class Verdict(Enum):
    ACCEPT = "accept"  # create the connection
    RETRY = "retry"  # send ``retry_packet`` and forget the Initial
    DROP = "drop"  # ignore the Initial


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    original_dcid: bytes | None = None  # for the connection, when it follows a Retry
    retry_scid: bytes | None = None
    retry_packet: bytes | None = None


@dataclass
class AdmissionConfig:
    max_handshakes: int = 64
    per_host: int = 8
    retry_above: int = 4
    fresh_rate: float = 20.0  # new handshakes per second accepted without Retry
    fresh_burst: float = 40.0
    retry_rate: float = 50.0  # Retries per second to hosts not known as the peer's
    retry_burst: float = 50.0
    token_lifetime: float = 10.0
    penalty: float = 1.0
    max_penalty: float = 300.0
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.max_handshakes < 1 or self.per_host < 1 or self.retry_above < 0:
            raise ValueError("max_handshakes and per_host must be >= 1, retry_above >= 0")


def host_of(addr: Address) -> str:
    """The host part, normalised (v4-mapped v6 is the v4 address)."""
    host = addr[0].lower().split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass
class _Penalty:
    until: float
    level: int


@dataclass
class _LogState:
    last: float
    suppressed: int = 0


@dataclass
class HandshakeAdmission:
    config: AdmissionConfig = field(default_factory=AdmissionConfig)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    random: Callable[[int], bytes] = secrets.token_bytes
    label: str = ""
    counters: Counter[str] = field(default_factory=Counter)  # refusals by reason
    accepted: int = 0
    _penalties: OrderedDict[str, _Penalty] = field(default_factory=OrderedDict)
    _fresh: dict[str, tuple[float, float]] = field(default_factory=dict)  # bucket: level, at
    _known: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _logs: dict[str, _LogState] = field(default_factory=dict)

    # -- the decision ------------------------------------------------------------------

    def initial(self, *, addr: Address, version: int, dcid: bytes, scid: bytes, token: bytes,
                in_progress: int, in_progress_host: int, now: float) -> Decision:
        """What to do with an Initial that would start a new connection."""
        host = host_of(addr)
        known = host in self._known
        penalty = self._penalties.get(host)
        if penalty is not None and now < penalty.until and not known:
            return self.refused("penalised", addr, now)
        if in_progress >= self.config.max_handshakes:
            return self.refused("busy", addr, now)
        if in_progress_host >= self.config.per_host:
            return self.refused("host_busy", addr, now)
        if token:
            checked = self.check_token(token, addr, now)
            if checked is None:
                return self.refused("bad_token", addr, now)
            self.accepted += 1
            return Decision(Verdict.ACCEPT, original_dcid=checked[0], retry_scid=checked[1])
        cfg = self.config
        if in_progress >= cfg.retry_above or not self._take("fresh", cfg.fresh_rate,
                                                            cfg.fresh_burst, now):
            if not known and not self._take("retry", cfg.retry_rate, cfg.retry_burst, now):
                return self.refused("retry_budget", addr, now)
            retry_scid = self.random(8)
            packet = encode_quic_retry(
                version=version, source_cid=retry_scid, destination_cid=scid,
                original_destination_cid=dcid,
                retry_token=self.make_token(addr, dcid, retry_scid, now))
            self.counters["retry"] += 1
            return Decision(Verdict.RETRY, "retry", retry_packet=packet)
        self.accepted += 1
        return Decision(Verdict.ACCEPT, original_dcid=dcid)

    def _take(self, bucket: str, rate: float, burst: float, now: float) -> bool:
        level, at = self._fresh.get(bucket, (burst, now))
        level = min(burst, level + max(0.0, now - at) * rate)
        if level < 1.0:
            self._fresh[bucket] = (level, now)
            return False
        self._fresh[bucket] = (level - 1.0, now)
        return True

    def peer_authenticated(self, addr: Address) -> None:
        """A trusted peer authenticated from ``addr``: its host is always answered."""
        host = host_of(addr)
        self._known.pop(host, None)
        self._known[host] = None
        while len(self._known) > 16:
            self._known.popitem(last=False)

    # -- untrusted identities ----------------------------------------------------------

    def identity_refused(self, addr: Address, now: float) -> float:
        """A completed handshake presented an identity we do not trust: ignore its host
        for a while (doubling per repeat). Returns the penalty in seconds."""
        host = host_of(addr)
        old = self._penalties.pop(host, None)
        level = 0 if old is None else old.level + 1
        seconds = min(self.config.max_penalty, self.config.penalty * 2 ** min(level, 30))
        self._penalties[host] = _Penalty(now + seconds, level)
        while len(self._penalties) > MAX_TRACKED_HOSTS:
            self._penalties.popitem(last=False)
        return seconds

    def penalised(self, addr: Address, now: float) -> bool:
        p = self._penalties.get(host_of(addr))
        return p is not None and now < p.until

    # -- Retry tokens ------------------------------------------------------------------

    def make_token(self, addr: Address, original_dcid: bytes, retry_scid: bytes,
                   now: float) -> bytes:
        body = _TOKEN_HEAD.pack(now, len(original_dcid), len(retry_scid)) + original_dcid \
            + retry_scid
        return body + self._mac(addr, body)

    def check_token(self, token: bytes, addr: Address, now: float
                    ) -> tuple[bytes, bytes] | None:
        """(original dcid, retry scid) if ``token`` is ours, fresh and for ``addr``."""
        if len(token) < _TOKEN_HEAD.size + _MAC_SIZE:
            return None
        issued, n_odcid, n_rscid = _TOKEN_HEAD.unpack_from(token)
        end = _TOKEN_HEAD.size + n_odcid + n_rscid
        if len(token) != end + _MAC_SIZE:
            return None
        body, mac = token[:end], token[end:]
        if not hmac.compare_digest(mac, self._mac(addr, body)):
            return None
        if not (now - self.config.token_lifetime <= issued <= now + 1.0):
            return None
        odcid = token[_TOKEN_HEAD.size:_TOKEN_HEAD.size + n_odcid]
        return odcid, token[_TOKEN_HEAD.size + n_odcid:end]

    def _mac(self, addr: Address, body: bytes) -> bytes:
        who = f"{host_of(addr)}|{addr[1]}".encode()
        return hmac.new(self.secret, who + b"|" + body, hashlib.sha256).digest()[:_MAC_SIZE]

    # -- counting and quiet logging ----------------------------------------------------

    def refused(self, reason: str, addr: Address, now: float) -> Decision:
        """Count and (quietly) log a refusal; the Initial is dropped."""
        self.counters[reason] += 1
        self.note(reason, addr, now)
        return Decision(Verdict.DROP, reason)

    def note(self, reason: str, addr: Address, now: float) -> None:
        """Log a refusal: the first of its reason now, later ones summarised per interval."""
        state = self._logs.get(reason)
        if state is not None and now - state.last < self.config.log_interval:
            state.suppressed += 1
            return
        suppressed = state.suppressed if state is not None else 0
        self._logs[reason] = _LogState(now)
        log.warning("%s: refusing handshakes (%s), e.g. from %s:%d; %d more since the last "
                    "such line", self.label, reason, addr[0], addr[1], suppressed,
                    extra={"event": "handshake.refused", "agent": self.label,
                           "reason": reason, "peer": f"{addr[0]}:{addr[1]}",
                           "suppressed": suppressed})
