"""Link profiles: frozen, per-direction impairment parameters.

A profile is data only; :mod:`quelay.linksim.impairment` turns it into
behaviour. Profiles are immutable so a test can't accidentally change a
shared one; derive variants with :meth:`Profile.with_overrides` (Python) or
a spec string ``"NAME,key=value,..."`` (:func:`parse_profile`, used by the
CLI).

Direction names: ``up`` = client -> upstream, ``down`` = upstream -> client.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import units
from ..units import UnitError, parse_duration

JitterDist = Literal["uniform", "normal"]

MIN_QUEUE_BYTES = 15000
"""Floor for a rate-derived queue: one QUIC initial congestion window
(10 x 1500 bytes), so a fresh connection's first flight is not cut by a slow
link's tiny 250-ms queue (100 kbit/s * 250 ms = 3125 bytes)."""

DEFAULT_MAX_IN_FLIGHT = 32 * 1024 * 1024
"""Bytes a direction may hold between receive and delivery (the delay line).
Bounds memory when the rate is unlimited; excess is dropped as "overflow"."""


@dataclass(frozen=True)
class DirectionParams:
    """Impairments for one direction of the link.

    ``rate_bps`` is a bottleneck (bits/s) with a drop-tail queue of
    ``queue_bytes`` (if set) or ``queue_s`` seconds at the rate (at least
    :data:`MIN_QUEUE_BYTES`); ``None`` means unlimited and no queue.
    ``delay_s`` is the one-way delay (RTT/2). ``jitter_s`` adds a per-datagram
    deviation: uniform in ``[-jitter, +jitter]`` or normal with sigma
    ``jitter`` truncated at ``±3 jitter``. With ``reorder=False`` (default)
    delivery stays FIFO, so jitter is delay variation only; ``reorder=True``
    lets datagrams closer than the jitter spread overtake each other.
    ``loss``, ``corrupt`` (flip one random byte) and ``duplicate`` are
    per-datagram probabilities in [0, 1].
    """

    rate_bps: float | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    jitter_dist: JitterDist = "uniform"
    reorder: bool = False
    loss: float = 0.0
    corrupt: float = 0.0
    duplicate: float = 0.0
    queue_s: float = 0.25
    queue_bytes: int | None = None
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not (self.rate_bps > 0 and math.isfinite(self.rate_bps)):
            raise ValueError(f"rate_bps must be a positive number or None, got {self.rate_bps!r}")
        for name in ("delay_s", "jitter_s", "queue_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        for name in ("loss", "corrupt", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.jitter_dist not in ("uniform", "normal"):
            raise ValueError(f"jitter_dist must be 'uniform' or 'normal', got {self.jitter_dist!r}")
        if self.queue_bytes is not None and self.queue_bytes <= 0:
            raise ValueError(f"queue_bytes must be > 0 or None, got {self.queue_bytes!r}")
        if self.max_in_flight_bytes <= 0:
            raise ValueError("max_in_flight_bytes must be > 0")

    @property
    def queue_limit(self) -> int | None:
        """Drop-tail limit in bytes, or ``None`` when the rate is unlimited."""
        if self.rate_bps is None:
            return None
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(MIN_QUEUE_BYTES, math.ceil(self.rate_bps / 8 * self.queue_s))


_DIRECTION_FIELDS = frozenset(f.name for f in dataclasses.fields(DirectionParams))


@dataclass(frozen=True)
class Profile:
    """Both directions of a link plus link-wide settings.

    ``overhead_bytes`` is link-layer overhead added to every datagram's size
    for the bottleneck (serialisation time, queue occupancy), the ``wire_*``
    counters and the histogram, on top of the IP+UDP headers the
    :class:`~quelay.linksim.impairment.LinkModel` is told to count
    (``header_bytes``: the proxy counts 28 B per IPv4 datagram, 48 B per IPv6
    one, so its figures are what the link carries). The ``bytes_*`` counters
    always count UDP payload.
    """

    name: str
    up: DirectionParams = field(default_factory=DirectionParams)
    down: DirectionParams = field(default_factory=DirectionParams)
    overhead_bytes: int = 0

    def __post_init__(self) -> None:
        if self.overhead_bytes < 0:
            raise ValueError("overhead_bytes must be >= 0")

    @property
    def rtt_s(self) -> float:
        return self.up.delay_s + self.down.delay_s

    def with_overrides(self, **overrides: Any) -> Profile:
        """A copy with some parameters changed.

        Keys: ``name``, ``overhead_bytes``; ``up`` / ``down`` (a
        :class:`DirectionParams` or a dict of its fields); any
        :class:`DirectionParams` field (applies to both directions) or the
        same with an ``_up`` / ``_down`` suffix; ``rtt_s`` (sets ``delay_s``
        to half of it in each direction). Example::

            CLEAN.with_overrides(rate_bps=20e6, rtt_s=0.02, loss=0.01)
        """
        top: dict[str, Any] = {}
        per: dict[str, dict[str, Any]] = {"up": {}, "down": {}}
        whole: dict[str, DirectionParams] = {}
        for key, value in overrides.items():
            if key in ("name", "overhead_bytes"):
                top[key] = value
            elif key in ("up", "down"):
                if isinstance(value, DirectionParams):
                    whole[key] = value
                elif isinstance(value, dict):
                    for k in value:
                        _check_direction_field(k)
                    per[key].update(value)
                else:
                    raise TypeError(f"{key} must be DirectionParams or dict, got {type(value)}")
            elif key == "rtt_s":
                per["up"]["delay_s"] = per["down"]["delay_s"] = value / 2
            elif key.endswith(("_up", "_down")):
                base, _, direction = key.rpartition("_")
                if base == "rtt_s":
                    raise ValueError("rtt_s applies to both directions; use delay_s_up/_down")
                _check_direction_field(base)
                per[direction][base] = value
            else:
                _check_direction_field(key)
                per["up"][key] = value
                per["down"][key] = value
        up = dataclasses.replace(whole.get("up", self.up), **per["up"])
        down = dataclasses.replace(whole.get("down", self.down), **per["down"])
        return dataclasses.replace(self, up=up, down=down, **top)


def _check_direction_field(name: str) -> None:
    if name not in _DIRECTION_FIELDS:
        known = ", ".join(sorted(_DIRECTION_FIELDS))
        raise ValueError(f"unknown link parameter {name!r} (known: {known}, rtt_s)")


def symmetric(name: str, **params: Any) -> Profile:
    """A profile with the same parameters in both directions."""
    p = DirectionParams(**params)
    return Profile(name=name, up=p, down=p)


CLEAN = Profile(name="clean")
LOS_250MS = Profile(
    name="LOS-250ms",
    up=DirectionParams(rate_bps=500e3, delay_s=0.125, jitter_s=0.010),
    down=DirectionParams(rate_bps=11e6, delay_s=0.125, jitter_s=0.010),
)
BLOS_750MS = Profile(
    name="BLOS-750ms",
    up=DirectionParams(rate_bps=100e3, delay_s=0.375, jitter_s=0.050),
    down=DirectionParams(rate_bps=13e6, delay_s=0.375, jitter_s=0.050),
)
_DEGRADED = DirectionParams(delay_s=0.375, jitter_s=0.050, loss=0.05, corrupt=0.01,
                            duplicate=0.03)
DEGRADED_BLOS = Profile(
    name="Degraded-BLOS",
    up=dataclasses.replace(_DEGRADED, rate_bps=100e3),
    down=dataclasses.replace(_DEGRADED, rate_bps=150e3),
)

REORDER_SUFFIX = "+reorder"
REORDER_JITTER_S = 0.025
"""Jitter given to a reordering variant of a profile that has none (the clean link):
±25 ms uniform, as in issue 11's measurements."""


def with_reordering(profile: Profile, jitter_s: float | None = None) -> Profile:
    """The netem-like variant of ``profile``: every datagram's delay is drawn on its own
    (``reorder=True``), so datagrams closer together than the jitter spread overtake
    each other. A direction without jitter gets ``jitter_s`` (default
    :data:`REORDER_JITTER_S`)."""
    extra = REORDER_JITTER_S if jitter_s is None else jitter_s

    def direction(d: DirectionParams) -> DirectionParams:
        return dataclasses.replace(d, reorder=True, jitter_s=d.jitter_s or extra)

    return dataclasses.replace(profile, name=profile.name + REORDER_SUFFIX,
                               up=direction(profile.up), down=direction(profile.down))


_BASE_PROFILES = (CLEAN, LOS_250MS, BLOS_750MS, DEGRADED_BLOS)
CLEAN_REORDER, LOS_250MS_REORDER, BLOS_750MS_REORDER, DEGRADED_BLOS_REORDER = (
    with_reordering(p) for p in _BASE_PROFILES)

PROFILES: dict[str, Profile] = {
    p.name: p for p in (*_BASE_PROFILES, CLEAN_REORDER, LOS_250MS_REORDER, BLOS_750MS_REORDER,
                        DEGRADED_BLOS_REORDER)
}


def get_profile(name: str) -> Profile:
    """Look a built-in profile up by name (case-insensitive)."""
    for key, profile in PROFILES.items():
        if key.lower() == name.strip().lower():
            return profile
    raise ValueError(f"unknown link profile {name!r} (known: {', '.join(PROFILES)})")


# --- spec strings: "NAME,key=value,..." -------------------------------------

_SHORT_KEYS = {
    "rate": "rate_bps",
    "delay": "delay_s",
    "jitter": "jitter_s",
    "jitter_dist": "jitter_dist",
    "reorder": "reorder",
    "loss": "loss",
    "corrupt": "corrupt",
    "duplicate": "duplicate",
    "dup": "duplicate",
    "queue": "queue_bytes",
    "queue_s": "queue_s",
    "max_in_flight": "max_in_flight_bytes",
}


def parse_rate(text: str) -> float | None:
    """``"500k"``, ``"11M"``, ``"2Mbps"`` -> bits/s (:func:`quelay.units.parse_rate`);
    ``"unlimited"`` -> None."""
    t = text.strip().lower()
    if t in ("none", "unlimited", "inf"):
        return None
    try:
        return float(units.parse_rate(text))
    except UnitError as exc:
        raise ValueError(f"bad rate: {exc} (examples: 500k, 11M, 2Mbps, unlimited)") from None


def parse_seconds(text: str) -> float:
    """``"250ms"``, ``"0.25"``, ``"1m"`` -> seconds (:func:`quelay.units.parse_duration`)."""
    try:
        return parse_duration(text)
    except UnitError as exc:
        raise ValueError(f"bad duration: {exc}") from None


def parse_probability(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"bad probability {text!r} (examples: 5%, 0.05)") from None


def parse_size(text: str) -> int:
    """``"64k"``, ``"1MiB"``, ``"4500"`` -> bytes (:func:`quelay.units.parse_size`)."""
    try:
        return units.parse_size(text)
    except UnitError as exc:
        raise ValueError(f"bad size: {exc} (examples: 4500, 64k, 1MiB)") from None


def _parse_value(field_name: str, text: str) -> Any:
    if field_name == "rate_bps":
        return parse_rate(text)
    if field_name in ("delay_s", "jitter_s", "queue_s"):
        return parse_seconds(text)
    if field_name in ("loss", "corrupt", "duplicate"):
        return parse_probability(text)
    if field_name in ("queue_bytes", "max_in_flight_bytes"):
        return parse_size(text)
    if field_name == "reorder":
        if text.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"bad boolean {text!r}")
    return text.strip()


