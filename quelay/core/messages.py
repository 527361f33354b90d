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

from ..errors import RemoteProtocolError


class TransferProtocolError(RemoteProtocolError):
    """A peer message that names a transfer was invalid: it costs that transfer only."""

    def __init__(self, transfer_id: str, message: str) -> None:
        super().__init__(message)
        self.transfer_id = transfer_id

PROTOCOL_VERSION = 1
ALPN = "quelay/1"
MAX_WIRE_FRAME = 64 * 1024
MAX_NAME_BYTES = 1024
MAX_ATTRS = 64
MAX_ATTR_BYTES = 4096  # one entry: key + value, UTF-8 bytes
MAX_ATTRS_TOTAL = 16 * 1024  # all entries together, so an open always fits in a frame
MAX_PROOF_BYTES = 256  # an ECDSA signature (P-521: 139 bytes DER)
PRIORITY_RANGE = range(0, 16)

Kind = Literal["file", "stream", "dir"]


@dataclass(frozen=True)
class Hello:
    """First message each way: who we are and which boot of us this is."""

    version: int
    agent: str
    epoch: int
    name: str = ""
    # On a resumed TLS session (no certificates exchanged): the agent's signature over
    # the connection's TLS binding (quelay.identity.sign_binding). Absent otherwise.
    proof: bytes | None = None


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
    offset: int = 0  # bytes the sender already had acknowledged (0 = nothing delivered yet)
    ttl: int | None = None  # seconds the received file may stay in the inbox (None: no limit)
    group: str | None = None  # a file of a directory transfer: the directory's transfer id
    mode: int | None = None  # a file of a directory transfer: its permission bits
    count: int | None = None  # a directory: how many files it holds
    dirs: list[str] = field(default_factory=list)  # a directory: its empty subdirectories


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


@dataclass(frozen=True)
class Fetch:
    """Pull: please send me ``name`` from your export ``export`` as transfer ``id``."""

    id: str
    export: str
    name: str
    priority: int


@dataclass(frozen=True)
class ListExports:
    """Ask for one page of the peer's exported files (``rid`` matches the answer)."""

    rid: int
    cursor: int = 0


@dataclass(frozen=True)
class Exports:
    """One page of exported files: maps with ``export``, ``name``, ``size``, ``mtime``."""

    rid: int
    entries: list[dict[str, Any]]
    next: int | None = None
    error: str | None = None  # why the listing failed (nothing exported, ...)


Message = (Hello | Open | Resume | Ack | Finish | Cancel | Error | DataHeader | Fetch
           | ListExports | Exports)

