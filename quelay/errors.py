"""Error types shared across quelay: one root, :class:`QuelayError`.

Errors are split by whose fault they are, so callers can decide what to tear
down: a :class:`RemoteProtocolError` is the peer's (or a client's) fault and
costs only that transfer, session or client connection; a
:class:`LocalProtocolError` is a bug or misuse on our side.
"""

from __future__ import annotations


class QuelayError(Exception):
    """Base class for every error quelay raises on purpose."""

    code = "internal"


class ProtocolError(QuelayError):
    """Bytes or messages violated a protocol."""

    code = "protocol_error"


class RemoteProtocolError(ProtocolError):
    """The other side (peer agent or local client) sent something invalid."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix announced a frame above the agreed limit."""

    code = "frame_too_large"
