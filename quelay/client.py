"""Python client for a running agent's control socket (Trio, plus a blocking wrapper).

::

    async with quelay.client.open_client("/path/control.sock") as client:
        info = await client.send_file("/data/report.bin", priority=6)
        final = await client.wait(info["id"])
        async with await client.open_stream(name="telemetry") as out:
            await out.send_all(b"...")
        # out.result holds the final transfer info once every byte was acknowledged

Stream bytes never ride in control messages: ``open_stream`` and
``accept_incoming`` attach a second connection that carries raw bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .control.protocol import MAX_CONTROL_FRAME
from .errors import QuelayError
from .framing import FrameDecoder, encode_frame


class ClientError(QuelayError):
    """The agent answered a request with an error (``code`` is stable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentUnavailable(QuelayError):
    """No agent answers on the control socket."""


async def _connect(path: str | Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(str(path))
    except OSError as exc:
        raise AgentUnavailable(f"no agent on control socket {path}: {exc.strerror}") from exc


async def _read_frame(stream: trio.SocketStream, decoder: FrameDecoder) -> Any | None:
    while True:
        frame = decoder.next_frame_untrusted()
        if frame is not None:
            return frame
        data = await stream.receive_some(65536)
        if not data:
            return None
        decoder.feed(data)


async def _attach(path: str | Path, transfer_id: str, mode: str) -> tuple[
    trio.SocketStream, dict[str, Any], bytes
]:
    stream = await _connect(path)
    await stream.send_all(encode_frame({"id": 1, "op": "attach",
                                        "args": {"id": transfer_id, "mode": mode}}))
    decoder = FrameDecoder(16 * MAX_CONTROL_FRAME)
    reply = await _read_frame(stream, decoder)
    if reply is None:
        await stream.aclose()
        raise AgentUnavailable("agent closed the connection during attach")
    if not reply.get("ok"):
        await stream.aclose()
        err = reply.get("error") or {}
        raise ClientError(err.get("code", "unknown"), err.get("message", ""))
    return stream, reply["result"], decoder.take_rest()


class OutgoingStream:
    """Raw writer for an outbound stream; closing the write side ends the stream."""

    def __init__(self, stream: trio.SocketStream, info: dict[str, Any]) -> None:
        self._stream = stream
        self.info = info
        self.id: str = info["id"]
        self.result: dict[str, Any] | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def finish(self) -> dict[str, Any]:
        """End the stream and wait until the peer acknowledged (or it failed)."""
        await self._stream.send_eof()
        reply = await _read_frame(self._stream, FrameDecoder(16 * MAX_CONTROL_FRAME))
        await self._stream.aclose()
        if reply is None:
            raise AgentUnavailable("agent closed the stream without a final report")
        self.result = reply["data"]
        return self.result

    async def __aenter__(self) -> OutgoingStream:
        return self

    async def __aexit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            await self.finish()
        else:
            await self._stream.aclose()


class IncomingStream:
    """Raw reader for an incoming stream. Clean EOF means verified and complete."""

    def __init__(self, stream: trio.SocketStream, info: dict[str, Any], first: bytes) -> None:
        self._stream = stream
        self.info = info
        self.id: str = info["id"]
        self._first = first

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        try:
            return await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise ClientError("stream_failed", "the agent aborted the stream") from exc

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await self.receive_some():
            yield data

    async def aclose(self) -> None:
        await self._stream.aclose()


class Client:
    """One control connection: requests with ids, replies matched, events queued."""

    def __init__(self, path: str | Path, stream: trio.SocketStream) -> None:
        self.path = path
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](4096)
        self._lock = trio.Lock()
        self.closed = False

    async def _reader(self) -> None:
        decoder = FrameDecoder(16 * MAX_CONTROL_FRAME)
        try:
            while (frame := await _read_frame(self._stream, decoder)) is not None:
                if "event" in frame:
                    try:
                        self._events_send.send_nowait(frame)
                    except trio.WouldBlock:
                        continue  # nobody reads events: drop rather than grow
                    continue
                waiter = self._waiting.pop(frame.get("id"), None)
                if waiter is not None:
                    waiter.send_nowait(frame)
        finally:
            self.closed = True
            self._events_send.close()
            for waiter in self._waiting.values():
                waiter.close()

    async def request(self, op: str, **args: Any) -> Any:
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        args = {k: v for k, v in args.items() if v is not None}
        async with self._lock:
            await self._stream.send_all(encode_frame({"id": request_id, "op": op, "args": args}))
        try:
            reply = await receive.receive()
        except trio.EndOfChannel as exc:
            raise AgentUnavailable("the agent closed the control connection") from exc
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ClientError(err.get("code", "unknown"), err.get("message", ""))
        return reply.get("result")

    # -- operations -------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.request("status")  # type: ignore[no-any-return]

    async def ls(self) -> list[dict[str, Any]]:
        return (await self.request("ls"))["transfers"]  # type: ignore[no-any-return]

    async def get(self, transfer_id: str) -> dict[str, Any]:
        return await self.request("get", id=transfer_id)  # type: ignore[no-any-return]

    async def identity(self) -> str:
        return (await self.request("identity"))["fingerprint"]  # type: ignore[no-any-return]

    async def send_file(self, path: str | Path, *, priority: int | None = None,
                        name: str | None = None, attrs: dict[str, str] | None = None
                        ) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "send_file", path=str(Path(path).resolve()), priority=priority, name=name,
            attrs=attrs)

    async def open_stream(self, *, name: str | None = None, priority: int | None = None,
                          attrs: dict[str, str] | None = None, spool: int | None = None
                          ) -> OutgoingStream:
        info = await self.request("open_stream", name=name, priority=priority, attrs=attrs,
                                  spool=spool)
        stream, info, _ = await _attach(self.path, info["id"], "write")
        return OutgoingStream(stream, info)

    async def accept_incoming(self, *, name: str | None = None, transfer_id: str | None = None
                              ) -> IncomingStream:
        info = await self.request("accept_incoming", name=name, id=transfer_id)
        stream, info, first = await _attach(self.path, info["id"], "read")
        return IncomingStream(stream, info, first)

    async def wait(self, transfer_id: str) -> dict[str, Any]:
        return await self.request("wait", id=transfer_id)  # type: ignore[no-any-return]

    async def cancel(self, transfer_id: str) -> dict[str, Any]:
        return await self.request("cancel", id=transfer_id)  # type: ignore[no-any-return]

    async def subscribe(self) -> None:
        await self.request("subscribe")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events pushed by the agent (call ``subscribe`` first)."""
        async for event in self._events:
            yield event


@asynccontextmanager
async def open_client(path: str | Path) -> AsyncIterator[Client]:
    stream = await _connect(path)
    client = Client(path, stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            await stream.aclose()


class BlockingClient:
    """A synchronous wrapper for scripts: each call runs one Trio event loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def _call(self, fn: Callable[[Client], Any]) -> Any:
        async def main() -> Any:
            async with open_client(self.path) as client:
                return await fn(client)

        return trio.run(main)

    def status(self) -> dict[str, Any]:
        return self._call(lambda c: c.status())  # type: ignore[no-any-return]

    def ls(self) -> list[dict[str, Any]]:
        return self._call(lambda c: c.ls())  # type: ignore[no-any-return]

    def send_file(self, path: str | Path, *, priority: int | None = None,
                  wait: bool = False) -> dict[str, Any]:
        async def go(c: Client) -> Any:
            info = await c.send_file(path, priority=priority)
            return await c.wait(info["id"]) if wait else info

        return self._call(go)  # type: ignore[no-any-return]

    def cancel(self, transfer_id: str) -> dict[str, Any]:
        return self._call(lambda c: c.cancel(transfer_id))  # type: ignore[no-any-return]

    def wait(self, transfer_id: str) -> dict[str, Any]:
        return self._call(lambda c: c.wait(transfer_id))  # type: ignore[no-any-return]
