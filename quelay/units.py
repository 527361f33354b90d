"""Sizes (bytes) and rates (bits per second) as operators type them, and back.

Conventions, chosen to match what link budgets and ``ls -h`` print:

* sizes: ``K``/``M``/``G``/``T`` (with or without ``B``) are SI powers of
  1000; ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024. Case does not
  matter (``1k`` == ``1K`` == 1000). Fractions are rounded to the nearest byte.
* rates are *bits* per second: ``2Mbps`` == ``2Mbit/s`` == ``2M`` ==
  2 000 000. An upper-case ``B`` (``2MB/s``) would mean bytes and is refused
  rather than guessed. ``0`` means uncapped. A non-zero rate below 1 kbit/s
  is refused: it is almost always a forgotten unit and would stall the link.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .errors import QuelayError

MIN_RATE = 1000  # bit/s; see module docstring

_NUMBER = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"{_NUMBER}\s*(?P<unit>[a-z]*)", re.IGNORECASE)
_RATE_RE = re.compile(rf"{_NUMBER}\s*(?P<prefix>[kmgt]?)(?P<unit>[a-z/]*)", re.IGNORECASE)

_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_RATE_UNITS = {"", "bps", "bit/s", "bits/s", "b/s"}
_UNCAPPED = {"uncapped", "unlimited"}


class UnitError(QuelayError, ValueError):
    """A size or rate given by the operator (or a config file) cannot be understood."""

    code = "bad_unit"


def _size_multiplier(unit: str) -> int | None:
    u = unit.lower()
    u = u[:-1] if u.endswith("b") else u
    return _BINARY.get(u) or _SI.get(u)


def _nearest(value: Fraction) -> int:
    """Round half up (``round`` on a Fraction rounds half to even, surprising here)."""
    return math.floor(value + Fraction(1, 2))


def _whole(text: object) -> int:
    """Validate an int given directly (bool is not a count, negatives are nonsense)."""
    if isinstance(text, bool) or not isinstance(text, int):
        raise UnitError(f"expected a number or a string with a unit, got {text!r}")
    if text < 0:
        raise UnitError(f"{text} is negative")
    return text


def parse_size(text: str | int) -> int:
    """Bytes in ``"1.5MiB"``, ``"10MB"``, ``"512"``; rounded to the nearest byte."""
    if not isinstance(text, str):
        return _whole(text)
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise UnitError(f"size {text!r} is not a non-negative number with an optional unit "
                        "such as 512, 64KiB, 1.5MiB or 10MB")
    multiplier = _size_multiplier(m["unit"])
    if multiplier is None:
        raise UnitError(f"size {text!r}: unknown unit {m['unit']!r} "
                        "(use B, K/M/G/T[B] for powers of 1000 or KiB/MiB/GiB/TiB for 1024)")
    return _nearest(Fraction(m["num"]) * multiplier)


def parse_rate(text: str | int) -> int:
    """Bits per second in ``"2Mbps"``, ``"500kbit/s"``, ``"2000000"``; 0 = uncapped."""
    bps = _whole(text) if not isinstance(text, str) else _parse_rate_text(text)
    if 0 < bps < MIN_RATE:
        raise UnitError(f"rate {bps} bit/s is below the minimum 1 kbit/s; "
                        f"did you mean {bps}Mbps or {bps}kbps?")
    return bps


def _parse_rate_text(text: str) -> int:
    stripped = text.strip()
    if stripped.lower() in _UNCAPPED:
        return 0
    m = _RATE_RE.fullmatch(stripped)
    if m is None:
        raise UnitError(f"rate {text!r} is not a non-negative number with an optional unit "
                        "such as 2Mbps, 500kbit/s or 0 (uncapped)")
    unit = m["unit"]
    if unit.startswith("B") or unit.lower().startswith("byte"):
        bits = _nearest(Fraction(m["num"]) * 8)
        raise UnitError(f"rate {text!r} is in bytes; rates are in bits per second "
                        f"(did you mean {bits}{m['prefix']}bps?)")
    if unit.lower() not in _RATE_UNITS:
        raise UnitError(f"rate {text!r}: unknown unit {m['prefix'] + unit!r} "
                        "(use bps, kbps, Mbps, Gbps or bit/s, kbit/s, ...)")
    return _nearest(Fraction(m["num"]) * _SI[m["prefix"].lower()])


_DURATION_RE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h|d|)",
                          re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """``5``, ``2.5``, ``"2.5s"``, ``"250ms"``, ``"1m"``, ``"2h"``, ``"7d"`` -> seconds (>= 0).

    The one duration parser: config, flags, the control protocol and the link
    simulator all accept exactly these spellings.
    """
    if isinstance(value, bool):
        raise UnitError(f"expected a duration in seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is None:
            raise UnitError(f"{value!r} is not a duration (examples: 5, 2.5s, 250ms, 1m, 2h)")
        seconds = float(m["num"]) * _DURATION_UNITS[m["unit"].lower()]
    else:
        raise UnitError(f"expected a duration in seconds, got {value!r}")
    if not math.isfinite(seconds):
        raise UnitError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise UnitError(f"{value!r} is negative")
    return seconds


def _scaled(value: float, step: int, units: list[str], digits: int) -> tuple[float, str]:
    """Pick the unit so the rounded mantissa stays below ``step`` (no "1024.0 KiB")."""
    for unit in units[:-1]:
        if round(abs(value), digits) < step:
            return value, unit
        value /= step
    return value, units[-1]


def format_size(n: int) -> str:
    """``"512 B"``, ``"1.0 MiB"``: binary units, as the spool and files are sized."""
    if abs(n) < 1024:
        return f"{n} B"
    value, unit = _scaled(n / 1024, 1024, ["KiB", "MiB", "GiB", "TiB", "PiB"], 1)
    return f"{value:.1f} {unit}"


def format_rate(bps: float, *, zero: str = "uncapped") -> str:
    """``"2.00 Mbit/s"`` (3 significant digits); ``zero`` for 0, since 0 means uncapped.

    Pass ``zero="0 bit/s"`` when formatting a measured throughput rather than a cap.
    """
    if bps == 0:
        return zero
    if not math.isfinite(bps):
        return f"{bps} bit/s"
    value, unit = _scaled(bps, 1000, ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"], 0)
    if unit == "bit/s" and float(bps).is_integer():
        return f"{int(bps)} bit/s"
    digits = 2 if abs(value) < 9.995 else 1 if abs(value) < 99.95 else 0
    return f"{value:.{digits}f} {unit}"


def format_duration(seconds: float) -> str:
    """Compact ETA/elapsed text: ``"3.2s"``, ``"42s"``, ``"1m05s"``, ``"2h03m04s"``, ``"3d04h"``."""
    if not math.isfinite(seconds):
        return "unknown"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if round(seconds, 1) < 10:
        return f"{sign}{seconds:.1f}s"
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours:02d}h"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{sign}{minutes}m{secs:02d}s"
    return f"{sign}{secs}s"