def parse_profile(spec: str) -> Profile:
    """A built-in profile, optionally with overrides: ``"NAME[,key=value...]"``.

    Keys: rate, delay, rtt, jitter, jitter_dist, reorder, loss, corrupt,
    duplicate (dup), queue (bytes), queue_s, max_in_flight, each optionally
    suffixed ``_up`` / ``_down``; and ``overhead`` (bytes per datagram).
    Example: ``"LOS-250ms,loss=1%,rate_up=2M"``.
    """
    name, *items = [part.strip() for part in spec.split(",")]
    profile = get_profile(name)
    overrides: dict[str, Any] = {}
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"bad profile override {item!r}: expected key=value")
        if key == "overhead":
            overrides["overhead_bytes"] = parse_size(value)
            continue
        base, suffix = key, ""
        for s in ("_up", "_down"):
            if key.endswith(s):
                base, suffix = key[: -len(s)], s
        if base == "rtt":
            if suffix:
                raise ValueError("rtt applies to both directions; use delay_up / delay_down")
            overrides["rtt_s"] = parse_seconds(value)
            continue
        if base not in _SHORT_KEYS:
            raise ValueError(
                f"unknown profile override {key!r} (known: {', '.join(sorted(_SHORT_KEYS))}, "
                "rtt, overhead; optional suffix _up/_down)"
            )
        full = _SHORT_KEYS[base]
        overrides[full + suffix] = _parse_value(full, value)
    if overrides:
        overrides.setdefault("name", spec)
        profile = profile.with_overrides(**overrides)
    return profile
