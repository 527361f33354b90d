"""Every parser of untrusted bytes, as a fuzz target: input strategy + the errors it may raise.

Shared by ``tests/test_fuzz.py`` (a bounded number of examples, in CI) and
``bench/fuzz.py`` (long runs, executions per second). A target passes an
input if it returns normally or raises one of its ``allowed`` errors (the
project's protocol / configuration errors); anything else — ``KeyError``,
``TypeError``, ``AssertionError``, a msgpack exception leaking through — is a
finding.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import strategies as st

from quelay.cli import config as cfgmod
from quelay.control import protocol as ctl
from quelay.core import messages as m
from quelay.core.names import safe_name_untrusted
from quelay.errors import RemoteProtocolError
from quelay.framing import HEADER, FrameDecoder, unpack_untrusted
from quelay.identity import IdentityError, parse_trust
from quelay.rendezvous import protocol as rv
from quelay.transport.path_memory import _valid_untrusted
from quelay.units import UnitError, parse_rate, parse_size


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], object]
    allowed: tuple[type[BaseException], ...]


# -- input shapes -----------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
            | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40))
# msgpack can carry only 64-bit integers; keep the values packable.
_packable_scalars = (st.none() | st.booleans()
                     | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                     | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40))
_values = st.recursive(_packable_scalars,
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                       max_leaves=12)

_WIRE_KEYS = ("t", "id", "version", "agent", "epoch", "name", "kind", "size", "priority",
              "attrs", "resume", "offset", "final", "total", "sha256", "reason", "code",
              "message")
_WIRE_TYPES = ("hello", "open", "resume", "ack", "finish", "cancel", "error", "data", "x")
_uuid = st.uuids().map(str)


def _near_valid_value(key: str) -> st.SearchStrategy[Any]:
    if key == "t":
        return st.sampled_from(_WIRE_TYPES) | _values
    if key == "id":
        return _uuid | _values
    if key in ("offset", "size", "total", "priority", "version", "epoch"):
        return st.integers(min_value=-1, max_value=2**64 - 1) | _values
    if key == "sha256":
        return st.binary(min_size=31, max_size=33) | _values
    if key == "attrs":
        return st.dictionaries(st.text(max_size=300), st.text(max_size=5000), max_size=70) \
            | _values
    if key == "kind":
        return st.sampled_from(("file", "stream")) | _values
    return _values


# Maps shaped like wire messages: the right keys, values near the valid ones.
wire_maps = st.dictionaries(st.sampled_from(_WIRE_KEYS), st.just(None), max_size=10).flatmap(
    lambda keys: st.fixed_dictionaries({k: _near_valid_value(k) for k in keys}))

_frame_bodies = st.one_of(
    st.binary(max_size=200),
    _values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    wire_maps.map(lambda v: msgpack.packb(v, use_bin_type=True)),
)


def _frames() -> st.SearchStrategy[bytes]:
    """A byte stream of frames: some well-formed, some lying about their length."""
    frame = st.one_of(
        _frame_bodies.map(lambda b: HEADER.pack(len(b)) + b),
        st.tuples(st.integers(0, 2**32 - 1), _frame_bodies).map(
            lambda t: HEADER.pack(t[0]) + t[1]),
        st.binary(max_size=64),
    )
    return st.lists(frame, max_size=6).map(b"".join)


def _chunked(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    return st.tuples(data, st.lists(st.integers(1, 64), max_size=8))


# One strategy object for every framed parser: tests/test_fuzz.py runs the targets that
# share a strategy on the same examples (drawing them is most of a fuzz run's cost).
_FRAME_STREAMS = _chunked(_frames())


# -- runners ----------------------------------------------------------------------------


def _feed_frames(max_frame: int, data_cuts: tuple[bytes, list[int]]) -> list[Any]:
    """Feed in arbitrary pieces, pull every frame; a FrameDecoder must stay bounded."""
    data, cuts = data_cuts
    decoder = FrameDecoder(max_frame)
    frames: list[Any] = []
    pos = 0
    pieces = []
    for cut in cuts:
        pieces.append(data[pos:pos + cut])
        pos += cut
    pieces.append(data[pos:])
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame_untrusted()) is not None:
            frames.append(frame)
        assert decoder.buffered < 4 + max_frame + len(piece) + 1
    return frames


def run_control_frames(data_cuts: tuple[bytes, list[int]]) -> None:
    """What a control client's bytes go through before a handler runs."""
    for frame in _feed_frames(ctl.MAX_CONTROL_FRAME, data_cuts):
        request_id, op, args = ctl.parse_request_untrusted(frame)
        assert isinstance(request_id, int | str) and isinstance(op, str)
        assert isinstance(args, dict)
        ctl.arg_str(args, "name")
        ctl.arg_int(args, "priority", 8, 0, 15)
        ctl.arg_attrs(args)


def run_wire_frames(data_cuts: tuple[bytes, list[int]]) -> None:
    """What the peer's control stream goes through: frames, then messages."""
    for frame in _feed_frames(m.MAX_WIRE_FRAME, data_cuts):
        m.decode_message_untrusted(frame)


def run_data_stream_header(data_cuts: tuple[bytes, list[int]]) -> None:
    """The first frame of a data stream must be a data header (or refused cleanly)."""
    frames = _feed_frames(m.MAX_WIRE_FRAME, data_cuts)
    if frames:
        msg = m.decode_message_untrusted(frames[0])
        if isinstance(msg, m.DataHeader):
            assert msg.offset >= 0


