"""Python client for a running agent's control socket: async for Trio, blocking for scripts.

Everything the ``quelay`` command line does goes through this module; the
wire format it speaks is docs/control-protocol.md.

Trio::

    from quelay.client import connect

    async with connect("/run/quelay/control.sock") as client:
        status = await client.status()               # link state, RTT, cap, counters
        info = await client.send_file("/data/report.bin", priority=6)
        final = await client.wait(info["id"])         # terminal info; state "done" = verified

        async with await client.open_stream(name="telemetry") as out:
            await out.send_all(b"...")                # blocks while the spool is full
        print(out.result["state"])                    # "done": every byte acknowledged

        incoming = await client.accept_incoming(name="telemetry")
        async with incoming:
            async for chunk in incoming:              # clean end = complete and verified
                ...

        async for event in client.events():           # subscribes on first use
            print(event["event"], event["data"])

        await client.set_rate("2Mbps")                # wire cap; 0 = uncapped
        await client.cancel(info["id"])

        # A hub (several named peers): say which peer with ``peer=``.
        await client.send_file("/data/plan.bin", peer="site-a")
        incoming = await client.accept_incoming(name="telemetry", peer="site-b")
        await client.set_rate("2Mbps", peer="site-a")  # that link's cap
        await client.set_rate("10Mbps", total=True)    # shared by every link
        print(await client.rates())                    # caps and effective shares

        await client.datagram_send("position", b"...", max_age=0.5)  # best effort, never waits
        for msg in await client.datagram_recv("position", count=1):  # at the other agent
            print(msg["data"], msg["received_at"] - msg["sent_at"])

Blocking (one Trio loop per call, or one background loop inside ``with``)::

    from quelay.client import BlockingClient

    c = BlockingClient("/run/quelay/control.sock")
    c.send_file("/data/report.bin", wait=True)
    with BlockingClient(path) as c:                   # one connection for many calls
        with c.open_stream(name="telemetry") as out:
            out.write(b"...")
        for event in c.events():
            ...

Stream bytes never ride in control messages: ``open_stream`` and
``accept_incoming`` attach a second connection that carries raw bytes.

**Peers.** Every operation that involves the peer takes ``peer=NAME``: the
peer's name on a hub (``quelay run --trust NAME=PIN``, or ``[[peers]]``); it
travels as the protocol's ``to`` (send_file, open_stream, fetch, ls_remote,
datagram_send), ``from`` (accept_incoming, datagram_recv) or ``peer`` (ls,
set_rate). With one peer it may be left out; with several, an operation that
needs one answers ``ClientError`` code ``peer_required``, and an unknown name
``unknown_peer``.

Errors say whose fault they are: :class:`AgentUnavailable` (no agent answers:
start it, or check ``--control``), :class:`ClientError` (the agent refused a
request; ``code`` is one of the protocol's stable codes), :class:`ClientUsageError`
(this library was called wrongly).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from .control.protocol import MAX_CONTROL_FRAME
from .errors import QuelayError
from .framing import FrameDecoder, encode_frame
from .units import parse_rate

T = TypeVar("T")

log = logging.getLogger("quelay.client")

TERMINAL_STATES = frozenset({"done", "failed", "canceled"})
#: What iterating an incoming stream reads per call (``receive_some`` keeps its own max).
ITER_READ = 256 * 1024
MAX_DATAGRAM_REQUEST = MAX_CONTROL_FRAME - 1024  # payload bytes a datagram_send may carry


class ClientError(QuelayError):
    """The agent answered a request with an error (``code`` is stable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentUnavailable(QuelayError):
    """No agent answers on the control socket (or it went away mid-request)."""


class ClientUsageError(QuelayError):
    """This library was used in a way it does not support: the caller's fault."""


async def _connect(path: str | Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(str(path))
    except OSError as exc:
        raise AgentUnavailable(
            f"no agent on control socket {path}: {exc.strerror or exc}") from exc


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
    try:
        await stream.send_all(encode_frame({"id": 1, "op": "attach",
                                            "args": {"id": transfer_id, "mode": mode}}))
        decoder = FrameDecoder(16 * MAX_CONTROL_FRAME)
        reply = await _read_frame(stream, decoder)
    except trio.BrokenResourceError as exc:
        await stream.aclose()
        raise AgentUnavailable("agent closed the connection during attach") from exc
    if reply is None:
        await stream.aclose()
        raise AgentUnavailable("agent closed the connection during attach")
    if not reply.get("ok"):
        await stream.aclose()
        err = reply.get("error") or {}
        raise ClientError(err.get("code", "unknown"), err.get("message", ""))
    return stream, reply["result"], decoder.take_rest()


def _unwrap(group: BaseExceptionGroup[Any]) -> BaseException:
    """The single error inside a group from our own nursery, else the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class OutgoingStream:
    """Raw writer for an outbound stream (from :meth:`Client.open_stream`).

    ``send_all`` blocks while the agent's spool is full (back-pressure).
    ``finish()`` ends the stream and waits until the peer acknowledged every
    byte; ``result`` then holds the final transfer info. Used as an async
    context manager it finishes on a clean exit and aborts (cancels the
    transfer, so the far side never sees a truncated stream as complete) on
    an exception. ``aclose()`` without ``finish()`` aborts too.
    """

    def __init__(self, stream: trio.SocketStream, info: dict[str, Any],
                 client: Client | None = None) -> None:
        self._stream = stream
        self._client = client
        self.info = info
        self.id: str = info["id"]
        self.result: dict[str, Any] | None = None
        self.sent = 0  # bytes handed to the agent by this writer
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise ClientError("stream_failed",
                              "the agent stopped reading this stream (it failed or was "
                              "canceled; wait() tells why)") from exc
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def finish(self) -> dict[str, Any]:
        """End the stream and wait until the peer acknowledged (or it failed)."""
        if self.result is not None:
            return self.result
        try:
            await self._stream.send_eof()
            decoder = FrameDecoder(16 * MAX_CONTROL_FRAME)
            reply = await _read_frame(self._stream, decoder)
            if reply is not None and reply.get("event") == "stream.eof":
                # The agent saw our end and knows we are alive; now the final report.
                reply = await _read_frame(self._stream, decoder)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reply = None
        finally:
            self._closed = True
            await self._stream.aclose()
        if reply is None:
            if self._client is not None and not self._client.closed:
                self.result = await self._client.wait(self.id)
                return self.result
            raise AgentUnavailable("agent closed the stream without a final report")
        self.result = reply["data"]
        return self.result

    async def abort(self, reason: str = "writer aborted") -> None:
        """Cancel the transfer (both agents release it), then close the connection."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._client is not None and not self._client.closed:
                try:
                    await self._client.cancel(self.id)
                except (ClientError, AgentUnavailable) as exc:
                    # Already terminal, or the agent is gone: closing is all that is left.
                    log.debug("abort of stream %s (%s): %s", self.id, reason, exc)
            await self._stream.aclose()

    async def aclose(self) -> None:
        if self.result is None:
            await self.abort()

    async def __aenter__(self) -> OutgoingStream:
        return self

    async def __aexit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            await self.finish()
        else:
            await self.abort(f"writer failed: {exc_type.__name__}")


class IncomingStream:
    """Raw reader for an incoming stream. A clean end means complete and verified.

    If the transfer fails, the end of the bytes is not a silent EOF:
    ``receive_some`` asks the agent and raises :class:`ClientError` (code
    ``stream_failed``, message with the reason); ``await wait()`` gives the
    final info either way.
    """

    def __init__(self, stream: trio.SocketStream, info: dict[str, Any], first: bytes,
                 client: Client | None = None) -> None:
        self._stream = stream
        self._client = client
        self.info = info
        self.id: str = info["id"]
        self.received = 0
        self._first = first

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first, b""
        else:
            try:
                data = await self._stream.receive_some(max_bytes)
            except trio.BrokenResourceError as exc:
                raise ClientError("stream_failed", "the agent aborted the stream") from exc
            if not data and self._client is not None:
                # A Unix socket cannot carry a reset: the agent closes it either way, so
                # the end is checked with the agent before it is reported as complete.
                final = await self._client.wait(self.id)
                if final.get("state") != "done":
                    err = final.get("error") or {}
                    raise ClientError("stream_failed",
                                      f"{err.get('code')}: {err.get('message')}")
        self.received += len(data)
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Chunks as they arrive, each at most :data:`ITER_READ` bytes."""
        while data := await self.receive_some(ITER_READ):
            yield data

    async def read_all(self) -> bytes:
        """Every byte of the stream (for small streams; iterate for large ones)."""
        return b"".join([chunk async for chunk in self])

    async def wait(self) -> dict[str, Any]:
        """The transfer's final info (needs the client that accepted it)."""
        if self._client is None:
            raise ClientUsageError("this stream was not accepted through a Client")
        return await self._client.wait(self.id)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> IncomingStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class Client:
    """One control connection: requests with ids, replies matched, events queued."""

    def __init__(self, path: str | Path, stream: trio.SocketStream) -> None:
        self.path = path
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](4096)
        self._lock = trio.Lock()
        self._subscribed = False
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
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("control connection lost: %r", exc)  # waiters learn it below
        finally:
            self.closed = True
            self._events_send.close()
            for waiter in self._waiting.values():
                waiter.close()

    async def request(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; ``None`` arguments are left out."""
        if self.closed:
            raise AgentUnavailable("the agent closed the control connection")
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        args = {k: v for k, v in args.items() if v is not None}
        try:
            async with self._lock:
                await self._stream.send_all(
                    encode_frame({"id": request_id, "op": op, "args": args}))
            reply = await receive.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise AgentUnavailable("the agent closed the control connection") from exc
        finally:
            self._waiting.pop(request_id, None)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ClientError(err.get("code", "unknown"), err.get("message", ""))
        return reply.get("result")

    # -- operations -------------------------------------------------------------------

    async def ping(self) -> None:
        await self.request("ping")

    async def status(self) -> dict[str, Any]:
        return await self.request("status")  # type: ignore[no-any-return]

    async def ls(self, limit: int | None = None, *, peer: str | None = None
                 ) -> list[dict[str, Any]]:
        """Transfers, newest first: all of them (page by page), or the newest ``limit``;
        with ``peer``, only that peer's."""
        out: list[dict[str, Any]] = []
        cursor: int | None = 0
        while cursor is not None and (limit is None or len(out) < limit):
            want = 500 if limit is None else min(500, limit - len(out))
            page = await self.ls_page(cursor, want, peer=peer)
            out.extend(page["transfers"])
            cursor = page["next"]
        return out

    async def ls_page(self, cursor: int = 0, limit: int = 100, *,
                      peer: str | None = None) -> dict[str, Any]:
        """One page: ``{"transfers": [...], "total": N, "next": cursor or None}``."""
        return await self.request(  # type: ignore[no-any-return]
            "ls", cursor=cursor, limit=limit, peer=peer)

    async def get(self, transfer_id: str) -> dict[str, Any]:
        return await self.request("get", id=transfer_id)  # type: ignore[no-any-return]

    async def identity(self) -> str:
        return (await self.request("identity"))["fingerprint"]  # type: ignore[no-any-return]

    async def rates(self) -> dict[str, Any]:
        """Every cap: ``{"rate", "rate_total", "peers": {NAME: {"rate", "effective"}}}``.

        ``rate`` is the sole link's cap (with several links: ``rate_total``);
        ``effective`` is what a link may use now, its share under the total cap.
        An agent without named peers answers ``{"rate"}`` only if it predates hubs.
        """
        return await self.request("get_rate")  # type: ignore[no-any-return]

    async def get_rate(self, peer: str | None = None) -> int:
        """A cap in bits/s (0 = uncapped): the sole link's, or with ``peer`` that link's.

        With several links and no ``peer`` it is the total cap (``rates()`` has all).
        """
        return _pick_rate(await self.rates(), peer, total=False)

    async def set_rate(self, rate: int | str, peer: str | None = None, *,
                       total: bool = False) -> int:
        """Set a cap: bits/s or text like ``"2Mbps"`` (0 = uncapped); returns it.

        Without ``peer`` or ``total``: the sole link's cap (several links:
        ``peer_required``); ``peer``: that link's cap; ``total``: the cap shared by
        every link (``rate_total``, 0 = none).
        """
        if peer is not None and total:
            raise ClientUsageError("set_rate: give peer or total, not both")
        bps = parse_rate(rate)  # refuse "10" or "2MB/s" here, with the same message
        result = await self.request("set_rate", rate=bps, peer=peer, total=total or None)
        return _pick_rate(result, peer, total=total)

    async def send_file(self, path: str | Path, *, priority: int | None = None,
                        name: str | None = None, attrs: dict[str, str] | None = None,
                        ttl: int | str | None = None, peer: str | None = None
                        ) -> dict[str, Any]:
        """Hand a file to the agent (it reads the file itself); returns its info.

        ``ttl`` (seconds or ``"2h"``): the receiver deletes its copy that long after
        it arrived. ``peer``: to which peer, on a hub.
        """
        return await self.request(  # type: ignore[no-any-return]
            "send_file", path=str(Path(path).resolve()), priority=priority, name=name,
            attrs=attrs, ttl=ttl, to=peer)

    async def open_stream(self, *, name: str | None = None, priority: int | None = None,
                          attrs: dict[str, str] | None = None, spool: int | None = None,
                          peer: str | None = None) -> OutgoingStream:
        """Start an outbound stream (to ``peer`` on a hub); returns its writer (attached
        on a second connection)."""
        info = await self.request("open_stream", name=name, priority=priority, attrs=attrs,
                                  spool=spool, to=peer)
        try:
            stream, info, _ = await _attach(self.path, info["id"], "write")
        except BaseException:
            # Nobody will ever write it: release it rather than leave it open at both ends.
            with trio.CancelScope(shield=True):
                try:
                    await self.request("cancel", id=info["id"])
                except (ClientError, AgentUnavailable) as exc:
                    log.debug("could not cancel unattached stream %s: %s", info["id"], exc)
            raise
        return OutgoingStream(stream, info, self)

    async def accept_incoming(self, *, name: str | None = None, transfer_id: str | None = None,
                              peer: str | None = None) -> IncomingStream:
        """Wait for the next unclaimed incoming stream (matching ``name``, from ``peer`` on
        a hub), and attach to read it."""
        info = await self.request("accept_incoming", name=name, id=transfer_id,
                                  **{"from": peer})
        stream, info, first = await _attach(self.path, info["id"], "read")
        return IncomingStream(stream, info, first, self)

    async def incoming(self, *, name: str | None = None, peer: str | None = None
                       ) -> AsyncIterator[IncomingStream]:
        """Every incoming stream (matching ``name`` and ``peer``), one after the other."""
        while True:
            yield await self.accept_incoming(name=name, peer=peer)

    async def fetch(self, name: str, *, export: str = "", priority: int | None = None,
                    peer: str | None = None) -> dict[str, Any]:
        """Ask ``peer`` for a file of its export; returns the incoming transfer's info
        (it lands in the inbox like any incoming file)."""
        return await self.request(  # type: ignore[no-any-return]
            "fetch", name=name, export=export, priority=priority, to=peer)

    async def ls_remote(self, *, peer: str | None = None) -> list[dict[str, Any]]:
        """The files ``peer`` exports: ``[{"export", "name", "size", "mtime"}, ...]``."""
        return (await self.request("ls_remote", to=peer))["files"]  # type: ignore[no-any-return]

    async def wait(self, transfer_id: str) -> dict[str, Any]:
        """Block until the transfer is terminal; its final info."""
        return await self.request("wait", id=transfer_id)  # type: ignore[no-any-return]

    async def cancel(self, transfer_id: str) -> dict[str, Any]:
        return await self.request("cancel", id=transfer_id)  # type: ignore[no-any-return]

    # -- best-effort datagrams (docs/control-protocol.md) -----------------------------

    async def datagram_send(self, name: str, data: bytes | str, *,
                            max_age: float | str | None = None,
                            check: bool = True, peer: str | None = None) -> dict[str, Any]:
        """Queue one best-effort datagram for the peer (a str is sent as UTF-8); never
        waits for the link. It goes ahead of bulk data, is dropped if it cannot leave
        within ``max_age`` (seconds or ``"250ms"``; default the agent's
        ``datagram_max_age``) and is never retransmitted.

        Returns ``{"accepted", "reason", "message", "sent_at", "max_payload"}``; with
        ``check`` a refusal raises :class:`ClientError` whose code is the reason
        (``too_big``, ``link_down``, ``queue_full``). ``peer``: to which peer, on a hub.
        """
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        result: dict[str, Any]
        if len(payload) > MAX_DATAGRAM_REQUEST:  # no path carries it; nor does a request
            result = {"accepted": False, "reason": "too_big", "sent_at": None,
                      "max_payload": None, "message": f"a {len(payload)}-byte message is too "
                      "big: no path carries a datagram that large"}
        else:
            result = await self.request("datagram_send", name=name, data=payload,
                                        max_age=max_age, to=peer)
        if check and not result["accepted"]:
            raise ClientError(result["reason"], result["message"])
        return result

    async def datagram_recv(self, name: str, *, count: int = 1,
                            timeout: float | str | None = None,
                            peer: str | None = None) -> list[dict[str, Any]]:
        """Up to ``count`` (1..256) datagrams named ``name``, oldest first, as soon as one
        is here; ``[]`` if none came within ``timeout`` (seconds or ``"2s"``; None: wait
        for ever). Each is ``{"name", "data": bytes, "sent_at", "received_at"}``: Unix
        times of the sending agent accepting it (its clock) and of this agent receiving
        it (ours), so ``received_at - sent_at`` is the one-way delay plus clock offset.
        ``peer``: only those from that peer, on a hub."""
        result = await self.request("datagram_recv", name=name, count=count, timeout=timeout,
                                    **{"from": peer})
        return result["messages"]  # type: ignore[no-any-return]

    async def datagrams(self, name: str, *, peer: str | None = None
                        ) -> AsyncIterator[dict[str, Any]]:
        """Every datagram named ``name`` (from ``peer``, on a hub) as it arrives, forever."""
        while True:
            for msg in await self.datagram_recv(name, count=256, peer=peer):
                yield msg

    async def subscribe(self) -> None:
        if not self._subscribed:
            self._subscribed = True
            await self.request("subscribe")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events pushed by the agent, ``{"event": name, "data": {...}}`` (subscribes first)."""
        await self.subscribe()
        async for event in self._events:
            yield event

    async def next_event(self) -> dict[str, Any]:
        """The next event (subscribes first); AgentUnavailable when the agent went away."""
        await self.subscribe()
        try:
            return await self._events.receive()
        except trio.EndOfChannel as exc:
            raise AgentUnavailable("the agent closed the control connection") from exc

    async def track(self, transfer_id: str,
                    on_update: Callable[[dict[str, Any]], Any] | None = None,
                    interval: float = 0.5) -> dict[str, Any]:
        """Wait until the transfer is terminal, calling ``on_update(info)`` meanwhile.

        ``on_update`` gets the live info every ``interval`` seconds (and is not
        called again once the transfer ended); returns the terminal info as soon
        as the agent reports it.
        """
        final: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                final.update(await self.wait(transfer_id))
                nursery.cancel_scope.cancel()

            async def poller() -> None:
                assert on_update is not None
                while True:
                    info = await self.get(transfer_id)
                    if info["state"] in TERMINAL_STATES:
                        return
                    on_update(info)
                    await trio.sleep(interval)

            nursery.start_soon(waiter)
            if on_update is not None:
                nursery.start_soon(poller)
        return final


def _pick_rate(result: dict[str, Any], peer: str | None, *, total: bool) -> int:
    """One cap out of a ``get_rate`` / ``set_rate`` answer (docs/control-protocol.md)."""
    if total:
        return int(result.get("rate_total", 0))
    if peer is None:
        return int(result["rate"])
    peers = result.get("peers") or {}
    if peer not in peers:
        raise ClientError("unknown_peer", f"no peer named {peer!r} "
                          f"(peers: {', '.join(sorted(peers)) or 'none'})")
    return int(peers[peer]["rate"])


@asynccontextmanager
async def open_client(path: str | Path) -> AsyncIterator[Client]:
    """Connect to the agent's control socket (``AgentUnavailable`` if nobody answers)."""
    stream = await _connect(path)
    client = Client(path, stream)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                # No await here: a checkpoint in a cancelled scope would raise Cancelled,
                # which the nursery absorbs, and the caller's own error would be lost.
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery is an implementation detail: callers get the error itself.
        raise _unwrap(group) from None
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


connect = open_client


# -- blocking -------------------------------------------------------------------------


class _Portal:
    """A Trio loop in a background thread holding one client connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="quelay-client",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to the caller's thread by start()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with open_client(self.path) as client:
            self.client = client
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._token is None:
            raise ClientUsageError("the blocking client is not connected")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                log.debug("client loop already finished")
        self._thread.join()


class BlockingOutgoingStream:
    """Blocking writer for :meth:`BlockingClient.open_stream`."""

    def __init__(self, portal: _Portal, stream: OutgoingStream) -> None:
        self._portal = portal
        self.stream = stream
        self.id = stream.id
        self.info = stream.info

    @property
    def result(self) -> dict[str, Any] | None:
        return self.stream.result

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._portal.run(self.stream.send_all, bytes(data))

    def finish(self) -> dict[str, Any]:
        return self._portal.run(self.stream.finish)

    def abort(self) -> None:
        self._portal.run(self.stream.abort)

    def __enter__(self) -> BlockingOutgoingStream:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class BlockingIncomingStream:
    """Blocking reader for :meth:`BlockingClient.accept_incoming`."""

    def __init__(self, portal: _Portal, stream: IncomingStream) -> None:
        self._portal = portal
        self.stream = stream
        self.id = stream.id
        self.info = stream.info

    def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; ``b""`` at the (verified) end."""
        return self._portal.run(self.stream.receive_some, max_bytes)

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read():
            yield data

    def read_all(self) -> bytes:
        return b"".join(self)

    def close(self) -> None:
        self._portal.run(self.stream.aclose)

    def __enter__(self) -> BlockingIncomingStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BlockingClient:
    """A synchronous client for scripts.

    Outside ``with``, each call connects, runs one Trio loop and disconnects.
    Inside ``with BlockingClient(path) as c:``, one connection in a background
    thread serves every call; streams and events need that form.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self._portal: _Portal | None = None

    def __enter__(self) -> BlockingClient:
        portal = _Portal(self.path)
        portal.start()
        self._portal = portal
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        portal, self._portal = self._portal, None
        if portal is not None:
            portal.stop()

    def _call(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        if self._portal is not None:
            assert self._portal.client is not None
            return self._portal.run(fn, self._portal.client)

        async def main() -> T:
            async with open_client(self.path) as client:
                return await fn(client)

        return trio.run(main)

    def _need_portal(self, what: str) -> _Portal:
        if self._portal is None or self._portal.client is None:
            raise ClientUsageError(f"{what} needs a connection: use "
                                   f"`with BlockingClient(path) as client:`")
        return self._portal

    def ping(self) -> None:
        self._call(lambda c: c.ping())

    def status(self) -> dict[str, Any]:
        return self._call(lambda c: c.status())

    def ls(self, limit: int | None = None, *, peer: str | None = None
           ) -> list[dict[str, Any]]:
        return self._call(lambda c: c.ls(limit, peer=peer))

    def request(self, op: str, **args: Any) -> Any:
        """Any control operation by name (see docs/control-protocol.md)."""
        return self._call(lambda c: c.request(op, **args))

    def get(self, transfer_id: str) -> dict[str, Any]:
        return self._call(lambda c: c.get(transfer_id))

    def identity(self) -> str:
        return self._call(lambda c: c.identity())

    def rates(self) -> dict[str, Any]:
        """See :meth:`Client.rates`."""
        return self._call(lambda c: c.rates())

    def get_rate(self, peer: str | None = None) -> int:
        """See :meth:`Client.get_rate`."""
        return self._call(lambda c: c.get_rate(peer))

    def set_rate(self, rate: int | str, peer: str | None = None, *, total: bool = False) -> int:
        """See :meth:`Client.set_rate`."""
        return self._call(lambda c: c.set_rate(rate, peer, total=total))

    def send_file(self, path: str | Path, *, priority: int | None = None,
                  name: str | None = None, attrs: dict[str, str] | None = None,
                  wait: bool = False, ttl: int | str | None = None,
                  peer: str | None = None) -> dict[str, Any]:
        async def go(c: Client) -> dict[str, Any]:
            info = await c.send_file(path, priority=priority, name=name, attrs=attrs, ttl=ttl,
                                     peer=peer)
            return await c.wait(info["id"]) if wait else info

        return self._call(go)

    def fetch(self, name: str, *, export: str = "", priority: int | None = None,
              peer: str | None = None) -> dict[str, Any]:
        """See :meth:`Client.fetch`."""
        return self._call(lambda c: c.fetch(name, export=export, priority=priority, peer=peer))

    def ls_remote(self, *, peer: str | None = None) -> list[dict[str, Any]]:
        """See :meth:`Client.ls_remote`."""
        return self._call(lambda c: c.ls_remote(peer=peer))

    def cancel(self, transfer_id: str) -> dict[str, Any]:
        return self._call(lambda c: c.cancel(transfer_id))

    def wait(self, transfer_id: str) -> dict[str, Any]:
        return self._call(lambda c: c.wait(transfer_id))

    def datagram_send(self, name: str, data: bytes | str, *, max_age: float | str | None = None,
                      check: bool = True, peer: str | None = None) -> dict[str, Any]:
        """See :meth:`Client.datagram_send`."""
        return self._call(lambda c: c.datagram_send(name, data, max_age=max_age, check=check,
                                                    peer=peer))

    def datagram_recv(self, name: str, *, count: int = 1,
                      timeout: float | str | None = None,
                      peer: str | None = None) -> list[dict[str, Any]]:
        """See :meth:`Client.datagram_recv`."""
        return self._call(lambda c: c.datagram_recv(name, count=count, timeout=timeout,
                                                    peer=peer))

    def open_stream(self, *, name: str | None = None, priority: int | None = None,
                    attrs: dict[str, str] | None = None, spool: int | None = None,
                    peer: str | None = None) -> BlockingOutgoingStream:
        portal = self._need_portal("open_stream")
        assert portal.client is not None
        client = portal.client
        out = portal.run(lambda: client.open_stream(name=name, priority=priority,
                                                    attrs=attrs, spool=spool, peer=peer))
        return BlockingOutgoingStream(portal, out)

    def accept_incoming(self, *, name: str | None = None, transfer_id: str | None = None,
                        peer: str | None = None) -> BlockingIncomingStream:
        portal = self._need_portal("accept_incoming")
        assert portal.client is not None
        client = portal.client
        incoming = portal.run(lambda: client.accept_incoming(name=name,
                                                             transfer_id=transfer_id,
                                                             peer=peer))
        return BlockingIncomingStream(portal, incoming)

    def subscribe(self) -> None:
        """Start receiving events now (``events()`` would, but only once iterated)."""
        self._need_portal("subscribe")
        self._call(lambda c: c.subscribe())

    def events(self) -> Iterator[dict[str, Any]]:
        """Events as they come (blocks); ends if the agent goes away."""
        portal = self._need_portal("events")
        assert portal.client is not None
        client = portal.client
        while True:
            try:
                yield portal.run(client.next_event)
            except AgentUnavailable:
                return
