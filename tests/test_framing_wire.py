"""Sans-IO frame decoding and wire-message validation on hostile input."""

from __future__ import annotations

import contextlib
import struct
import uuid

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quelay.core import messages as wire
from quelay.errors import FrameTooLarge, RemoteProtocolError
from quelay.framing import FrameDecoder, encode_frame

TID = str(uuid.uuid4())


def test_frames_split_across_feeds() -> None:
    data = encode_frame({"a": 1}) + encode_frame([1, 2, 3])
    dec = FrameDecoder()
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
    assert dec.next_frame_untrusted() == {"a": 1}
    assert dec.next_frame_untrusted() == [1, 2, 3]
    assert dec.next_frame_untrusted() is None


def test_oversized_frame_is_refused_before_buffering() -> None:
    dec = FrameDecoder(max_frame=100)
    dec.feed(struct.pack(">I", 101))
    with pytest.raises(FrameTooLarge):
        dec.next_frame_untrusted()


def test_encoder_refuses_oversized() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"x" * 200, max_frame=100)


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_protocol_errors(body: bytes) -> None:
    dec = FrameDecoder(max_frame=1000)
    dec.feed(struct.pack(">I", len(body)) + body)
    with contextlib.suppress(RemoteProtocolError):
        wire.decode_message_untrusted(dec.next_frame_untrusted())


def roundtrip(msg: wire.Message) -> wire.Message:
    body = msgpack.unpackb(msgpack.packb(wire.encode_message(msg)))
    return wire.decode_message_untrusted(body)


@pytest.mark.parametrize(
    "msg",
    [
        wire.Hello(1, "sha256:" + "a" * 64, 7, "x"),
        wire.Open(TID, "file", 10, 4, "f.bin", {"k": "v"}),
        wire.Open(TID, "stream", None, 15, "s", {}),
        wire.Ack(TID, 5, True),
        wire.Finish(TID, 5, b"\x00" * 32),
        wire.Cancel(TID, "why"),
        wire.Error(None, "code", "msg"),
        wire.Error(TID, "code", "msg"),
        wire.DataHeader(TID, 0),
    ],
)
def test_messages_roundtrip(msg: wire.Message) -> None:
    assert roundtrip(msg) == msg


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"t": "nope"},
        {"t": "open", "id": "not-a-uuid", "kind": "file", "size": 1, "priority": 1, "name": "x"},
        {"t": "open", "id": TID, "kind": "folder", "size": 1, "priority": 1, "name": "x"},
        {"t": "open", "id": TID, "kind": "file", "size": -1, "priority": 1, "name": "x"},
        {"t": "open", "id": TID, "kind": "file", "size": 1, "priority": 99, "name": "x"},
        {"t": "open", "id": TID, "kind": "file", "size": 1, "priority": 1, "name": 5},
        {"t": "open", "id": TID, "kind": "file", "size": 1, "priority": 1, "name": "x",
         "attrs": {"k": 1}},
        {"t": "ack", "id": TID, "offset": True},
        {"t": "ack", "id": TID, "offset": 1, "final": "yes"},
        {"t": "finish", "id": TID, "total": 1, "sha256": b"short"},
        {"t": "hello", "version": 1, "agent": 3, "epoch": 1},
    ],
)
def test_invalid_messages_are_remote_errors(body: object) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode_message_untrusted(body)
