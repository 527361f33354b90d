"""The control server: a Unix socket speaking framed msgpack requests.

Each client connection is one task. Requests run as their own tasks so a
long-poll (``wait``, ``accept_incoming``) never blocks the others on the same
connection; replies are serialised by a lock. ``attach`` turns the connection
into a raw byte pipe for one transfer. A misbehaving client gets an error
reply (or, for bytes that are not frames, a reply and a clean close) and
nobody else notices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import trio

from ..agent.book import TransferBook, source_stat
from ..agent.datagrams import DatagramService
from ..agent.exports import ExportError, TreeError, walk_tree
from ..agent.peerspec import peer_name_problem
from ..agent.pipes import OutboundPipe, PipeAborted
from ..core.datagrams import MAX_AGE_LIMIT as DATAGRAM_MAX_AGE_LIMIT
from ..core.datagrams import name_problem as datagram_name_problem
from ..core.messages import (
    PRIORITY_RANGE,
    attrs_problem,
    name_problem,
    new_transfer_id,
)
from ..core.names import UnsafeNameError, safe_name_untrusted
from ..core.transfer import State, Transfer
from ..errors import FrameTooLarge, QuelayError, RemoteProtocolError
from ..framing import FrameDecoder, encode_frame
from ..units import UnitError, parse_duration, parse_rate
from . import protocol as p
from .protocol import ControlError

log = logging.getLogger("quelay.control")

DEFAULT_PRIORITY = 4
READ_CHUNK = 64 * 1024
#: A stream writer's bytes are read up to this much at a time, as far as the spool has
#: room: what the client has queued goes into the spool in one pass (one hash update,
#: one wake of the pump).
RAW_READ_CHUNK = 256 * 1024
LISTEN_BACKLOG = 512  # simultaneous clients connecting at once
MAX_UNSENT = 1024 * 1024  # a client's unread replies and events; past this it is dropped
LS_DEFAULT_LIMIT = 100
LS_MAX_LIMIT = 500  # 500 transfer infos stay far below the reply frame limit
DATAGRAM_RECV_MAX = 256  # datagrams in one datagram_recv reply...
DATAGRAM_RECV_BYTES = 512 * 1024  # ...and their payload bytes (the reply limit is 1 MiB)


class LinkPort(Protocol):
    """One of the agent's links, as a client addresses it."""

    @property
    def name(self) -> str: ...
    @property
    def datagrams(self) -> DatagramService: ...


class AgentPort(Protocol):
    """What the control server needs from the agent (and nothing more)."""

    @property
    def fingerprint(self) -> str: ...
    @property
    def spool_size(self) -> int: ...
    @property
    def rate(self) -> int: ...
    def status(self) -> dict[str, Any]: ...
    def rates(self) -> dict[str, Any]: ...
    def set_rate(self, rate_bps: int, peer: str | None = None) -> None: ...
    def set_rate_total(self, rate_bps: int) -> None: ...
    def reload_identity(self) -> dict[str, Any]: ...
    def link_named(self, name: str | None) -> LinkPort: ...


class _Raw(Exception):
    """Internal signal: the connection switched to raw mode for a transfer."""

    def __init__(self, transfer: Transfer, mode: str) -> None:
        self.transfer = transfer
        self.mode = mode


