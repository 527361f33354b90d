"""One vocabulary: link states and transfer failure codes.

The string values are what travels on the wire (``error.code``), in the
control protocol (``transfer.error.code``, ``link.state``) and in the docs; the
enums exist so the code can't misspell them. Values never change once
published: clients switch on them.
"""

from __future__ import annotations

from enum import StrEnum


class LinkState(StrEnum):
    CONNECTING = "connecting"  # dialling or handshaking; no session yet
    UP = "up"  # a session is established
    DOWN = "down"  # the last session ended; redialling (dialler) or waiting (listener)


class Failure(StrEnum):
    """Why a transfer ended without being done (``canceled`` included)."""

    CANCELED = "canceled"  # a local client or the peer canceled it
    PROTOCOL_ERROR = "protocol_error"  # the peer broke the protocol for this transfer
    BAD_OPEN = "bad_open"  # the open was malformed (missing size, bad attrs, ...)
    UNSAFE_NAME = "unsafe_name"  # the receiver refused the file name
    DUPLICATE = "duplicate"  # a transfer with this id exists
    FINISHED = "finished"  # the other side already finished it
    UNKNOWN_TRANSFER = "unknown_transfer"  # the other side has no record of it
    IO_ERROR = "io_error"  # a local read or write failed
    SOURCE_CHANGED = "source_changed"  # the file being sent changed on disk
    NO_SPACE = "no_space"  # the receiver's inbox stayed full past stall_timeout
    INBOX_UNAVAILABLE = "inbox_unavailable"  # the inbox stayed unusable past stall_timeout
    PEER_RESTARTED = "peer_restarted"  # the peer restarted; in-memory state is gone
    READER_GONE = "reader_gone"  # the local reader of a stream disconnected
    READER_STALLED = "reader_stalled"  # the local reader stopped reading
    SENDER_GONE = "sender_gone"  # the sender never came back for this incoming transfer
    VERSION = "version"  # session-level: unsupported protocol version
    NOT_FOUND = "not_found"  # a fetched name is not in the peer's export
    REFUSED = "refused"  # the peer refused a fetch (outside the export, not a regular file)
    PEER_ERROR = "peer_error"  # the peer reported a failure code we do not know
    UNKNOWN_PEER = "unknown_peer"  # its link is no longer configured (after a restart)
    INTERNAL = "internal"  # a bug in quelay, contained to this one transfer (please report)


#: Failure codes a peer may report for one transfer; anything else is mapped to
#: ``peer_error`` so a hostile peer can't inject arbitrary codes into clients.
PEER_REPORTABLE = frozenset(Failure) - {Failure.VERSION, Failure.UNKNOWN_PEER}


def failure_from_peer(code: str) -> Failure:
    try:
        failure = Failure(code)
    except ValueError:
        return Failure.PEER_ERROR
    return failure if failure in PEER_REPORTABLE else Failure.PEER_ERROR


#: Why an incoming file is stalled (shown in ``ls``/``watch``/events).
class StallReason(StrEnum):
    NO_SPACE = "no_space"
    INBOX_UNAVAILABLE = "inbox_unavailable"
