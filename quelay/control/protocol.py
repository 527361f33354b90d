"""The local control protocol: request validation and stable error codes.

See docs/control-protocol.md for the normative description. Everything a
client sends is untrusted; ``*_untrusted`` helpers raise only
:class:`ControlError`, which becomes an error reply, never a crash.
"""

from __future__ import annotations

from typing import Any

from ..errors import RemoteProtocolError

MAX_CONTROL_FRAME = 64 * 1024

# Stable error codes (documented; clients may switch on them).
BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
INVALID_ARGUMENT = "invalid_argument"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
IO_ERROR = "io_error"
LINK_DOWN = "link_down"
UNKNOWN_PEER = "unknown_peer"  # ``to`` / ``from`` / ``peer`` names no configured peer
PEER_REQUIRED = "peer_required"  # several peers, and the request did not say which
INTERNAL = "internal"


class ControlError(RemoteProtocolError):
    """A local client sent something we refuse: the client's fault, answered with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def reply(self, request_id: Any) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message}
        return {"id": request_id, "ok": False, "error": error}


def ok(request_id: Any, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def parse_request_untrusted(body: Any) -> tuple[Any, str, dict[str, Any]]:
    """Split a request into (id, op, args) or raise ControlError(bad_request)."""
    if not isinstance(body, dict):
        raise ControlError(BAD_REQUEST, "a request must be a map")
    request_id = body.get("id")
    if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
        raise ControlError(BAD_REQUEST, "a request needs an 'id' (integer or string)")
    op = body.get("op")
    if not isinstance(op, str):
        raise ControlError(BAD_REQUEST, "a request needs an 'op' string")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ControlError(INVALID_ARGUMENT, "'args' must be a map")
    return request_id, op, args


def arg_str(args: dict[str, Any], key: str, default: str | None = None,
            *, limit: int = 4096) -> str | None:
    value = args.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ControlError(INVALID_ARGUMENT, f"argument {key!r} must be a string")
    return value


def arg_required_str(args: dict[str, Any], key: str) -> str:
    value = arg_str(args, key)
    if value is None:
        raise ControlError(INVALID_ARGUMENT, f"argument {key!r} is required")
    return value


def arg_int(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ControlError(INVALID_ARGUMENT, f"argument {key!r} must be an integer in {lo}..{hi}")
    return value


def arg_attrs(args: dict[str, Any]) -> dict[str, str]:
    value = args.get("attrs", {}) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ControlError(INVALID_ARGUMENT, "argument 'attrs' must map strings to strings")
    if len(value) > 64:
        raise ControlError(INVALID_ARGUMENT, "argument 'attrs' has more than 64 entries")
    return dict(value)
