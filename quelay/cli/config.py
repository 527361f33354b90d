"""Settings for ``quelay run``: a TOML file, ``QUELAY_*`` variables and flags.

Every field of :class:`quelay.agent.AgentConfig` is a setting, plus
``log_level`` and ``log_format``. The key list is derived from the dataclass,
so a field added there is settable everywhere without touching this module
(its kind comes from its type and name: ``int`` fields named ``*_size``,
``*_window``, ``*_water`` or ``*_bytes`` are sizes, ``rate``, ``rate_*`` and
``*_rate`` rates, other ints counts; ``float`` fields are durations in seconds, except
``*_share`` ones: a fraction such as ``0.25`` or ``25%``, e.g. ``datagram_share``).

Precedence, lowest first::

    built-in default  <  config file  <  QUELAY_<KEY> environment  <  --flag

* **File**: flat TOML, keys as the option names (``state_dir`` or
  ``state-dir``); an unknown key is an error. Relative paths in the file are
  relative to the file's directory.
* **Environment**: ``QUELAY_<KEY>`` in upper case (``QUELAY_RATE=2Mbps``,
  ``QUELAY_STATE_DIR``); ``QUELAY_TRUST`` holds entries separated by commas
  or whitespace. Other ``QUELAY_*`` variables are not settings and are left
  alone (e.g. ``QUELAY_PURE_PYTHON``).
* **Flags**: ``--rate 2Mbps``; a repeated ``--trust`` replaces the file's list.

**Named peers (a hub).** ``trust``, ``peer`` and ``rate`` entries of the form
``NAME=VALUE`` (``--trust site-a=sha256:...``, ``--peer site-a=host:4433``,
``--rate site-a=2Mbps``; the same in the file's lists and in ``QUELAY_TRUST``,
``QUELAY_PEER``, ``QUELAY_RATE``, comma-separated) configure the peer NAME,
and so do ``[[peers]]`` tables in the file (``name``, ``trust``, ``address``,
``rate``). They become ``AgentConfig.peers``, in the order first named. A
higher layer replaces one field of one peer (``--trust site-a=PIN`` replaces
site-a's pins, not site-b's); within a layer, pins of one peer add up. The
unnamed ``rate`` is then the cap of every link without its own.

Sizes take units (``1MiB``, ``64KiB``, ``10MB``), rates are bits per second
(``2Mbps``, ``500kbit/s``, ``0`` = uncapped), durations are seconds
(``5``, ``2.5s``, ``250ms``, ``1m``). Every problem raises :class:`ConfigError`
whose message is one line naming the key, the bad value and where it came
from: the operator's configuration is at fault, not the agent.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QuelayError
from ..units import UnitError, format_rate, format_size, parse_duration, parse_rate, parse_size

ENV_PREFIX = "QUELAY_"
CONFIG_ENV = "QUELAY_CONFIG"

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("human", "json")

# Help for the known fields; a field without an entry still works (generic help).
HELP: dict[str, str] = {
    "state_dir": "Identity and state directory.",
    "inbox": "Where incoming files land (default STATE_DIR/inbox).",
    "control": "Control socket path (default STATE_DIR/control.sock).",
    "listen": "Accept the peer on HOST:PORT (UDP).",
    "peer": "Dial the peer at HOST:PORT (UDP); NAME=HOST:PORT dials the named peer NAME "
            "(repeatable).",
    "rendezvous": "Meet the peer through the rendezvous relay at HOST:PORT (instead of "
                  "listen/peer; see docs/rendezvous.md).",
    "session": "Rendezvous session name (the same on both agents).",
    "rendezvous_secret_file": "File holding the rendezvous shared secret.",
    "rendezvous_direct": "Try a direct path through the NATs (true) or always use the "
                         "relay (false).",
    "metrics": "Serve Prometheus metrics on HOST:PORT (TCP, GET /metrics); off by default.",
    "resumption": "Resume the TLS session on reconnects (true, default) or always run a full "
                  "handshake (false); identities are proven either way.",
    "trust": "Pinned peer: sha256:<hex> or a certificate file (repeatable); NAME=PIN pins "
             "the named peer NAME of a hub.",
    "inbox_ttl": "Seconds a received file stays in the inbox before it is deleted (0 = keep).",
    "export": "A read-only export the peer may list and fetch: NAME=DIR or DIR (repeatable).",
    "name": "A label for this agent (logs, status).",
    "stream_window": "Per-stream receive window, e.g. 2MiB.",
    "connection_window": "Connection receive window, e.g. 8MiB.",
    "send_high_water": "Bytes buffered in QUIC per stream before the pump waits.",
    "max_streams": "Concurrent QUIC streams the peer may open, per direction (one per "
                   "active transfer; a closed one is granted again).",
    "spool_size": "Per-stream spool size, e.g. 1MiB.",
    "min_free": "Free space kept under the inbox; below it incoming files stall (e.g. 64MiB).",
    "stall_timeout": "Seconds an incoming file may stall (full or missing inbox) before failing.",
    "max_incoming": "Live incoming transfers accepted from the peer; more are answered busy.",
    "history_max": "Finished transfers kept in memory and journal (oldest pruned first).",
    "history_age": "Seconds a finished transfer is kept before it is pruned.",
    "max_datagram_size": "UDP payload size in bytes (1200..16383).",
    "keepalive": "Seconds between keep-alive PINGs (0 = off).",
    "dead_after": "Seconds of silence (or 4 RTTs) after which the link is declared dead.",
    "probe_interval": "Seconds before an unanswered dial attempt is replaced by a new one.",
    "idle_timeout": "Seconds a silent connection is held for the link's return "
                    "(then it is given up and redialled).",
    "handshake_timeout": "Seconds a connection attempt may take.",
    "reconnect_interval": "Seconds between reconnect attempts.",
    "congestion": "Congestion control: allotted (default), cubic or reno.",
    "progress_interval": "Seconds between progress events.",
    "rate": "Wire rate cap in bits/s, e.g. 2Mbps (0 = uncapped); NAME=RATE caps the named "
            "peer's link (repeatable); with named peers the unnamed rate caps each other link.",
    "peers": "Named peers of a hub: [[peers]] tables in the file (name, trust, address, rate), "
             "or --trust/--peer/--rate NAME=VALUE.",
    "rate_total": "Cap in bits/s shared by every link of a hub, e.g. 10Mbps (0 = none); "
                  "each link with traffic gets an equal share, never more than its own cap.",
    "datagram_share": "Share of the rate cap best-effort datagrams may use, e.g. 0.25 or 25% "
                      "(bulk keeps the rest).",
    "datagram_max_age": "Seconds a best-effort datagram may wait to be sent before it is "
                        "dropped (per message: quelay datagram send --max-age).",
    "log_level": "debug, info, warning, error or critical.",
    "log_format": "human or json (one JSON object per line).",
}

# Keys whose zero value is meaningful ("off" / "uncapped"); other sizes and durations must
# be positive. Counts may be 0 (``max_concurrent = 0`` means no limit).
ZERO_ALLOWED = frozenset({"keepalive", "rate", "inbox_ttl", "min_free", "link_overhead"})
# (minimum, maximum) for known numeric keys, in the setting's unit.
LIMITS: dict[str, tuple[float, float | None]] = {
    "max_datagram_size": (1200, 16383),  # QUIC minimum; above 16383 aioquic corrupts frames
    "spool_size": (1024, 1 << 34),  # the control protocol's spool range
    "stream_window": (1024, None),
    "connection_window": (1024, None),
    "send_high_water": (1024, None),
    "max_streams": (1, 1 << 16),
    "datagram_share": (0, 1),  # a fraction of the cap; 0 is refused (must be > 0)
    "datagram_max_age": (0, 3600),
}
# Extra option names kept for compatibility (key -> aliases).
ALIASES: dict[str, tuple[str, ...]] = {"spool_size": ("spool",)}


class ConfigError(QuelayError, ValueError):
    """A setting is invalid: the operator's configuration is at fault. One line."""

    code = "config_error"

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = f" (from {source})" if source else ""
        text = f"{key}: {message}{where}"
        super().__init__(" ".join(text.split()))  # always one line


