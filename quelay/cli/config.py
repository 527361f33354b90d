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
    "peer": "Dial the peer at HOST:PORT (UDP).",
    "rendezvous": "Meet the peer through the rendezvous relay at HOST:PORT (instead of "
                  "listen/peer; see docs/rendezvous.md).",
    "session": "Rendezvous session name (the same on both agents).",
    "rendezvous_secret_file": "File holding the rendezvous shared secret.",
    "rendezvous_direct": "Try a direct path through the NATs (true) or always use the "
                         "relay (false).",
    "metrics": "Serve Prometheus metrics on HOST:PORT (TCP, GET /metrics); off by default.",
    "resumption": "Resume the TLS session on reconnects (true, default) or always run a full "
                  "handshake (false); identities are proven either way.",
    "trust": "Pinned peer: sha256:<hex> or a certificate file (repeatable).",
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
    "idle_timeout": "Seconds of silence before the link is declared lost.",
    "handshake_timeout": "Seconds a connection attempt may take.",
    "reconnect_interval": "Seconds between reconnect attempts.",
    "congestion": "Congestion control: allotted (default), cubic or reno.",
    "progress_interval": "Seconds between progress events.",
    "rate": "Wire rate cap in bits/s, e.g. 2Mbps (0 = uncapped).",
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
        return ENV_PREFIX + self.key.upper()

    @property
    def flags(self) -> tuple[str, ...]:
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
    return value  # "raw": an AgentConfig field of a type this module does not know


# -- layers ---------------------------------------------------------------------------


@dataclass
class Settings:
    """The effective settings: parsed values, where each came from, and the AgentConfig."""

    values: dict[str, Any]
    sources: dict[str, str]
    file: Path | None = None
    agent: Any = None  # quelay.agent.AgentConfig once resolved
    warnings: list[str] = field(default_factory=list)

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
            raise ConfigError(key, "tables are not settings; keys go at the top level",
                              str(path))
        if key in out:
            raise ConfigError(key, "given twice (under two spellings)", str(path))
        out[key] = value
    return out


def read_env(env: Mapping[str, str]) -> dict[str, str]:
    """``QUELAY_<KEY>`` values for known keys; other QUELAY_* variables are ignored."""
    out = {}
    for s in settings().values():
        if s.env in env and env[s.env] != "":
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
    for layer, raw, base in layers:
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
    result = Settings(values, sources, file)
    _derive(result)
    result.agent = _agent_config(result)
    if check_paths:
        check_paths_usable(result)
    if not values.get("trust"):
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
            and values.get("rendezvous") is None:
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
    for key, value in result.values.items():
        s = table[key]
        note = result.sources[key]
        if s.kind == "size" and value is not None:
            note = f"{format_size(value)}, {note}"
        elif s.kind == "rate" and value is not None:
            note = f"{format_rate(value)}, {note}"
        plain = plain_value(s, value)
        if plain is None:
            lines.append(f"# {key} is not set")
        else:
            lines.append(f"{key} = {_toml_value(plain)}  # {note}")
    return "\n".join(lines) + "\n"
