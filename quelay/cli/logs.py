"""Logging for the agent: human lines by default, one JSON object per line on request.

``setup_logging("info", "human")`` prints::

    2025-01-31 12:00:00.123 INFO  quelay.agent: site-a: link up

``setup_logging("info", "json")`` prints one object per line::

    {"time": "2025-01-31T12:00:00.123Z", "level": "info", "logger": "quelay.agent",
     "message": "site-a: link up", "event": "link.up", "agent": "site-a"}

Fields beyond ``time``/``level``/``logger``/``message`` are what the caller
passed with ``extra={...}``: the agent logs every significant event with its
fields (``event``, ``agent``, ``transfer``, ``state``, ``code``, ``reason``...),
so nothing is parsed back out of message text. Only a record that carries no
``event`` (a library's, or a call site not converted yet) gets what
:func:`enrich` recognises in its text, as a fallback. Errors add ``exc`` (the
traceback, still on one line).

Nothing secret reaches a log line: a :class:`RedactFilter` on the handler
replaces ``bytes`` arguments (file or stream contents) by their length and
cuts out PEM blocks and anything that looks like a private key.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

FORMATS = ("human", "json")

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}

# Keys the formatter writes itself; an ``extra`` field never replaces them.
_RESERVED_OUT = frozenset({"time", "level", "logger", "message", "exc"})

_PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|$)", re.DOTALL)
_KEYISH_RE = re.compile(r"(?i)(private[_ ]key|secret)(\s*[=:]\s*)(\S+)")

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# What the agent's messages say, turned into fields (best effort: a message
# that does not match simply carries no extra fields). ``None`` as the event
# means "transfer.<state>" / "link.<state>" from the match.
_PATTERNS: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(rf"^transfer (?P<transfer>{_UUID}) started: (?P<kind>\w+) (?P<direction>\w+) "
                r"(?P<name>.*), priority (?P<priority>\d+)$", re.DOTALL), "transfer.started"),
    (re.compile(rf"^transfer (?P<transfer>{_UUID}) done: (?P<name>.*), (?P<bytes>\d+) bytes, "
                r"sha256 (?P<sha256>\w+)$", re.DOTALL), "transfer.done"),
    (re.compile(rf"^transfer (?P<transfer>{_UUID}) (?P<state>failed|canceled): "
                r"(?P<code>\w+): (?P<reason>.*)$", re.DOTALL), None),
    (re.compile(r"^(?P<agent>.*?): link (?P<state>connecting|up|down)(?:: (?P<reason>.*))?$",
                re.DOTALL), None),
    (re.compile(r"^(?P<agent>.*?): connection with (?P<peer>\S+) ended: (?P<reason>.*)$",
                re.DOTALL), "connection.ended"),
    (re.compile(r"^(?P<agent>.*?): shutting down: (?P<reason>.*)$", re.DOTALL), "shutdown"),
    (re.compile(r"^(?P<agent>.*?): refusing peer (?P<peer>\S+): (?P<reason>.*)$", re.DOTALL),
     "peer.refused"),
    (re.compile(r"^(?P<agent>.*?): rate cap (?P<rate>.*)$"), "rate"),
]
_INT_FIELDS = frozenset({"bytes", "priority"})


def enrich(message: str) -> dict[str, Any]:
    """Fields for the agent's significant events, recognised from its message text."""
    for pattern, event in _PATTERNS:
        m = pattern.match(message)
        if m is None:
            continue
        fields: dict[str, Any] = {k: v for k, v in m.groupdict().items() if v is not None}
        for key in _INT_FIELDS & fields.keys():
            fields[key] = int(fields[key])
        if event is None:
            event = ("link." if "agent" in fields else "transfer.") + fields["state"]
        if "name" in fields and fields["name"][:1] in "'\"" and len(fields["name"]) >= 2:
            fields["name"] = fields["name"][1:-1]  # logged with %r
        return {"event": event, **fields}
    return {}


def _redact_text(text: str) -> str:
    text = _PEM_RE.sub("[redacted PEM block]", text)
    return _KEYISH_RE.sub(r"\1\2[redacted]", text)


def _redact_arg(arg: Any) -> Any:
    if isinstance(arg, bytes | bytearray | memoryview):
        return f"<{len(arg)} bytes>"
    if isinstance(arg, str) and ("-----BEGIN" in arg or "private" in arg.lower()):
        return _redact_text(arg)
    return arg


class RedactFilter(logging.Filter):
    """Keep contents and key material out of logs, whoever logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        if isinstance(record.msg, bytes | bytearray | memoryview):
            record.msg = f"<{len(record.msg)} bytes>"
        elif isinstance(record.msg, str) and "-----BEGIN" in record.msg:
            record.msg = _redact_text(record.msg)
        return True


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with ``extra=``, redacted (bytes become their length,
    PEM blocks and key-looking values are cut out); nested values are kept as JSON."""
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_") or key in _RESERVED_OUT:
            continue
        out[key] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return _redact_arg(value)


def _timestamp(created: float, *, iso: bool) -> str:
    ms = int(created * 1000) % 1000
    if iso:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f".{ms:03d}"


class HumanFormatter(logging.Formatter):
    """``2025-01-31 12:00:00.123 INFO  quelay.agent: message``; tracebacks follow."""

    def format(self, record: logging.LogRecord) -> str:
        message = _redact_text(record.getMessage())
        line = (f"{_timestamp(record.created, iso=False)} {record.levelname:<5} "
                f"{record.name}: {message}")
        if record.exc_info:
            line += "\n" + _redact_text(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (newlines inside values are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        message = _redact_text(record.getMessage())
        out: dict[str, Any] = {
            "time": _timestamp(record.created, iso=True),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        fields = record_fields(record)
        if "event" not in fields:
            # A message logged without fields (older call sites, other libraries): what
            # can be recognised in its text, as a fallback only.
            fields = {**enrich(message), **fields}
        out.update(fields)
        if record.exc_info:
            out["exc"] = _redact_text(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


_HANDLER_ATTR = "_quelay_handler"


def setup_logging(level: str = "info", fmt: str = "human",
                  stream: TextIO | None = None) -> logging.Handler:
    """Install quelay's handler on the root logger (replacing one installed before).

    ``level`` is a name (``debug`` .. ``critical``), ``fmt`` is ``human`` or
    ``json``. aioquic's own logger stays at WARNING unless ``level`` is debug.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error, "
                         "critical")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_ATTR, False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_ATTR, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("quic").setLevel(logging.DEBUG if numeric <= logging.DEBUG
                                       else logging.WARNING)
    return handler
