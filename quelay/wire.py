"""Agent-to-agent messages (protocol ``quelay/1``), as frozen dataclasses.

Every message is a msgpack map with a ``t`` (type) key, carried in
length-prefixed frames (:mod:`quelay.framing`) on the session's control stream,
or as the single header frame that starts each transfer's data stream.
``decode_message_untrusted`` is the only way in from the network and raises
only :class:`~quelay.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import RemoteProtocolError

PROTOCOL_VERSION = 1
ALPN = "quelay/1"
MAX_WIRE_FRAME = 64 * 1024
MAX_NAME_BYTES = 1024
MAX_ATTRS = 64
MAX_ATTR_BYTES = 4096
PRIORITY_RANGE = range(0, 16)

Kind = Literal["file", "stream"]


@dataclass(frozen=True)
class Hello:
    """First message each way: who we are and which boot of us this is."""

    version: int
    agent: str
    epoch: int
    name: str = ""


@dataclass(frozen=True)
class Open:
    """Announces a transfer; its bytes follow on a data stream naming ``id``."""

    id: str
    kind: Kind
    size: int | None
    priority: int
    name: str
    attrs: dict[str, str] = field(default_factory=dict)
    resume: bool = False  # re-announced after a reconnect: answer with Resume


@dataclass(frozen=True)
class Resume:
    """Answer to a resumed Open: the receiver has delivered ``offset`` bytes; go on from there."""

    id: str
    offset: int


@dataclass(frozen=True)
class Ack:
    """Bytes up to ``offset`` are safe at the receiver; ``final`` = verified complete."""

    id: str
    offset: int
    final: bool = False


@dataclass(frozen=True)
class Finish:
    """The sender has sent everything: ``total`` bytes with this SHA-256."""

    id: str
    total: int
    sha256: bytes


@dataclass(frozen=True)
class Cancel:
    id: str
    reason: str


@dataclass(frozen=True)
class Error:
    """A failure report: for one transfer (``id``) or the whole session (``id`` None)."""

    id: str | None
    code: str
    message: str


@dataclass(frozen=True)
class DataHeader:
    """First frame of a data stream: which transfer, starting at which offset."""

    id: str
    offset: int


Message = Hello | Open | Resume | Ack | Finish | Cancel | Error | DataHeader

_TYPES: dict[str, type] = {
    "hello": Hello,
    "open": Open,
    "resume": Resume,
    "ack": Ack,
    "finish": Finish,
    "cancel": Cancel,
    "error": Error,
    "data": DataHeader,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode_message(msg: Message) -> dict[str, Any]:
    body = asdict(msg)
    body["t"] = _NAMES[type(msg)]
    return body


def new_transfer_id() -> str:
    return str(uuid.uuid4())


# -- validation of untrusted input -------------------------------------------


def _str(body: dict[str, Any], key: str, limit: int = MAX_NAME_BYTES) -> str:
    value = body.get(key)
    if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise RemoteProtocolError(f"field {key!r} must be a string of at most {limit} bytes")
    return value


def _uint(body: dict[str, Any], key: str, optional: bool = False) -> int | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise RemoteProtocolError(f"field {key!r} must be a non-negative 63-bit integer")
    return value


def _transfer_id(body: dict[str, Any], key: str = "id") -> str:
    value = _str(body, key, 64)
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise RemoteProtocolError(f"field {key!r} is not a UUID") from exc


def _attrs(body: dict[str, Any]) -> dict[str, str]:
    value = body.get("attrs", {})
    if not isinstance(value, dict) or len(value) > MAX_ATTRS:
        raise RemoteProtocolError(f"field 'attrs' must be a map of at most {MAX_ATTRS} entries")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise RemoteProtocolError("attrs keys and values must be strings")
        if len(k) + len(v) > MAX_ATTR_BYTES:
            raise RemoteProtocolError("an attrs entry is too long")
    return dict(value)


def decode_message_untrusted(body: Any) -> Message:
    """Validate a decoded frame from the peer and build the message it names."""
    if not isinstance(body, dict):
        raise RemoteProtocolError("a message must be a msgpack map")
    kind = body.get("t")
    if kind == "hello":
        version = _uint(body, "version")
        assert version is not None
        epoch = _uint(body, "epoch")
        assert epoch is not None
        return Hello(version, _str(body, "agent", 128), epoch, _str(body, "name"))
    if kind == "open":
        tkind = body.get("kind")
        if tkind not in ("file", "stream"):
            raise RemoteProtocolError("field 'kind' must be 'file' or 'stream'")
        priority = _uint(body, "priority")
        if priority is None or priority not in PRIORITY_RANGE:
            raise RemoteProtocolError("field 'priority' must be within 0..15")
        resume = body.get("resume", False)
        if not isinstance(resume, bool):
            raise RemoteProtocolError("field 'resume' must be a boolean")
        return Open(
            _transfer_id(body),
            tkind,
            _uint(body, "size", optional=True),
            priority,
            _str(body, "name"),
            _attrs(body),
            resume,
        )
    if kind == "resume":
        offset = _uint(body, "offset")
        assert offset is not None
        return Resume(_transfer_id(body), offset)
    if kind == "ack":
        offset = _uint(body, "offset")
        assert offset is not None
        final = body.get("final", False)
        if not isinstance(final, bool):
            raise RemoteProtocolError("field 'final' must be a boolean")
        return Ack(_transfer_id(body), offset, final)
    if kind == "finish":
        total = _uint(body, "total")
        assert total is not None
        digest = body.get("sha256")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise RemoteProtocolError("field 'sha256' must be 32 bytes")
        return Finish(_transfer_id(body), total, digest)
    if kind == "cancel":
        return Cancel(_transfer_id(body), _str(body, "reason"))
    if kind == "error":
        tid = None if body.get("id") is None else _transfer_id(body)
        return Error(tid, _str(body, "code", 64), _str(body, "message"))
    if kind == "data":
        offset = _uint(body, "offset")
        assert offset is not None
        return DataHeader(_transfer_id(body), offset)
    raise RemoteProtocolError(f"unknown message type {kind!r}")