_TYPES: dict[str, type] = {
    "hello": Hello,
    "open": Open,
    "resume": Resume,
    "ack": Ack,
    "finish": Finish,
    "cancel": Cancel,
    "error": Error,
    "data": DataHeader,
    "fetch": Fetch,
    "list_exports": ListExports,
    "exports": Exports,
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
    problem = attrs_problem(value)
    if problem is not None:
        raise RemoteProtocolError(f"field 'attrs': {problem}")
    return dict(value)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def attrs_problem(value: object) -> str | None:
    """Why ``value`` is not acceptable as a transfer's attributes, or None.

    One rule for both boundaries: the control server applies it to a local
    client's request, the session to the peer's ``open``, so nothing a client
    may submit can be refused by the peer later.
    """
    if not isinstance(value, dict):
        return "must be a map of strings to strings"
    if len(value) > MAX_ATTRS:
        return f"has more than {MAX_ATTRS} entries"
    total = 0
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            return "keys and values must be strings"
        if "\x00" in k or "\x00" in v:
            return "keys and values must not contain NUL"
        size = _utf8_len(k) + _utf8_len(v)
        if size > MAX_ATTR_BYTES:
            return f"entry {k[:40]!r} is {size} bytes (at most {MAX_ATTR_BYTES} per key + value)"
        total += size
    if total > MAX_ATTRS_TOTAL:
        return f"{total} bytes in all (at most {MAX_ATTRS_TOTAL})"
    return None


def name_problem(value: object) -> str | None:
    """Why ``value`` is not acceptable as a transfer's name (both boundaries), or None."""
    if not isinstance(value, str):
        return "must be a string"
    if _utf8_len(value) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if "\x00" in value:
        return "must not contain NUL"
    return None


MAX_PATH_BYTES = 4096  # a relative path inside an export
MAX_EXPORT_ENTRIES = 500  # per exports page (keeps the frame far below its limit)


MAX_GROUP_DIRS = 1000  # empty subdirectories one directory transfer may carry


def _mode(body: dict[str, Any]) -> int | None:
    mode = _uint(body, "mode", optional=True)
    if mode is not None and mode > 0o7777:
        raise RemoteProtocolError("field 'mode' must be permission bits (at most 0o7777)")
    return mode


def _dirs(body: dict[str, Any]) -> list[str]:
    value = body.get("dirs", [])
    if not isinstance(value, list) or len(value) > MAX_GROUP_DIRS:
        raise RemoteProtocolError(f"field 'dirs' must be a list of at most {MAX_GROUP_DIRS} paths")
    out = []
    for entry in value:
        if not isinstance(entry, str) or _utf8_len(entry) > MAX_PATH_BYTES:
            raise RemoteProtocolError("field 'dirs' holds relative paths (strings)")
        out.append(entry)
    return out


def _decode_listing(kind: str, body: dict[str, Any]) -> Message:
    rid = _uint(body, "rid")
    assert rid is not None
    if kind == "list_exports":
        return ListExports(rid, _uint(body, "cursor", optional=True) or 0)
    entries = body.get("entries")
    if not isinstance(entries, list) or len(entries) > MAX_EXPORT_ENTRIES:
        raise RemoteProtocolError(f"field 'entries' must be a list of at most "
                                  f"{MAX_EXPORT_ENTRIES} entries")
    clean = []
    for e in entries:
        if not isinstance(e, dict):
            raise RemoteProtocolError("an exports entry must be a map")
        size, mtime = e.get("size"), e.get("mtime")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RemoteProtocolError("an exports entry needs a size")
        if not isinstance(mtime, (int, float)) or isinstance(mtime, bool):
            raise RemoteProtocolError("an exports entry needs an mtime")
        clean.append({"export": _str(e, "export", 255), "name": _str(e, "name", MAX_PATH_BYTES),
                      "size": size, "mtime": float(mtime)})
    error = body.get("error")
    if error is not None and not isinstance(error, str):
        raise RemoteProtocolError("field 'error' must be a string")
    return Exports(rid, clean, _uint(body, "next", optional=True), error)


def decode_message_untrusted(body: Any) -> Message:
    """Validate a decoded frame from the peer and build the message it names."""
    if not isinstance(body, dict):
        raise RemoteProtocolError("a message must be a msgpack map")
    kind = body.get("t")
    if kind != "hello" and "id" in body and body.get("id") is not None:
        # Past this point a failure concerns one transfer: the session can name it.
        tid = _transfer_id(body)
        try:
            return _decode_body(kind, body, tid)
        except RemoteProtocolError as exc:
            raise TransferProtocolError(tid, str(exc)) from exc
    return _decode_body(kind, body, None)


def _decode_body(kind: Any, body: dict[str, Any], tid: Any) -> Message:
    if kind == "hello":
        version = _uint(body, "version")
        assert version is not None
        epoch = _uint(body, "epoch")
        assert epoch is not None
        proof = body.get("proof")
        if proof is not None and (not isinstance(proof, bytes) or len(proof) > MAX_PROOF_BYTES):
            raise RemoteProtocolError(
                f"field 'proof' must be bytes of at most {MAX_PROOF_BYTES} bytes")
        return Hello(version, _str(body, "agent", 128), epoch, _str(body, "name"), proof)
    if kind in ("list_exports", "exports"):
        return _decode_listing(kind, body)
    if tid is None and isinstance(kind, str) and kind in _TYPES and kind != "error":
        raise RemoteProtocolError("field 'id' must be a UUID")
    if kind == "open":
        tkind = body.get("kind")
        if tkind not in ("file", "stream", "dir"):
            raise RemoteProtocolError("field 'kind' must be 'file', 'stream' or 'dir'")
        priority = _uint(body, "priority")
        if priority is None or priority not in PRIORITY_RANGE:
            raise RemoteProtocolError("field 'priority' must be within 0..15")
        resume = body.get("resume", False)
        if not isinstance(resume, bool):
            raise RemoteProtocolError("field 'resume' must be a boolean")
        name = body.get("name")
        problem = name_problem(name)
        if problem is not None:
            raise RemoteProtocolError(f"field 'name' {problem}")
        assert isinstance(name, str)
        return Open(
            tid,
            tkind,
            _uint(body, "size", optional=True),
            priority,
            name,
            _attrs(body),
            resume,
            _uint(body, "offset", optional=True) or 0,
            _uint(body, "ttl", optional=True),
            None if body.get("group") is None else _transfer_id(body, "group"),
            _mode(body),
            _uint(body, "count", optional=True),
            _dirs(body),
        )
    if kind == "resume":
        offset = _uint(body, "offset")
        assert offset is not None
        return Resume(tid, offset)
    if kind == "ack":
        offset = _uint(body, "offset")
        assert offset is not None
        final = body.get("final", False)
        if not isinstance(final, bool):
            raise RemoteProtocolError("field 'final' must be a boolean")
        return Ack(tid, offset, final)
    if kind == "finish":
        total = _uint(body, "total")
        assert total is not None
        digest = body.get("sha256")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise RemoteProtocolError("field 'sha256' must be 32 bytes")
        return Finish(tid, total, digest)
    if kind == "cancel":
        return Cancel(tid, _str(body, "reason"))
    if kind == "error":
        return Error(tid, _str(body, "code", 64), _str(body, "message"))
    if kind == "data":
        offset = _uint(body, "offset")
        assert offset is not None
        return DataHeader(tid, offset)
    if kind == "fetch":
        priority = _uint(body, "priority")
        if priority is None or priority not in PRIORITY_RANGE:
            raise RemoteProtocolError("field 'priority' must be within 0..15")
        return Fetch(tid, _str(body, "export", 255), _str(body, "name", MAX_PATH_BYTES),
                     priority)
    raise RemoteProtocolError(f"unknown message type {kind!r}")
