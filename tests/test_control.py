"""Bad input on the control socket gets an error reply, and the agent keeps serving."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from quelay.client import ClientError, open_client
from quelay.framing import FrameDecoder, encode_frame

from .conftest import Pair, make_file, wait_for


async def raw_exchange(control: Path, payload: bytes) -> list[Any]:
    """Send raw bytes, collect every frame until the agent replies or closes."""
    stream = await trio.open_unix_socket(str(control))
    frames: list[Any] = []
    async with stream:
        await stream.send_all(payload)
        decoder = FrameDecoder(1 << 20)
        with trio.move_on_after(10):
            while True:
                frame = decoder.next_frame_untrusted()
                if frame is not None:
                    frames.append(frame)
                    if isinstance(frame, dict) and "id" in frame:
                        break
                    continue
                data = await stream.receive_some(65536)
                if not data:
                    break
                decoder.feed(data)
    return frames


def request(op: object, args: object = None, rid: object = 1) -> bytes:
    body: dict[str, Any] = {"id": rid, "op": op}
    if args is not None:
        body["args"] = args
    return encode_frame(body)


async def assert_still_serving(pair: Pair) -> None:
    async with open_client(pair.a.control) as client:
        assert (await client.status())["link"]["state"] == "up"


async def test_socket_is_owner_only(pair: Pair) -> None:
    mode = stat.S_IMODE(os.stat(pair.a.control).st_mode)
    assert mode == 0o600


@pytest.mark.parametrize(
    "payload, code",
    [
        (struct.pack(">I", 10_000_000), "frame_too_large"),
        (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", "bad_frame"),
        (request("launch_missiles"), "unknown_op"),
        (encode_frame(["not", "a", "map"]), "bad_request"),
        (encode_frame({"op": "status"}), "bad_request"),
        (request("send_file", {"path": 42}), "invalid_argument"),
        (request("send_file", {"path": "relative/file"}), "invalid_argument"),
        (request("send_file", {"path": "/nonexistent/file"}), "io_error"),
        (request("send_file", {"path": "/etc/hostname", "priority": "high"}), "invalid_argument"),
        (request("open_stream", {"priority": 99}), "invalid_argument"),
        (request("open_stream", {"attrs": {"k": 1}}), "invalid_argument"),
        (request("status", ["not", "a", "map"]), "invalid_argument"),
        (request("cancel", {"id": "no-such-transfer"}), "not_found"),
        (request("attach", {"id": "no-such-transfer", "mode": "read"}), "not_found"),
        (request("wait", {}), "invalid_argument"),
    ],
)
async def test_bad_input_gets_error_reply(pair: Pair, payload: bytes, code: str) -> None:
    frames = await raw_exchange(pair.a.control, payload)
    assert frames, "agent closed without replying"
    reply = frames[-1]
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    await assert_still_serving(pair)


async def test_garbage_bytes_then_clean_close(pair: Pair) -> None:
    stream = await trio.open_unix_socket(str(pair.a.control))
    async with stream:
        await stream.send_all(struct.pack(">I", 3) + b"\xff\xfe\xfd")
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    decoder = FrameDecoder()
    decoder.feed(received)
    assert decoder.next_frame_untrusted()["error"]["code"] == "bad_frame"
    await assert_still_serving(pair)


async def test_attach_to_finished_transfer(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "x.bin", 10)
    async with open_client(pair.b.control) as client:
        info = await client.send_file(src)
        await client.wait(info["id"])
    frames = await raw_exchange(pair.b.control,
                                request("attach", {"id": info["id"], "mode": "write"}))
    assert frames[-1]["error"]["code"] == "conflict"
    async with open_client(pair.b.control) as client:
        s = await client.open_stream(name="x")
        frames = await raw_exchange(pair.b.control, request("attach", {"id": s.id,
                                                                       "mode": "write"}))
        assert frames[-1]["error"]["code"] == "conflict"  # already attached
        assert (await client.cancel(s.id))["state"] == "canceled"
        final = await s.finish()
        assert final["state"] == "canceled"
        with pytest.raises(ClientError) as err:
            await client.cancel(s.id)
        assert err.value.code == "conflict"
    await assert_still_serving(pair)


async def test_many_bad_clients_do_not_disturb_a_good_one(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "good.bin", 200_000)

    async def vandal(i: int) -> None:
        stream = await trio.open_unix_socket(str(pair.b.control))
        async with stream:
            await stream.send_all(os.urandom(64) + msgpack.packb(i))

    async with open_client(pair.b.control) as client:
        info = await client.send_file(src)
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(vandal, i)
        final = await client.wait(info["id"])
    assert final["state"] == "done"


async def test_events_are_pushed_to_subscribers(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "ev.bin", 50_000)
    seen: list[str] = []
    async with open_client(pair.b.control) as client:
        await client.subscribe()
        info = await client.send_file(src)
        async for event in client.events():
            if event["data"].get("id") == info["id"]:
                seen.append(event["event"])
                if event["event"] in ("transfer.done", "transfer.failed"):
                    break
    assert seen[0] == "transfer.started"
    assert seen[-1] == "transfer.done"
    async with open_client(pair.a.control) as client:
        incoming = [t for t in await client.ls() if t["id"] == info["id"]]
    assert incoming and incoming[0]["direction"] == "in" and incoming[0]["state"] == "done"


async def test_second_agent_on_the_same_socket_is_refused(pair: Pair, tmp_path: Path) -> None:
    from quelay.agent import Agent

    from .conftest import site_config

    clash = Agent(site_config(tmp_path / "clash", listen=("127.0.0.1", 0),
                              control=pair.a.control))
    with pytest.raises(FileExistsError, match="another agent"):
        await clash.run()  # fails at start-up, before serving anything
    await assert_still_serving(pair)


async def test_writer_that_dies_cancels_instead_of_completing(pair: Pair) -> None:
    async with open_client(pair.b.control) as client:
        info = await client.request("open_stream", name="crash")
        raw = await trio.open_unix_socket(str(pair.b.control))
        await raw.send_all(request("attach", {"id": info["id"], "mode": "write"}))
        decoder = FrameDecoder()
        while (reply := decoder.next_frame_untrusted()) is None:
            decoder.feed(await raw.receive_some(65536))
        assert reply["ok"]
        await raw.send_all(b"partial data")
        await raw.aclose()  # gone without a half-close: a crash, not an end
        final = await client.wait(info["id"])
    assert final["state"] == "canceled"
    assert "writer disconnected" in final["error"]["message"]
    t_in = pair.a.agent.transfers.get(info["id"])
    if t_in is not None:  # the peer heard of it: it must not call it complete
        await wait_for(lambda: t_in.terminal)
        assert t_in.state.value == "canceled"