@dataclass(frozen=True)
class Setting:
    """One configurable key: how to parse it and how operators spell it."""

    key: str
    kind: str  # path, address, trust, str, choice, size, rate, count, seconds, bool, raw
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        """``QUELAY_<KEY>``; "" for ``peers`` (named entries of QUELAY_TRUST etc. set it)."""
        return "" if self.kind == "peers" else ENV_PREFIX + self.key.upper()

    @property
    def flags(self) -> tuple[str, ...]:
        """``--key``; none for ``peers``, set by the NAME=VALUE forms of other flags."""
        if self.kind == "peers":
            return ()
        names = (self.key, *ALIASES.get(self.key, ()))
        return tuple("--" + n.replace("_", "-") for n in names)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.key, *ALIASES.get(self.key, ()))


# -- the key list, derived from AgentConfig -----------------------------------------------


def _congestion_choices() -> tuple[str, ...]:
    from ..transport.allotted import CONGESTION_CONTROLS

    return tuple(CONGESTION_CONTROLS)


def _kind_of(name: str, tp: Any) -> str:
    if name == "peers":
        return "peers"
    if name == "trust":
        return "trust"
    if name == "congestion":
        return "choice"
    if tp is Path:
        return "path"
    if tp is bool:
        return "bool"
    if tp is int:
        if name == "rate" or name.startswith("rate_") or name.endswith("_rate"):
            return "rate"
        if name.endswith(("_size", "_window", "_water", "_bytes", "_free")):
            return "size"
        return "count"
    if tp is float:
        return "fraction" if name.endswith("_share") else "seconds"
    if tp is str:
        return "str"
    args = typing.get_args(tp)
    if tuple[str, int] in args or tp == tuple[str, int]:
        return "address"
    if typing.get_origin(tp) is list:
        return "list"
    return "raw"