class ClientConnection:
    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.book = server.book
        self.stream = stream
        self.decoder = FrameDecoder(p.MAX_CONTROL_FRAME)
        self.raw: _Raw | None = None
        self.subscriptions: trio.Nursery | None = None
        self.gone = False
        self._outbox: deque[bytes] = deque()
        self._unsent = 0
        self._outbox_changed = trio.Event()
        self._scope: trio.CancelScope | None = None

    async def send(self, value: dict[str, Any]) -> None:
        """Queue one frame for the client (never blocks the agent on a slow client)."""
        if value.get("ok") is False:  # an error reply: counted by code for the metrics
            self.book.stats.control_rejected[value["error"]["code"]] += 1
        self.post(value)

    def post(self, value: dict[str, Any]) -> None:
        if self.gone:
            return
        frame = encode_frame(value, 16 * p.MAX_CONTROL_FRAME)
        if self._unsent + len(frame) > MAX_UNSENT:
            # A client that does not read its replies must not grow the agent.
            log.warning("control client dropped: %d bytes of replies unread", self._unsent)
            self.gone = True
            self._outbox.clear()
            if self._scope is not None:
                self._scope.cancel()
            return
        self._outbox.append(frame)
        self._unsent += len(frame)
        self._outbox_changed.set()

    async def _writer(self, *, until_drained: bool = False) -> None:
        """Send queued frames in order; with ``until_drained``, return once empty."""
        while True:
            while self._outbox:
                frame = self._outbox.popleft()
                try:
                    await self.stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.gone = True
                    self._outbox.clear()
                    self._unsent = 0
                    return
                self._unsent -= len(frame)
            if until_drained:
                return
            self._outbox_changed = trio.Event()
            await self._outbox_changed.wait()

    async def serve(self) -> None:
        self.book.stats.control_clients += 1
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                await self._serve()
        except Exception:  # one client's trouble must never take the agent down
            log.exception("control connection failed")
        finally:
            self.book.stats.control_clients -= 1
            self.book.unclaim(self)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.aclose()

    async def _serve(self) -> None:
        try:
            async with trio.open_nursery() as connection:
                connection.start_soon(self._writer)
                async with trio.open_nursery() as subscriptions:
                    self.subscriptions = subscriptions
                    async with trio.open_nursery() as requests:
                        await self._read_requests(requests)
                    # The client closed (or went raw): its event forwarding ends here.
                    subscriptions.cancel_scope.cancel()
                connection.cancel_scope.cancel()
            await self._writer(until_drained=True)
            if self.raw is not None and not self.gone:
                await self._serve_raw(self.raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control client went away")

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        while self.raw is None and not self.gone:
            try:
                body = self.decoder.next_frame_untrusted()
            except FrameTooLarge as exc:
                await self.send(ControlError(p.FRAME_TOO_LARGE, str(exc)).reply(None))
                return
            except RemoteProtocolError as exc:
                await self.send(ControlError(p.BAD_FRAME, str(exc)).reply(None))
                return
            if body is None:
                try:
                    data = await self.stream.receive_some(READ_CHUNK)
                except trio.BrokenResourceError:
                    return  # reset by the client: same as EOF
                if not data:
                    return
                self.decoder.feed(data)
                continue
            try:
                request_id, op, args = p.parse_request_untrusted(body)
            except ControlError as exc:
                rid = body.get("id") if isinstance(body, dict) else None
                await self.send(exc.reply(rid if isinstance(rid, (int, str)) else None))
                continue
            if op == "attach":
                # Handled inline: nothing may be read past this frame until we reply.
                await self._attach(request_id, args)
                continue
            nursery.start_soon(self._run_request, request_id, op, args)

    async def _run_request(self, request_id: Any, op: str, args: dict[str, Any]) -> None:
        handler = self.server.handlers.get(op)
        try:
            if handler is None:
                raise ControlError(p.UNKNOWN_OP, f"unknown operation {op!r}")
            result = await handler(self, args)
        except ControlError as exc:
            await self.send(exc.reply(request_id))
            return
        except Exception as exc:  # a bug in a handler must not take the agent down
            log.exception("control request %r failed", op)
            await self.send(ControlError(p.INTERNAL, f"internal error: {exc}").reply(request_id))
            return
        await self.send(p.ok(request_id, result))

    # -- raw mode --------------------------------------------------------------------

    async def _attach(self, request_id: Any, args: dict[str, Any]) -> None:
        try:
            t = self.server.find(args)
            mode = p.arg_required_str(args, "mode")
            if mode == "write":
                if t.direction != "out" or t.kind != "stream":
                    raise ControlError(p.CONFLICT, "only an outbound stream can be written")
            elif mode == "read":
                if t.direction != "in" or t.kind != "stream":
                    raise ControlError(p.CONFLICT, "only an incoming stream can be read")
            else:
                raise ControlError(p.INVALID_ARGUMENT, "mode must be 'write' or 'read'")
            if t.terminal:
                raise ControlError(p.CONFLICT, f"transfer is already {t.state.value}")
            if t.attached:
                raise ControlError(p.CONFLICT, "another connection is attached to this transfer")
        except ControlError as exc:
            await self.send(exc.reply(request_id))
            return
        t.attached = True
        t.claimed = True
        await self.send(p.ok(request_id, t.info()))
        self.raw = _Raw(t, mode)

    async def _serve_raw(self, raw: _Raw) -> None:
        t = raw.transfer
        rt = self.book.runtime(t)
        if raw.mode == "read":
            assert rt.inp is not None
            rt.inp.attach(self.stream)
            await rt.finished.wait()
            if t.state is State.DONE:
                await self.stream.aclose()  # clean EOF means: verified and complete
            return
        pipe = rt.out
        assert pipe is not None
        async with trio.open_nursery() as nursery:
            # An idle writer gets its final frame the moment the transfer ends, not
            # when it next writes: the pump below is cancelled when that happens.
            async def pump() -> None:
                with contextlib.suppress(PipeAborted):
                    await self._pump_writer(t, pipe, self.decoder.take_rest())
                await rt.finished.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump)
            await rt.finished.wait()
            nursery.cancel_scope.cancel()
        name = "transfer.done" if t.state is State.DONE else f"transfer.{t.state.value}"
        await self.send({"event": name, "data": t.info()})
        await self._writer(until_drained=True)

    async def _end_of_writer(self, t: Transfer, pipe: OutboundPipe) -> None:
        """EOF from the writer: a finished stream, or a writer that died?

        Both look the same to a read. A writer that half-closed is still there to
        read our answer; a dead one is not, and the write fails. Only the first
        ends the stream; the second cancels it, so the far side never takes a
        truncated stream for a complete one.
        """
        if t.terminal:
            return
        await self.send({"event": "stream.eof", "data": {"id": t.id, "bytes": pipe.accepted}})
        await self._writer(until_drained=True)
        if self.gone:
            self.book.cancel(t, "the writer disconnected without ending the stream")
            return
        pipe.end()

    async def _pump_writer(self, t: Transfer, pipe: OutboundPipe, first: bytes) -> None:
        """Client bytes into the spool; stop reading while it is full (back-pressure)."""
        pending = memoryview(first)
        while not t.terminal:
            if not pending:
                # Up to what the spool has room for: bytes read but not yet in the spool
                # stay within a READ_CHUNK, so a writer is held back where its spool
                # says, not a RAW_READ_CHUNK later.
                want = min(RAW_READ_CHUNK, max(READ_CHUNK, pipe.room))
                try:
                    data = await self.stream.receive_some(want)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    await self._end_of_writer(t, pipe)
                    return
                pending = memoryview(data)
            while pending and not t.terminal:
                taken = await pipe.write(pending)
                pending = pending[taken:]