def run_message(body: Any) -> None:
    msg = m.decode_message_untrusted(body)
    if isinstance(msg, m.Open):
        assert "\x00" not in msg.name and msg.priority in m.PRIORITY_RANGE
    elif isinstance(msg, m.Ack | m.Resume | m.DataHeader):
        assert msg.offset >= 0


def run_request(body: Any) -> None:
    ctl.parse_request_untrusted(body)


def run_name(name: Any) -> None:
    safe = safe_name_untrusted(name)
    assert "/" not in safe and "\x00" not in safe and safe not in (".", "..")


def run_unit(text_kind: tuple[str, str]) -> None:
    text, kind = text_kind
    value = parse_size(text) if kind == "size" else parse_rate(text)
    assert value >= 0


def run_config_value(key_value: tuple[str, Any]) -> None:
    key, value = key_value
    cfgmod.parse_value(cfgmod.settings()[key], value)


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="quelay-fuzz-"))


def run_config_file(text: str) -> None:
    path = _CONFIG_DIR / f"fuzz-{os.getpid()}.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    cfgmod.load(path, env={}, check_paths=False)


def run_trust(spec: str) -> None:
    fp = parse_trust("sha256:" + spec)
    assert len(fp) == len("sha256:") + 64


def run_path_memory(raw: Any) -> None:
    entry = _valid_untrusted(raw)
    assert entry is None or entry.rtt > 0


def run_rendezvous(data: bytes) -> None:
    rv.decode_untrusted(data)
    rv.verify_untrusted(b"k" * 32, data)


def run_rendezvous_bodies(data: bytes) -> None:
    for parse in (rv.unpack_peer_info_untrusted, rv.unpack_refusal_untrusted):
        with contextlib.suppress(rv.ProtocolError):  # allowed; go on to the next parser
            parse(data)
    rv.unpack_address_untrusted(data, 0)


def _config_values() -> st.SearchStrategy[tuple[str, Any]]:
    keys = sorted(k for k, s in cfgmod.settings().items() if s.kind not in ("path", "trust"))
    text = st.text(alphabet=st.sampled_from("0123456789.:[]-_ kKmMgGtTiIbBpPsSh/"), max_size=16)
    return st.tuples(st.sampled_from(keys), text | _scalars | st.lists(_scalars, max_size=3))


_toml_lines = st.lists(
    st.tuples(st.sampled_from(sorted(cfgmod.settings())) | st.text(max_size=8),
              st.sampled_from(['"1MiB"', "5", '"250ms"', "true", '"127.0.0.1:1"', "[1, 2]",
                               '"2Mbps"', "-1", '"x"', "1e999", "{a = 1}", "[[x]]", '"'])
              | st.text(max_size=10)).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    max_size=8).map("\n".join)

_rendezvous_bytes = st.one_of(
    st.binary(max_size=120),
    st.binary(max_size=100).map(lambda b: b"QLRV" + b),
    st.tuples(st.sampled_from([bytes([k]) for k in range(8)]), st.binary(max_size=100)).map(
        lambda t: b"QLRV\x01" + t[0] + t[1]),
)

TARGETS: list[Target] = [
    Target("framing.unpack", st.binary(max_size=300), unpack_untrusted, (RemoteProtocolError,)),
    Target("control.frames", _FRAME_STREAMS, run_control_frames,
           (RemoteProtocolError,)),
    Target("wire.frames", _FRAME_STREAMS, run_wire_frames,
           (RemoteProtocolError,)),
    Target("wire.data_header", _FRAME_STREAMS, run_data_stream_header,
           (RemoteProtocolError,)),
    Target("wire.message", wire_maps | _values, run_message, (RemoteProtocolError,)),
    Target("control.request", st.dictionaries(st.sampled_from(("id", "op", "args", "x")),
                                              _values, max_size=4) | _values,
           run_request, (ctl.ControlError,)),
    Target("names.safe_name", st.text(max_size=300) | _scalars, run_name, (RemoteProtocolError,)),
    Target("units", st.tuples(st.text(alphabet=st.sampled_from("0123456789.eE+- kKmMgGtTiIbBpPsS/"),
                                      max_size=20) | st.text(max_size=20),
                              st.sampled_from(("size", "rate"))), run_unit, (UnitError,)),
    Target("config.value", _config_values(), run_config_value, (ValueError,)),
    Target("config.file", _toml_lines, run_config_file, (cfgmod.ConfigError,)),
    Target("identity.trust", st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF:xz "),
                                     max_size=100), run_trust, (IdentityError,)),
    Target("path_memory.entry",
           st.dictionaries(st.sampled_from(("rtt", "rtt_var", "min_rtt", "saved_at", "x")),
                           _scalars, max_size=5) | _values,
           run_path_memory, ()),
    Target("rendezvous.datagram", _rendezvous_bytes, run_rendezvous, (rv.ProtocolError,)),
    Target("rendezvous.bodies", st.binary(max_size=80), run_rendezvous_bodies,
           (rv.ProtocolError,)),
]


def check(target: Target, value: Any) -> None:
    """Run one input; re-raise only what the target is not allowed to raise."""
    try:
        target.run(value)
    except target.allowed:
        return