def _build_settings() -> dict[str, Setting]:
    from ..agent import AgentConfig

    hints = typing.get_type_hints(AgentConfig)
    out: dict[str, Setting] = {}
    for f in dataclasses.fields(AgentConfig):
        kind = _kind_of(f.name, hints.get(f.name))
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None  # state_dir, inbox, control: derived in resolve()
        choices = _congestion_choices() if f.name == "congestion" else ()
        help_text = HELP.get(f.name, f"Agent setting {f.name} ({kind}).")
        out[f.name] = Setting(f.name, kind, help_text, default, choices)
    out["log_level"] = Setting("log_level", "choice", HELP["log_level"], "info", LOG_LEVELS)
    out["log_format"] = Setting("log_format", "choice", HELP["log_format"], "human", LOG_FORMATS)
    return out


_SETTINGS: dict[str, Setting] | None = None


def settings() -> dict[str, Setting]:
    """Every key, in AgentConfig order then the logging keys (built once, lazily)."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = _build_settings()
    return _SETTINGS


def _canonical(name: str) -> str | None:
    """The key for a name as written (dashes, aliases, any case), or None if unknown."""
    norm = name.strip().replace("-", "_").lower()
    for s in settings().values():
        if norm in s.names:
            return s.key
    return None


def _did_you_mean(name: str) -> str:
    names = [n for s in settings().values() for n in s.names]
    close = difflib.get_close_matches(name.replace("-", "_").lower(), names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- parsing one value ----------------------------------------------------------------


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "quelay"


def parse_seconds(value: Any) -> float:
    """A duration in seconds (:func:`quelay.units.parse_duration`)."""
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise ValueError(str(exc)) from None


def parse_address(value: Any) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[v6]:PORT"``, ``":PORT"`` (all interfaces) -> ``(host, port)``."""
    from ..linksim.command import parse_hostport

    if not isinstance(value, str):
        raise ValueError(f"expected \"HOST:PORT\", got {value!r}")
    text = value.strip()
    if text.startswith(":"):
        text = "0.0.0.0" + text
    return parse_hostport(text)


