"""Length-prefixed msgpack frames, shared by the wire and control protocols.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
one msgpack value. The decoder is sans-IO: feed it bytes, pull frames out. It
never buffers more than one maximal frame plus one read, so a hostile sender
cannot grow our memory.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import FrameTooLarge, RemoteProtocolError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024


def encode_frame(value: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one value as a frame; refuses to produce an oversized frame."""
    body = msgpack.packb(value, use_bin_type=True)
    if len(body) > max_frame:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


def unpack_untrusted(body: bytes) -> Any:
    """Decode one msgpack value from untrusted bytes, or raise RemoteProtocolError."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=len(body),
            max_bin_len=len(body),
            max_array_len=len(body),
            max_map_len=len(body),
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise RemoteProtocolError(f"malformed msgpack frame: {exc}") from exc


class _NilFrame:
    """A frame whose body is msgpack ``nil``: distinct from "no complete frame yet"."""

    def __repr__(self) -> str:
        return "NIL_FRAME"


NIL_FRAME: Any = _NilFrame()


class FrameDecoder:
    """Splits a byte stream into frames, enforcing ``max_frame``."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        """Hand back bytes that follow the last frame (used when switching to raw mode)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_frame_untrusted(self) -> Any | None:
        """Return the next decoded frame, ``None`` if incomplete; raise on violations.

        A frame holding msgpack ``nil`` comes back as :data:`NIL_FRAME`, so a
        caller can answer it instead of waiting for more bytes.
        """
        if len(self._buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf)
        if length > self.max_frame:
            raise FrameTooLarge(
                f"frame announces {length} bytes, above the {self.max_frame}-byte limit"
            )
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        value = unpack_untrusted(body)
        return NIL_FRAME if value is None else value