Handler = Callable[[ClientConnection, dict[str, Any]], Awaitable[Any]]


def _ttl_arg(args: dict[str, Any]) -> int | None:
    """``ttl``: seconds or ``"2h"``; at least one second."""
    ttl = args.get("ttl")
    if ttl is None:
        return None
    try:
        return max(1, round(parse_duration(ttl)))
    except UnitError as exc:
        raise ControlError(p.INVALID_ARGUMENT, f"argument 'ttl': {exc}") from exc


def _seconds_arg(args: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    """An optional duration (datagram options): seconds or ``"250ms"``, in lo..hi."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ControlError(p.INVALID_ARGUMENT, f"argument {key!r} must be seconds or '250ms'")
    try:
        seconds = parse_duration(value)
    except UnitError as exc:
        raise ControlError(p.INVALID_ARGUMENT, f"argument {key!r}: {exc}") from exc
    if not lo <= seconds <= hi:
        raise ControlError(p.INVALID_ARGUMENT, f"argument {key!r} must be {lo:g}..{hi:g} seconds")
    return seconds


class ControlServer:
    def __init__(self, agent: AgentPort, book: TransferBook, path: Path) -> None:
        self.agent = agent
        self.book = book
        self.path = path
        self.handlers: dict[str, Handler] = {
            "ping": self.op_ping,
            "status": self.op_status,
            "identity": self.op_identity,
            "ls": self.op_ls,
            "get": self.op_get,
            "send_file": self.op_send_file,
            "open_stream": self.op_open_stream,
            "accept_incoming": self.op_accept_incoming,
            "wait": self.op_wait,
            "cancel": self.op_cancel,
            "subscribe": self.op_subscribe,
            "fetch": self.op_fetch,
            "ls_remote": self.op_ls_remote,
            "get_rate": self.op_get_rate,
            "set_rate": self.op_set_rate,
            "reload_identity": self.op_reload_identity,
            "datagram_send": self.op_datagram_send,
            "datagram_recv": self.op_datagram_recv,
        }

    async def serve(self, listener: trio.SocketListener | None = None, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; removes the socket file on the way out."""
        if listener is None:
            listener = self.bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(ClientConnection(self, stream).serve)
        finally:
            listener.socket.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def bind(self) -> trio.SocketListener:
        """Create the owner-only socket (separately, so start-up errors are plain errors)."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"control path {path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # stale socket left by an agent that died
                else:
                    raise FileExistsError(f"another agent is serving on {path}")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # owner-only from the first instant
        try:
            raw.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        raw.listen(LISTEN_BACKLOG)
        return trio.SocketListener(trio.socket.from_stdlib_socket(raw))

    # -- lookups -----------------------------------------------------------------------

    def _link(self, args: dict[str, Any], *keys: str) -> LinkPort:
        """The link a request addresses with ``keys[0]`` (or an alias): it may be left
        out while the agent has one peer."""
        name = None
        for key in keys:
            if args.get(key) is not None:
                name = args[key]
                problem = None if name == "" else peer_name_problem(name)
                if problem is not None:
                    raise ControlError(p.INVALID_ARGUMENT, f"argument {key!r}: peer name "
                                       f"{problem}")
                break
        try:
            return self.agent.link_named(name)
        except LookupError as exc:
            raise ControlError(p.UNKNOWN_PEER, str(exc.args[0])) from exc
        except ValueError as exc:
            raise ControlError(p.PEER_REQUIRED, f"{exc} with {keys[0]!r}") from exc

    def find(self, args: dict[str, Any]) -> Transfer:
        tid = p.arg_required_str(args, "id")
        t = self.book.get(tid)
        if t is None:
            raise ControlError(p.NOT_FOUND, f"no transfer {tid}")
        return t

# -- operations ----------------------------------------------------------------------

    async def op_ping(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        return {}

    async def op_status(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        return self.agent.status()

    async def op_identity(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        return {"fingerprint": self.agent.fingerprint}

    async def op_reload_identity(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        """Present the identity now in the state directory (after rotate / retire)."""
        try:
            return self.agent.reload_identity()
        except QuelayError as exc:  # the identity files are unusable: nothing changed
            raise ControlError(p.IO_ERROR, f"identity not reloaded: {exc}") from exc

    async def op_ls(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        """One page of transfers, newest first; ``next`` is the cursor of the following page."""
        limit = p.arg_int(args, "limit", LS_DEFAULT_LIMIT, 1, LS_MAX_LIMIT)
        cursor = p.arg_int(args, "cursor", 0, 0, 2**62)
        rest = self.book.table.newest_first(before=cursor or None)
        if args.get("peer") is not None:
            peer = self._link(args, "peer").name
            rest = [t for t in rest if t.peer == peer]
        page = rest[:limit]
        more = len(rest) > len(page)
        return {"transfers": [t.info() for t in page], "total": len(self.book.table),
                "next": page[-1].seq if more else None}

    async def op_get(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        return self.find(args).info()

    def _common(self, args: dict[str, Any]) -> tuple[int, dict[str, str]]:
        priority = p.arg_int(args, "priority", DEFAULT_PRIORITY, PRIORITY_RANGE.start,
                             PRIORITY_RANGE.stop - 1)
        attrs = args.get("attrs", {}) or {}
        problem = attrs_problem(attrs)
        if problem is not None:
            raise ControlError(p.INVALID_ARGUMENT, f"argument 'attrs' {problem}")
        return priority, dict(attrs)

    @staticmethod
    def _name(args: dict[str, Any], default: str) -> str:
        name = args.get("name")
        if name is None or name == "":
            return default
        problem = name_problem(name)
        if problem is not None:
            raise ControlError(p.INVALID_ARGUMENT, f"argument 'name' {problem}")
        assert isinstance(name, str)
        return name

    async def op_send_file(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        raw_path = p.arg_required_str(args, "path")
        if "\x00" in raw_path:
            raise ControlError(p.INVALID_ARGUMENT, "argument 'path' must not contain NUL")
        path = Path(raw_path)
        if not path.is_absolute():
            raise ControlError(p.INVALID_ARGUMENT, "argument 'path' must be absolute")
        priority, attrs = self._common(args)
        name = self._name(args, path.name)
        peer = self._link(args, "to").name
        try:
            safe_name_untrusted(name)  # the receiver applies the same rule
        except UnsafeNameError as exc:
            raise ControlError(p.INVALID_ARGUMENT, f"argument 'name': {exc}") from exc
        if path.is_dir() and not path.is_symlink():
            return self._send_directory(path, name, priority, attrs, args, peer)
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise ControlError(p.INVALID_ARGUMENT, f"{path} is not a regular file")
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ControlError(p.IO_ERROR, f"cannot read {path}: {exc.strerror}") from exc
        t = Transfer(new_transfer_id(), "out", "file", name, st.st_size, priority, attrs,
                     peer=peer)
        t.ttl = _ttl_arg(args)
        t.path = str(path)
        t.source = source_stat(t.path)
        self.book.submit(t)
        return t.info()

    def _send_directory(self, root: Path, name: str, priority: int, attrs: dict[str, str],
                        args: dict[str, Any], peer: str) -> Any:
        """A directory tree as one transfer: a directory record, then one file per file."""
        try:
            files, empty_dirs = walk_tree(root)
        except TreeError as exc:
            raise ControlError(p.INVALID_ARGUMENT, str(exc)) from exc
        except OSError as exc:
            raise ControlError(p.IO_ERROR, f"cannot read {root}: {exc.strerror}") from exc
        group = Transfer(new_transfer_id(), "out", "dir", name, sum(f.size for f in files),
                         priority, attrs, count=len(files), dirs=empty_dirs, peer=peer)
        group.path = str(root)
        group.ttl = _ttl_arg(args)
        self.book.submit(group)
        for f in files:
            member = Transfer(new_transfer_id(), "out", "file", f.rel, f.size, priority,
                              group=group.id, mode=f.mode, peer=peer)
            member.path = str(f.path)
            member.source = (f.size, f.mtime_ns, f.inode)
            self.book.submit(member)
        return group.info()

    async def op_open_stream(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        priority, attrs = self._common(args)
        name = self._name(args, "")
        spool_size = p.arg_int(args, "spool", self.agent.spool_size, 1024, 1 << 34)
        peer = self._link(args, "to").name
        t = Transfer(new_transfer_id(), "out", "stream", name, None, priority, attrs, peer=peer)
        self.book.submit(t, OutboundPipe(spool_size))
        return t.info()

    async def op_accept_incoming(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        """Claim the next unclaimed incoming stream; the claim ends if ``conn`` leaves first."""
        name = p.arg_str(args, "name")
        tid = p.arg_str(args, "id")
        # An id names one transfer (whoever sent it); otherwise the link must be known.
        peer = self._link(args, "from").name if tid is None else None
        book = self.book

        def takes(t: Transfer | None) -> bool:
            return (t is not None and t.direction == "in" and t.kind == "stream"
                    and not t.claimed and not t.terminal
                    and (name is None or t.name == name) and (peer is None or t.peer == peer))

        while True:
            # (Not a scan of every live transfer: each arrival wakes this, so with many
            # streams open that would make every open cost what is already open.)
            found = book.get(tid) if tid is not None else book.table.first_unattached_stream(takes)
            if found is not None and takes(found):
                found.claimed = True
                book.runtime(found).claim = conn
                return found.info()
            if tid is not None and tid in book.table:
                t = book.table.get(tid)
                assert t is not None
                if t.terminal or t.direction != "in" or t.kind != "stream":
                    raise ControlError(p.CONFLICT, f"transfer {tid} is {t.state.value} "
                                       "or not an incoming stream")
            await book.added.park()

    async def op_wait(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        t = self.find(args)
        await self.book.wait_finished(t)
        return t.info()

    async def op_cancel(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        t = self.find(args)
        if t.terminal:
            raise ControlError(p.CONFLICT, f"transfer is already {t.state.value}")
        if not self.book.cancel(t):
            raise ControlError(p.CONFLICT, "every byte was sent and announced: the transfer "
                               "now completes or fails on its own")
        return t.info()

    async def op_fetch(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        """Pull a file from the peer's export; it arrives like any incoming file."""
        name = p.arg_required_str(args, "name")
        export = p.arg_str(args, "export", "", limit=255) or ""
        priority = p.arg_int(args, "priority", DEFAULT_PRIORITY, PRIORITY_RANGE.start,
                             PRIORITY_RANGE.stop - 1)
        if "\x00" in name or name.startswith("/") or len(name.encode()) > 4096:
            raise ControlError(p.INVALID_ARGUMENT, "argument 'name' must be a relative path")
        peer = self._link(args, "from", "to").name
        t = Transfer(new_transfer_id(), "in", "file", PurePosixPath(name).name or name, None,
                     priority, peer=peer)
        t.fetch = (export, name)
        self.book.request_fetch(t)
        return t.info()

    async def op_ls_remote(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        link = self.book.links.get(self._link(args, "from", "to").name)
        if link is None or not link.ready:  # no session, or one held through an outage
            raise ControlError(p.LINK_DOWN, "the link is down: the peer's exports are unknown")
        try:
            return {"files": await link.list_remote()}
        except trio.TooSlowError as exc:
            raise ControlError(p.LINK_DOWN, "the peer did not answer the listing") from exc
        except ExportError as exc:
            raise ControlError(p.CONFLICT, f"the peer refused the listing: {exc}") from exc

    async def op_get_rate(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        return self.agent.rates()

    async def op_set_rate(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        rate = args.get("rate")
        if isinstance(rate, str):
            try:
                rate = parse_rate(rate)
            except UnitError as exc:
                raise ControlError(p.INVALID_ARGUMENT, str(exc)) from exc
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise ControlError(p.INVALID_ARGUMENT, "argument 'rate' must be bits/s or '2Mbps'")
        total = args.get("total", False)
        if not isinstance(total, bool):
            raise ControlError(p.INVALID_ARGUMENT, "argument 'total' must be true or false")
        if total and args.get("peer") is not None:
            raise ControlError(p.INVALID_ARGUMENT, "give 'peer' or 'total', not both")
        peer = None if total else self._link(args, "peer").name
        try:
            if total:
                self.agent.set_rate_total(rate)
            else:
                self.agent.set_rate(rate, peer)
        except ValueError as exc:
            raise ControlError(p.INVALID_ARGUMENT, str(exc)) from exc
        return self.agent.rates()

    # -- best-effort datagrams ------------------------------------------------------------

    def _datagram_service(self, args: dict[str, Any], key: str
                          ) -> tuple[DatagramService, str]:
        name = args.get("name")
        problem = datagram_name_problem(name)
        if problem is not None:
            raise ControlError(p.INVALID_ARGUMENT, f"argument 'name' {problem}")
        assert isinstance(name, str)
        return self._link(args, key).datagrams, name

    async def op_datagram_send(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        """Queue one best-effort datagram; the reply says whether it was accepted."""
        service, name = self._datagram_service(args, "to")
        data = args.get("data")
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, bytes):
            raise ControlError(p.INVALID_ARGUMENT, "argument 'data' must be bytes (bin) "
                               "or a string")
        max_age = _seconds_arg(args, "max_age", 0.0, DATAGRAM_MAX_AGE_LIMIT)
        if max_age == 0:
            raise ControlError(p.INVALID_ARGUMENT, "argument 'max_age' must be > 0 seconds")
        return service.send(name, data, max_age)

    async def op_datagram_recv(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        """Up to ``count`` datagrams named ``name``, once one is here (or ``timeout``)."""
        service, name = self._datagram_service(args, "from")
        count = p.arg_int(args, "count", 1, 1, DATAGRAM_RECV_MAX)
        timeout = _seconds_arg(args, "timeout", 0.0, 365 * 86400.0)
        got = await service.recv(name, count, timeout, DATAGRAM_RECV_BYTES)
        return {"messages": [{"name": m.name, "data": m.payload, "sent_at": m.sent_at,
                              "received_at": m.received_at} for m in got]}

    async def op_subscribe(self, conn: ClientConnection, args: dict[str, Any]) -> Any:
        sub = self.book.events.subscribe()

        async def forward() -> None:
            try:
                async for event in sub.receive:
                    await conn.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                sub.close()
            if sub.overflowed:
                await conn.send({"event": "subscription.overflow", "data": {}})

        assert conn.subscriptions is not None
        conn.subscriptions.start_soon(forward)
        return {}