def format_address(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _parse_fraction(value: Any) -> float:
    """``0.25``, ``"0.25"`` or ``"25%"`` (a share such as ``datagram_share``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a fraction such as 0.25 or 25%, got {value!r}")
    text = str(value).strip()
    scale = 100.0 if text.endswith("%") else 1.0
    try:
        share = float(text.removesuffix("%")) / scale
    except ValueError:
        raise ValueError(f"expected a fraction such as 0.25 or 25%, got {value!r}") from None
    if share != share or share in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not a finite fraction")
    return share


def _split_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part for part in re.split(r"[\s,]+", value) if part]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _parse_trust(value: Any, base: Path | None) -> list[str]:
    from ..identity import parse_trust

    entries = []
    for entry in _split_list(value):
        spec = entry.strip()
        if not spec.lower().startswith("sha256:") and base is not None:
            path = Path(spec).expanduser()
            spec = str(path if path.is_absolute() else base / path)
        parse_trust(spec)  # validates: a fingerprint, or a readable certificate file
        entries.append(spec)
    return entries


def _check_range(s: Setting, value: float) -> None:
    """Limits from LIMITS; otherwise sizes and durations must be positive (counts may be 0)."""
    lo, hi = LIMITS.get(s.key, (0, None))
    if value == 0 and s.kind != "count" and s.key not in ZERO_ALLOWED and lo == 0:
        raise ValueError("must be greater than 0")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{value} is out of range: must be {bound}")


def parse_value(s: Setting, value: Any, base: Path | None = None) -> Any:
    """Parse one raw value (TOML value, env string or flag string) for setting ``s``.

    ``base`` is the directory relative paths are resolved against (the config
    file's), or None for the working directory. Raises ValueError.
    """
    kind = s.kind
    if kind == "path":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected a path, got {value!r}")
        path = Path(value).expanduser()
        return (base / path) if base is not None and not path.is_absolute() else path
    if kind == "address":
        return parse_address(value)
    if kind == "trust":
        return _parse_trust(value, base)
    if kind == "list":
        return _split_list(value)
    if kind in ("str", "choice"):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        if kind == "choice":
            lowered = value.strip().lower()
            if lowered not in s.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(s.choices)}")
            return lowered
        return value
    if kind == "size":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        n = parse_size(value)
        _check_range(s, n)
        return n
    if kind == "rate":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return parse_rate(value)
    if kind == "count":
        n = _parse_count(value)
        _check_range(s, n)
        return n
    if kind == "seconds":
        seconds = parse_seconds(value)
        _check_range(s, seconds)
        return seconds
    if kind == "fraction":
        share = _parse_fraction(value)
        _check_range(s, share)
        return share
    if kind == "bool":
        return _parse_bool(value)
    if kind == "peers":
        return [_spec(name, fields) for name, fields in _peer_tables(value, base, "").items()]
    return value  # "raw": an AgentConfig field of a type this module does not know


# -- named peers (a hub) --------------------------------------------------------------

#: Flat keys whose entries may name a peer (``NAME=VALUE``) -> the PeerSpec field they set.
NAMED_KEYS = {"trust": "trust", "peer": "address", "rate": "rate"}
PEER_TABLE_KEYS = ("name", "trust", "address", "rate")


def _entries(key: str, value: Any, layer: str) -> list[Any]:
    """A flat key's value as its entries: a list as it is, an env string split."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str) and (layer == "env" or key == "trust"):
        # Rates may hold a space ("2 Mbps"): only commas separate them.
        pattern = r"\s*,\s*" if key == "rate" else r"[\s,]+"
        return [part.strip() for part in re.split(pattern, value) if part.strip()]
    return [value]


def _named_value(field_: str, name: str, value: Any, base: Path | None) -> Any:
    """One named peer's field, parsed (ValueError / QuelayError as for flat keys)."""
    if field_ == "trust":
        return _parse_trust(value, base)
    if field_ == "address":
        return parse_address(value)
    return parse_value(settings()["rate"], value)


def _add(fields: dict[str, tuple[Any, str]], field_: str, value: Any, where: str,
         name: str, key: str) -> None:
    """Record one field of one peer within a layer: pins add up, the rest once."""
    if field_ == "trust" and field_ in fields:
        fields[field_] = (fields[field_][0] + value, where)
    elif field_ in fields:
        raise ConfigError(key, f"peer {name}: {field_} given twice", where)
    else:
        fields[field_] = (value, where)


def _named_in_layer(layer: str, raw: dict[str, Any],
                    base: Path | None) -> dict[str, dict[str, tuple[Any, str]]]:
    """Take the named-peer entries out of one layer's values (``raw`` keeps the rest)."""
    from ..agent.peerspec import split_named  # the agent package is imported lazily

    table = settings()
    out: dict[str, dict[str, tuple[Any, str]]] = {}
    if "peers" in raw:
        out = _peer_tables(raw.pop("peers"), base, layer)
    for key, field_ in NAMED_KEYS.items():
        if key not in raw:
            continue
        s = table[key]
        where = s.env if layer == "env" else "/".join(s.flags) if layer == "flags" else layer
        unnamed = []
        for entry in _entries(key, raw[key], layer):
            name, value = split_named(entry) if isinstance(entry, str) else (None, entry)
            if name is None:
                unnamed.append(entry)
                continue
            try:
                parsed = _named_value(field_, name, value, base)
            except (ValueError, UnitError, QuelayError) as exc:
                shown = "" if key == "trust" else f"{_show(value)}: "
                raise ConfigError(key, f"peer {name}: {shown}{exc}", where) from exc
            _add(out.setdefault(name, {}), field_, parsed, where, name, key)
        if not unnamed:
            del raw[key]  # only named entries: the unnamed value of a lower layer stays
        elif key == "trust":
            raw[key] = unnamed
        elif len(unnamed) > 1:
            raise ConfigError(key, f"{len(unnamed)} unnamed values: give one, or name each "
                              f"peer ({key} NAME=VALUE)", where)
        else:
            raw[key] = unnamed[0]
    return out


def _peer_tables(value: Any, base: Path | None,
                 where: str) -> dict[str, dict[str, tuple[Any, str]]]:
    """``[[peers]]`` tables -> {name: {field: (value, where)}}; errors name the entry."""
    from ..agent.peerspec import peer_name_problem

    if not isinstance(value, list):
        raise ConfigError("peers", "expected [[peers]] tables (name, trust, address, rate)",
                          where or None)
    out: dict[str, dict[str, tuple[Any, str]]] = {}
    for number, entry in enumerate(value, 1):
        label = f"[[peers]] entry {number}"
        if not isinstance(entry, dict):
            raise ConfigError("peers", f"{label}: expected a table (name, trust, address, "
                              f"rate), got {_show(entry)}", where or None)
        for key in entry:
            if key not in PEER_TABLE_KEYS:
                close = difflib.get_close_matches(str(key), PEER_TABLE_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError("peers", f"{label}: unknown key {key!r}{hint}", where or None)
        name = entry.get("name")
        problem = peer_name_problem(name)
        if problem is not None:
            raise ConfigError("peers", f"{label}: name {problem}", where or None)
        assert isinstance(name, str)
        if name in out:
            raise ConfigError("peers", f"peer {name} has two [[peers]] tables", where or None)
        fields: dict[str, tuple[Any, str]] = {}
        for key, field_ in (("trust", "trust"), ("address", "address"), ("rate", "rate")):
            if key not in entry:
                continue
            try:
                raw = _split_list(entry[key]) if key == "trust" else entry[key]
                fields[field_] = (_named_value(field_, name, raw, base), where)
            except (ValueError, UnitError, QuelayError) as exc:
                shown = "" if key == "trust" else f"{_show(entry[key])}: "
                raise ConfigError("peers", f"peer {name}: {key}: {shown}{exc}",
                                  where or None) from exc
        out[name] = fields
    return out


def _spec(name: str, fields: dict[str, tuple[Any, str]]) -> Any:
    """The PeerSpec for one named peer's merged fields."""
    from ..agent.peerspec import PeerSpec

    if set(fields) == {"rate"}:  # only a rate names it: a typo, or a single-peer agent
        raise ConfigError("rate", f"no peer named {name!r} is configured: name it with "
                          f"--trust {name}=PIN or a [[peers]] table", fields["rate"][1])
    try:
        return PeerSpec(name, trust=list(fields.get("trust", ([], ""))[0]),
                        address=fields.get("address", (None, ""))[0],
                        rate=fields.get("rate", (None, ""))[0])
    except ValueError as exc:
        raise ConfigError("peers", str(exc)) from exc


def _plain_peer(spec: Any) -> dict[str, Any]:
    """A PeerSpec as a ``[[peers]]`` table holds it (no address / rate: key left out)."""
    out: dict[str, Any] = {"name": spec.name, "trust": [str(t) for t in spec.trust]}
    if spec.address is not None:
        out["address"] = format_address(spec.address)
    if spec.rate is not None:
        out["rate"] = spec.rate
    return out


# -- layers ---------------------------------------------------------------------------


@dataclass
class Settings:
    """The effective settings: parsed values, where each came from, and the AgentConfig."""

    values: dict[str, Any]
    sources: dict[str, str]
    file: Path | None = None
    agent: Any = None  # quelay.agent.AgentConfig once resolved
    warnings: list[str] = field(default_factory=list)
    peer_sources: dict[str, str] = field(default_factory=dict)  # named peer -> its layers

    @property
    def log_level(self) -> str:
        return str(self.values["log_level"])

    @property
    def log_format(self) -> str:
        return str(self.values["log_format"])


def read_file(path: Path) -> dict[str, Any]:
    """The config file's keys, canonicalised; unknown keys and bad TOML raise ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path} is not UTF-8 text") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = _canonical(name)
        if key is None:
            raise ConfigError(name, f"unknown key{_did_you_mean(name)}", str(path))
        if isinstance(value, dict):
            hint = ("; a peer is an array entry: [[peers]] (two brackets), one per peer"
                    if key == "peers" else "")
            raise ConfigError(key, f"tables are not settings; keys go at the top level{hint}",
                              str(path))
        if key in out:
            raise ConfigError(key, "given twice (under two spellings)", str(path))
        out[key] = value
    return out


def read_env(env: Mapping[str, str]) -> dict[str, str]:
    """``QUELAY_<KEY>`` values for known keys; other QUELAY_* variables are ignored."""
    out = {}
    for s in settings().values():
        if s.env and s.env in env and env[s.env] != "":
            out[s.key] = env[s.env]
    return out


def load(
    file: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> Settings:
    """Merge the layers, parse and validate every value, and build the AgentConfig.

    ``flags`` maps keys (or aliases) to values given on the command line; a
    value of ``None`` means "not given". Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any], Path | None]] = []
    if file is not None:
        file = Path(file)
        layers.append((f"{file}", read_file(file), file.absolute().parent))
    env_values = read_env(env)
    layers.append(("env", env_values, None))
    flag_values: dict[str, Any] = {}
    for name, value in (flags or {}).items():
        if value is None or value == [] or value == ():
            continue
        key = _canonical(name)
        if key is None:
            raise ConfigError(name, "unknown option", "command line")
        flag_values[key] = value
    layers.append(("flags", flag_values, None))

    table = settings()
    values = {k: s.default for k, s in table.items()}
    sources = dict.fromkeys(table, "default")
    named: dict[str, dict[str, tuple[Any, str]]] = {}  # peer -> field -> (value, where)
    rank: dict[str, int] = {}  # where -> its layer (to list a peer's sources in order)
    for number, (layer, raw, base) in enumerate(layers):
        raw = dict(raw)
        for name, fields in _named_in_layer(layer, raw, base).items():
            named.setdefault(name, {}).update(fields)  # a higher layer replaces a field
            rank.update({where: number for _, where in fields.values()})
        for key, value in raw.items():
            s = table[key]
            if layer == "env":
                where = s.env
            elif layer == "flags":
                where = "/".join(s.flags)
            else:
                where = layer
            try:
                values[key] = parse_value(s, value, base)
            except (ValueError, UnitError, QuelayError) as exc:
                # Trust errors name the bad entry themselves; others get the value shown.
                shown = "" if s.kind == "trust" else f"{_show(value)}: "
                raise ConfigError(key, f"{shown}{exc}", where) from exc
            sources[key] = where
    if named:
        values["peers"] = [_spec(name, fields) for name, fields in named.items()]
        wheres = [where for fields in named.values() for _, where in fields.values()]
        sources["peers"] = ", ".join(dict.fromkeys(wheres))
    result = Settings(values, sources, file)
    result.peer_sources = {
        name: ", ".join(sorted(dict.fromkeys(w for _, w in fields.values()), key=lambda w: rank[w]))
        for name, fields in named.items()}
    _derive(result)
    result.agent = _agent_config(result)
    if check_paths:
        check_paths_usable(result)
    if not values.get("trust") and not values.get("peers"):
        result.warnings.append("no trust given; every peer will be refused")
    return result


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _derive(result: Settings) -> None:
    """Defaults that depend on other settings: state_dir, then inbox and control."""
    values, sources = result.values, result.sources
    if values.get("state_dir") is None:
        values["state_dir"] = default_state_dir()
    state = Path(values["state_dir"])
    if values.get("inbox") is None:
        values["inbox"] = state / "inbox"
    if values.get("control") is None:
        values["control"] = state / "control.sock"
    for key in ("inbox", "control"):
        if sources[key] == "default":
            sources[key] = "default (under state_dir)"


def _agent_config(result: Settings) -> Any:
    from ..agent import AgentConfig

    values = result.values
    if values.get("listen") is None and values.get("peer") is None \
            and values.get("rendezvous") is None and not values.get("peers"):
        raise ConfigError("listen/peer", "give one of listen = \"HOST:PORT\" (accept the peer) "
                                         "or peer = \"HOST:PORT\" (dial it) "
                                         "or rendezvous = \"HOST:PORT\" (meet at a relay)")
    if values.get("listen") is not None and values.get("peer") is not None:
        raise ConfigError("listen/peer", "give only one of listen (from "
                          f"{result.sources['listen']}) and peer (from {result.sources['peer']})")
    names = {f.name for f in dataclasses.fields(AgentConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    try:
        return AgentConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("config", str(exc)) from exc


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_dir(result: Settings, key: str, *, need_read: bool) -> None:
    """The directory ``key`` names exists and is usable, or can be created."""
    path = Path(result.values[key]).absolute()
    source = result.sources[key]
    if path.exists():
        if not path.is_dir():
            raise ConfigError(key, f"{path} exists and is not a directory", source)
        mode = os.W_OK | os.X_OK | (os.R_OK if need_read else 0)
        if not os.access(path, mode):
            raise ConfigError(key, f"{path} is not {'readable and ' if need_read else ''}"
                              f"writable by this user (uid {os.getuid()})", source)
        return
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise ConfigError(key, f"{path} cannot be created: {parent} is not a directory", source)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path} cannot be created: {parent} is not writable by this "
                          f"user (uid {os.getuid()})", source)


def check_paths_usable(result: Settings) -> None:
    """Fail early on directories the agent could not use (without creating anything)."""
    _check_dir(result, "state_dir", need_read=True)
    _check_dir(result, "inbox", need_read=True)
    control = Path(result.values["control"]).absolute()
    if control.exists() and not control.is_socket():
        raise ConfigError("control", f"{control} exists and is not a socket",
                          result.sources["control"])
    parent = _nearest_existing(control.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("control", f"cannot create a socket under {parent}",
                          result.sources["control"])


# -- output ---------------------------------------------------------------------------


def plain_value(s: Setting, value: Any) -> Any:
    """A value as TOML / JSON can hold it (paths and addresses as strings)."""
    if value is None:
        return None
    if s.kind == "path":
        return str(value)
    if s.kind == "address":
        return format_address(value)
    if s.kind == "peers":
        return [_plain_peer(spec) for spec in value]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return value


def to_dict(result: Settings) -> dict[str, Any]:
    """``{key: {"value": ..., "source": ...}}`` for ``quelay config check --json``."""
    table = settings()
    return {k: {"value": plain_value(table[k], v), "source": result.sources[k]}
            for k, v in result.values.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    import json

    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def to_toml(result: Settings) -> str:
    """The effective settings as a TOML file that loads back to the same values."""
    table = settings()
    lines = []
    tables: list[str] = []  # [[peers]] go last: a key after a table header belongs to it
    for key, value in result.values.items():
        s = table[key]
        note = result.sources[key]
        if s.kind == "peers":
            tables.extend(_peer_blocks(value, result.peer_sources))
            continue
        if s.kind == "size" and value is not None:
            note = f"{format_size(value)}, {note}"
        elif s.kind == "rate" and value is not None:
            note = f"{format_rate(value)}, {note}"
        plain = plain_value(s, value)
        if plain is None:
            lines.append(f"# {key} is not set")
        else:
            lines.append(f"{key} = {_toml_value(plain)}  # {note}")
    return "\n".join(lines + tables) + "\n"


def _peer_blocks(peers: list[Any], sources: dict[str, str]) -> list[str]:
    """Named peers as ``[[peers]]`` tables (a comment when there are none)."""
    if not peers:
        return ["# peers: none (one unnamed peer: trust, listen/peer)"]
    lines = []
    for spec in peers:
        lines += ["", f"[[peers]]  # {sources.get(spec.name, 'default')}"]
        for key, value in _plain_peer(spec).items():
            rate = f"  # {format_rate(value)}" if key == "rate" else ""
            lines.append(f"{key} = {_toml_value(value)}{rate}")
    return lines
