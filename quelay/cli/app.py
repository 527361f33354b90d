"""The ``quelay`` command line: ``run`` starts an agent, the rest are its clients.

Client commands are thin: each is a few calls into :mod:`quelay.client`
(and :mod:`quelay.cli.watch` for what is drawn), so the CLI and the Python API
never disagree.

Exit codes: 0 success; 1 the request was refused or the transfer did not
complete (failed, canceled) or a setting is invalid; 2 no agent answers on
the control socket (and command-line usage errors); 130 interrupted.
With ``--json`` a command prints one JSON document on standard output (for
errors too: ``{"ok": false, "error": {"code", "message"}}``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Annotated, Any, NamedTuple, Optional

import trio
import typer

from ..client import AgentUnavailable, Client, ClientError, open_client
from ..units import UnitError, format_rate, format_size, parse_rate, parse_size
from . import config as cfgmod
from .config import ConfigError, default_state_dir
from .logs import setup_logging
from .watch import ProgressPrinter, named_peers, run_watch

log = logging.getLogger("quelay.cli")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Relay files and streams between two sites over one QUIC link.",
)
config_app = typer.Typer(no_args_is_help=True, help="Check settings and list every key.")
app.add_typer(config_app, name="config")

__all__ = ["app", "main", "default_state_dir", "default_control", "parse_hostport"]


def default_control() -> Path:
    return Path(os.environ.get("QUELAY_CONTROL") or default_state_dir() / "control.sock")


DEFAULT_CONTROL = default_control()
ControlOpt = Annotated[
    Path, typer.Option("--control", help="Agent control socket.", envvar="QUELAY_CONTROL")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")]
ToOpt = Annotated[str | None, typer.Option(
    "--to", metavar="NAME", help="The peer to send to, by name (a hub; not needed with one "
    "peer).")]
FromOpt = Annotated[str | None, typer.Option(
    "--from", metavar="NAME", help="Only from this peer, by name (a hub; not needed with one "
    "peer).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"quelay: {message}", err=True)
    return typer.Exit(code)


def _json_out(value: Any) -> None:
    typer.echo(json.dumps(value))


def run_client(control: Path, fn: Callable[[Client], Awaitable[Any]], *,
               as_json: bool = False) -> Any:
    """Run ``fn(client)`` against the agent, turning client errors into exit codes."""

    async def main() -> Any:
        async with open_client(control) as client:
            return await fn(client)

    try:
        return trio.run(main)
    except AgentUnavailable as exc:
        if as_json:
            _json_out({"ok": False, "error": {"code": "agent_unavailable", "message": str(exc)}})
        raise fail(f"{exc} (is the agent running? see --control)", 2) from exc
    except ClientError as exc:
        if as_json:
            _json_out({"ok": False, "error": {"code": exc.code, "message": exc.message}})
        raise fail(str(exc), 1) from exc
    except UnitError as exc:
        raise fail(str(exc), 1) from exc
    except KeyboardInterrupt as exc:
        raise fail("interrupted", 130) from exc


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as the command line takes it (kept for scripts importing it)."""
    try:
        return cfgmod.parse_address(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


# -- run ------------------------------------------------------------------------------


async def serve_agent(agent: Any) -> str | None:
    """Run ``agent`` until it ends or SIGTERM/SIGINT stops it cleanly; the signal name."""
    stopped_by: str | None = None
    signals_ok = threading.current_thread() is threading.main_thread()
    with (trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) if signals_ok
          else _no_signals()) as signals:
        async with trio.open_nursery() as nursery:

            async def agent_main(*, task_status: trio.TaskStatus[None]) -> None:
                await agent.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # the agent ended: stop waiting for signals

            await nursery.start(agent_main)
            host, port = agent.udp_address
            named = [p.name for p in agent.config.peers]
            total = agent.config.rate_total
            caps = (f"{len(named)} peers ({', '.join(named)}), "
                    + (f"total cap {format_rate(total)}" if total else "no total cap")
                    if named else f"rate cap {format_rate(agent.rate)}")
            log.info("agent ready: control socket %s, udp %s:%d, %s", agent.config.control,
                     host, port, caps)
            async for signum in signals:
                stopped_by = signal.Signals(signum).name
                log.info("received %s: stopping", stopped_by)
                await agent.shutdown(f"{agent.label} stopping ({stopped_by})")
                break
    return stopped_by


class _no_signals:
    """Stands in for a signal receiver off the main thread: never yields a signal."""

    def __enter__(self) -> _no_signals:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[int]:
        return self._never()

    async def _never(self) -> AsyncIterator[int]:
        await trio.sleep_forever()
        yield 0  # pragma: no cover


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _run_command(**options: Any) -> None:
    """Start an agent (runs until SIGTERM or SIGINT, then stops cleanly)."""
    from ..agent import Agent
    from ..errors import QuelayError

    config_file = options.pop("config", None) or os.environ.get(cfgmod.CONFIG_ENV) or None
    try:
        settings = cfgmod.load(Path(config_file) if config_file else None, flags=options)
    except ConfigError as exc:
        raise fail(f"config error: {exc}", 1) from exc
    setup_logging(settings.log_level, settings.log_format)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        agent = Agent(settings.agent)
    except (QuelayError, ValueError, OSError) as exc:
        raise fail(f"cannot start: {exc}", 1) from exc
    try:
        stopped_by = trio.run(serve_agent, agent)
    except KeyboardInterrupt:
        stopped_by = "SIGINT"
    except BaseException as exc:  # an agent that cannot start says why, in one line
        leaf = _leaf(exc)
        if isinstance(leaf, QuelayError | OSError | ValueError):
            what = "agent failed" if agent.ready.is_set() else "cannot start"
            raise fail(f"{what}: {leaf}", 1) from exc
        raise
    log.info("agent stopped%s", f" ({stopped_by})" if stopped_by else "")


METAVARS = {"path": "PATH", "address": "HOST:PORT", "trust": "PIN", "list": "VALUE",
            "str": "TEXT", "choice": "NAME", "size": "SIZE", "rate": "RATE", "count": "N",
            "seconds": "SECONDS", "bool": "BOOL", "fraction": "FRACTION"}
# Flags that also take a hub's NAME=VALUE form (repeatable).
NAMED_METAVARS = {"trust": "[NAME=]PIN", "peer": "[NAME=]HOST:PORT", "rate": "[NAME=]RATE"}


def _build_run_command() -> Callable[..., None]:
    """``quelay run`` with one option per setting (derived from AgentConfig)."""
    params = []
    for s in cfgmod.settings().values():
        if not s.flags:
            continue  # peers: set by --trust/--peer/--rate NAME=VALUE
        repeatable = s.kind in ("trust", "list") or s.key in cfgmod.NAMED_KEYS
        annotation: Any = Optional[list[str]] if repeatable else Optional[str]  # noqa: UP045
        metavar = NAMED_METAVARS.get(s.key) or METAVARS.get(s.kind, "VALUE")
        params.append(inspect.Parameter(
            s.key, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
            default=typer.Option(None, *s.flags, help=f"{s.help} (env {s.env})",
                                 metavar=metavar, show_default=False)))
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
        default=typer.Option(None, "--config", metavar="FILE", help="TOML file with these "
                             f"settings, keys as the option names (env {cfgmod.CONFIG_ENV})")))

    def run(**options: Any) -> None:
        _run_command(**options)

    run.__doc__ = (
        "Start an agent (runs until SIGTERM or SIGINT, then stops cleanly).\n\n"
        "Settings come from --config FILE, then QUELAY_<KEY> environment variables, "
        "then these flags (highest). Sizes take units (1MiB), rates are bits/s (2Mbps), "
        "durations seconds (5, 250ms).")
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


app.command("run")(_build_run_command())


# -- config ---------------------------------------------------------------------------


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="TOML settings file.")],
    env: Annotated[bool, typer.Option("--env/--no-env",
                                      help="Apply QUELAY_* variables too.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Validate a settings file and print the effective settings (exit 1 if invalid)."""
    try:
        settings = cfgmod.load(file, env=os.environ if env else {})
    except ConfigError as exc:
        if as_json:
            _json_out({"ok": False, "error": {"code": exc.code, "key": exc.key,
                                              "message": str(exc)}})
        raise fail(f"config error: {exc}", 1) from exc
    for warning in settings.warnings:
        typer.echo(f"quelay: warning: {warning}", err=True)
    if as_json:
        _json_out({"ok": True, "settings": cfgmod.to_dict(settings),
                   "warnings": settings.warnings})
    else:
        typer.echo(f"# {file}: valid. Effective settings (value  # source):")
        typer.echo(cfgmod.to_toml(settings), nl=False)


@config_app.command("keys")
def config_keys(as_json: JsonOpt = False) -> None:
    """List every setting: key, kind, flag, environment variable, default."""
    rows = []
    for s in cfgmod.settings().values():
        default = cfgmod.plain_value(s, s.default)
        rows.append({"key": s.key, "kind": s.kind, "flags": list(s.flags), "env": s.env,
                     "default": default, "help": s.help})
    if as_json:
        _json_out(rows)
        return
    for r in rows:
        if r["default"] is None:
            default = "(derived)" if r["key"] in ("state_dir", "inbox", "control") else "-"
        else:
            default = json.dumps(r["default"])
        flags = "/".join(r["flags"]) or "NAME=... forms"  # peers: --trust/--peer/--rate
        typer.echo(f"{r['key']:<20} {r['kind']:<8} {flags:<28} "
                   f"{r['env'] or '-':<28} {default:<10} {r['help']}")


# -- identity -------------------------------------------------------------------------


identity_app = typer.Typer(help="This agent's identity: print it (no subcommand), rotate it, "
                                "retire the previous one.")
app.add_typer(identity_app, name="identity")
StateDirOpt = Annotated[Path | None, typer.Option(help="Agent state directory.")]


@identity_app.callback(invoke_without_command=True)
def identity(ctx: typer.Context, state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Print this agent's fingerprint (creating the identity on first use)."""
    from ..errors import QuelayError
    from ..identity import load_or_create_identity

    if ctx.invoked_subcommand is not None:
        return
    try:
        ident = load_or_create_identity(state_dir or default_state_dir())
    except (QuelayError, OSError) as exc:  # the state directory or the key is unusable
        raise fail(f"identity: {exc}", 1) from exc
    if as_json:
        _json_out({"fingerprint": ident.fingerprint, "certificate": str(ident.cert_path),
                   "previous": ident.previous_fingerprint})
    else:
        typer.echo(ident.fingerprint)
        if ident.previous_fingerprint:
            typer.echo(f"# previous {ident.previous_fingerprint} (overlap: quelay identity "
                       "retire ends it)", err=True)


def _identity_change(change: Callable[[Path], Any], state_dir: Path | None,
                     control: Path | None) -> tuple[Any, str]:
    """Apply ``change`` to the state directory, then ask a running agent to reload."""
    from ..errors import QuelayError

    directory = state_dir or default_state_dir()
    try:
        result = change(directory)
    except (QuelayError, OSError) as exc:
        raise fail(f"identity: {exc}", 1) from exc
    socket_path = control or (directory / "control.sock" if state_dir else default_control())

    async def reload() -> str:
        try:
            async with open_client(socket_path) as client:
                await client.request("reload_identity")
        except AgentUnavailable:
            return "no agent running: it uses this identity from its next start"
        except ClientError as exc:
            return f"the running agent did not reload: {exc}"
        return "the running agent presents it to new connections now"

    return result, trio.run(reload)


@identity_app.command("rotate")
def identity_rotate(state_dir: StateDirOpt = None,
                    control: Annotated[Path | None, typer.Option(
                        "--control", help="Control socket of a running agent to reload "
                        "(default STATE_DIR/control.sock).")] = None,
                    as_json: JsonOpt = False) -> None:
    """New key and certificate; the previous identity stays valid (overlap) until retired.

    Pin the new fingerprint at the peer, rotate, then retire (docs/operations.md).
    """
    from ..identity import rotate_identity

    ident, agent = _identity_change(rotate_identity, state_dir, control)
    if as_json:
        _json_out({"fingerprint": ident.fingerprint, "previous": ident.previous_fingerprint,
                   "agent": agent})
    else:
        typer.echo(ident.fingerprint)
        typer.echo(f"# previous {ident.previous_fingerprint} still accepted by peers that pin "
                   f"it; {agent}", err=True)


@identity_app.command("retire")
def identity_retire(state_dir: StateDirOpt = None,
                    control: Annotated[Path | None, typer.Option(
                        "--control", help="Control socket of a running agent to reload "
                        "(default STATE_DIR/control.sock).")] = None,
                    as_json: JsonOpt = False) -> None:
    """Delete the previous identity: from now on only the new fingerprint is presented."""
    from ..identity import retire_identity

    retired, agent = _identity_change(retire_identity, state_dir, control)
    if as_json:
        _json_out({"retired": retired, "agent": agent})
    else:
        typer.echo(retired)
        typer.echo(f"# retired; {agent}", err=True)


# -- transfers ------------------------------------------------------------------------


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _json_out(info)
    else:
        typer.echo(info["id"])


def _exit_for(info: dict[str, Any]) -> None:
    if info.get("state") != "done":
        err = info.get("error") or {}
        raise fail(
            f"transfer {info.get('id')} {info.get('state')}: "
            f"{err.get('code')}: {err.get('message')}"
        )


def _parse_attrs(attrs: list[str] | None) -> dict[str, str] | None:
    if not attrs:
        return None
    out = {}
    for item in attrs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--attr")
        out[key] = value
    return out


AttrOpt = Annotated[list[str] | None, typer.Option("--attr", help="KEY=VALUE (repeatable).")]


async def follow(client: Client, transfer_id: str, *, show: bool) -> dict[str, Any]:
    """Show progress (stderr) until the transfer is terminal; its final info."""
    printer = ProgressPrinter(sys.stderr) if show else None
    final = await client.track(transfer_id, printer.update if printer else None)
    if printer is not None:
        printer.finish(final)
    return final


@app.command()
def send(
    file: Annotated[Path, typer.Argument(help="File (or directory tree) to send.",
                                         exists=True, dir_okay=True)],
    control: ControlOpt = DEFAULT_CONTROL,
    priority: Annotated[int, typer.Option(min=0, max=15)] = 4,
    name: Annotated[str | None, typer.Option(help="Name at the far side.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the peer verified it.")] = False,
    attr: AttrOpt = None,
    ttl: Annotated[str | None, typer.Option(
        help="Time to live at the receiver (e.g. 3600, 90m, 2h, 7d): deleted from its inbox "
             "that long after it arrived.")] = None,
    to: ToOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Send a file; prints its transfer id (with --wait: progress, then the verdict)."""
    attrs = _parse_attrs(attr)

    async def go(client: Client) -> dict[str, Any]:
        info = await client.send_file(file, priority=priority, name=name, attrs=attrs, ttl=ttl,
                                      peer=to)
        if not wait:
            return info
        if not as_json:
            typer.echo(info["id"])
        return await follow(client, info["id"], show=not (as_json or quiet))

    info = run_client(control, go, as_json=as_json)
    if wait:
        if as_json:
            _json_out(info)
        _exit_for(info)
    else:
        _print_info(info, as_json)


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="A file in the peer's export (see ls --remote); "
                                        "EXPORT/PATH when the peer offers several.")],
    control: ControlOpt = DEFAULT_CONTROL,
    from_peer: Annotated[str | None, typer.Option(
        "--from", metavar="PEER", help="The peer to fetch from, by name (a hub; not needed "
        "with one peer).")] = None,
    export: Annotated[str, typer.Option(help="The peer's export to fetch from.")] = "",
    priority: Annotated[int, typer.Option(min=0, max=15)] = 4,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it arrived, verified.")] = False,
    output: Annotated[Path | None, typer.Option(
        help="Once verified, move it here from the inbox (never overwriting; implies --wait).")
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Pull a file from the peer's export; it lands like any incoming file (atomic, verified)."""
    if output is not None:
        wait = True
        output = output.absolute()
        if output.exists():
            raise typer.BadParameter(f"{output} exists; quelay never overwrites")

    async def go(client: Client) -> dict[str, Any]:
        info = await client.fetch(name, export=export, priority=priority, peer=from_peer)
        if not wait:
            return info
        if not as_json:
            typer.echo(info["id"])
        return await follow(client, info["id"], show=not (as_json or quiet))

    info = run_client(control, go, as_json=as_json)
    if output is not None and info.get("state") == "done" and info.get("path"):
        os.link(info["path"], output)  # fails rather than replaces an existing file
        os.unlink(info["path"])
        info["path"] = str(output)
    if wait:
        if as_json:
            _json_out(info)
        _exit_for(info)
    else:
        _print_info(info, as_json)


async def _stdin_chunks(size: int = 65536) -> AsyncIterator[bytes]:
    """Standard input as chunks without blocking the Trio loop (fd or file object)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None:
        async with trio.lowlevel.FdStream(os.dup(fd)) as stdin:
            while data := await stdin.receive_some(size):
                yield data
        return
    source: Any = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin

    def read() -> bytes:
        data = source.read(size)
        return data if isinstance(data, bytes) else data.encode()

    while data := await trio.to_thread.run_sync(read):
        yield data


@app.command()
def stream(
    control: ControlOpt = DEFAULT_CONTROL,
    name: Annotated[str | None, typer.Option(help="Stream name at the far side.")] = None,
    priority: Annotated[int, typer.Option(min=0, max=15)] = 4,
    attr: AttrOpt = None,
    to: ToOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Send standard input as an open-ended stream; exits 0 once every byte is acknowledged.

    Interrupting it (Ctrl-C) cancels the stream at both ends: the far side
    never mistakes a cut stream for a complete one.
    """
    attrs = _parse_attrs(attr)
    show = not (as_json or quiet)

    async def go(client: Client) -> dict[str, Any]:
        printer = ProgressPrinter(sys.stderr) if show else None
        async with await client.open_stream(name=name, priority=priority, attrs=attrs,
                                            peer=to) as out:
            if not as_json and not quiet:
                typer.echo(f"stream {out.id}", err=True)
            async with trio.open_nursery() as nursery:
                if printer is not None:

                    async def progress() -> None:
                        assert printer is not None
                        while True:
                            await trio.sleep(0.5)
                            printer.written = out.sent
                            printer.update(await client.get(out.id))

                    nursery.start_soon(progress)
                async for data in _stdin_chunks():
                    await out.send_all(data)
                final = await out.finish()
                nursery.cancel_scope.cancel()
        if printer is not None:
            printer.finish(final)
        return final

    info = run_client(control, go, as_json=as_json)
    if as_json:
        _json_out(info)
    _exit_for(info)


@app.command()
def recv(
    control: ControlOpt = DEFAULT_CONTROL,
    name: Annotated[str | None, typer.Option(help="Only a stream with this name.")] = None,
    transfer_id: Annotated[str | None, typer.Option("--id", help="Only this transfer.")] = None,
    from_peer: FromOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the final transfer info as JSON on standard error.")] = False,
) -> None:
    """Write the next matching incoming stream to standard output."""

    async def go(client: Client) -> dict[str, Any]:
        incoming = await client.accept_incoming(name=name, transfer_id=transfer_id,
                                                peer=from_peer)
        async with incoming, trio.lowlevel.FdStream(os.dup(sys.stdout.fileno())) as stdout:
            try:
                async for chunk in incoming:
                    await stdout.send_all(chunk)
            except ClientError as exc:
                # The agent reset the stream: the final info below says why.
                log.debug("stream %s aborted: %s", incoming.id, exc)
        return await incoming.wait()

    info = run_client(control, go)
    if as_json:
        typer.echo(json.dumps(info), err=True)
    _exit_for(info)


# -- datagram ---------------------------------------------------------------------------

datagram_app = typer.Typer(
    no_args_is_help=True,
    help="Best-effort datagrams: small named messages that go ahead of bulk data, are "
         "dropped rather than sent late (max age) and are never retransmitted.")
app.add_typer(datagram_app, name="datagram")
DatagramNameOpt = Annotated[str, typer.Option(
    "--name", help="The datagram name (1..64 UTF-8 bytes); readers ask for it.")]
DATAGRAM_LINE_MAX = 65536  # a longer line is refused as too big (no path carries it)


@datagram_app.command("send")
def datagram_send(
    name: DatagramNameOpt,
    message: Annotated[Optional[str], typer.Argument(  # noqa: UP045
        help="The message (sent as UTF-8); without it, standard input.")] = None,
    lines: Annotated[bool, typer.Option(
        "--lines", help="Standard input carries one message per line (sent as each "
                        "line arrives; the newline is not sent).")] = False,
    max_age: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--max-age", help="Drop a message that cannot leave within this long (e.g. 500ms; "
                          "default: the agent's datagram_max_age).")] = None,
    to: ToOpt = None,
    control: ControlOpt = DEFAULT_CONTROL,
    as_json: JsonOpt = False,
) -> None:
    """Send MESSAGE (or standard input, whole or --lines) as best-effort datagrams.

    Never waits for the link: a message the path cannot carry, or sent while the
    link is down, is refused at once (on standard error, or in the --json line);
    exits 1 if any was refused.
    """
    if message is not None and lines:
        raise fail("give MESSAGE or --lines, not both", 2)

    async def go(client: Client) -> int:
        refused = 0

        async def one(data: bytes) -> None:
            nonlocal refused
            result = await client.datagram_send(name, data, max_age=max_age, check=False,
                                                peer=to)
            if as_json:
                _json_out(result)
            if not result["accepted"]:
                refused += 1
                if not as_json:
                    typer.echo(f"quelay: datagram refused ({result['reason']}): "
                               f"{result['message']}", err=True)

        if message is not None:
            await one(message.encode("utf-8"))
        elif not lines:
            await one(b"".join([chunk async for chunk in _stdin_chunks()]))
        else:
            pending = b""
            async for chunk in _stdin_chunks():
                *complete, pending = (pending + chunk).split(b"\n")
                for line in complete:
                    await one(line.removesuffix(b"\r"))
                if len(pending) > DATAGRAM_LINE_MAX:  # refused as too big, not buffered on
                    await one(pending)
                    pending = b""
            if pending:
                await one(pending.removesuffix(b"\r"))
        return refused

    if run_client(control, go, as_json=as_json):
        raise typer.Exit(1)


def _datagram_doc(msg: dict[str, Any]) -> dict[str, Any]:
    """One received datagram as JSON: the payload as text if it is UTF-8, else base64."""
    import base64

    data: bytes = msg["data"]
    try:
        payload, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {"name": msg["name"], "payload": payload, "encoding": encoding,
            "sent_at": msg["sent_at"], "received_at": msg["received_at"],
            "age": msg["received_at"] - msg["sent_at"]}


@datagram_app.command("recv")
def datagram_recv(
    name: DatagramNameOpt,
    count: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--count", min=1, help="Exit after N messages (default: run until interrupted).")
    ] = None,
    timeout: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--timeout", help="Stop after this long (e.g. 10s); exits 1 if fewer than --count "
                          "messages came.")] = None,
    from_peer: FromOpt = None,
    control: ControlOpt = DEFAULT_CONTROL,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per message and line: name, payload, encoding "
                       "(utf-8 or base64), sent_at, received_at, age.")] = False,
) -> None:
    """Print datagrams named NAME as they arrive: each payload and a newline."""
    try:
        seconds = None if timeout is None else cfgmod.parse_seconds(timeout)
    except ValueError as exc:
        raise fail(f"--timeout: {exc}", 2) from exc

    async def go(client: Client) -> int:
        got = 0
        end = None if seconds is None else trio.current_time() + seconds
        out = sys.stdout.buffer
        while count is None or got < count:
            left = None if end is None else end - trio.current_time()
            if left is not None and left <= 0:
                break
            want = 256 if count is None else min(256, count - got)
            for msg in await client.datagram_recv(name, count=want, timeout=left,
                                                  peer=from_peer):
                if as_json:
                    out.write(json.dumps(_datagram_doc(msg)).encode() + b"\n")
                else:
                    out.write(msg["data"] + b"\n")
                got += 1
            out.flush()
        return got

    got = run_client(control, go, as_json=as_json)
    if count is not None and got < count:
        raise fail(f"{got} of {count} datagrams arrived within {timeout}", 1)


def _wire_line(wire_: dict[str, Any]) -> str:
    return (f"sent {format_size(wire_.get('wire_bytes_sent', 0))} "
            f"(payload {format_size(wire_.get('bytes_sent', 0))}), "
            f"received {format_size(wire_.get('bytes_received', 0))}")


def _link_wire_line(wire_: dict[str, Any]) -> str:
    """One link's counters: what its gate let out (a link's received bytes are not
    counted apart: the socket's are, in the agent's ``wire``)."""
    payload = wire_.get("payload_bytes_sent", wire_.get("bytes_sent", 0))
    text = (f"sent {format_size(wire_.get('wire_bytes_sent', 0))} "
            f"(payload {format_size(payload)})")
    if "bytes_received" in wire_:
        text += f", received {format_size(wire_['bytes_received'])}"
    return text


def _counts(transfers: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in transfers.items()) or "none"


def status_lines(info: dict[str, Any]) -> list[str]:
    """``quelay status`` as text: the link, or on a hub the total cap and every peer."""
    link = info["link"]
    lines = [f"agent   {info['agent']} ({info['role']}, udp {info['udp']})"]
    peers = named_peers(info)
    wire_ = info.get("wire") or {}
    if not peers:
        lines.append(f"link    {link['state']} {link.get('reason') or ''}".rstrip())
        lines.append(f"peer    {link.get('peer')}")
    if info.get("rendezvous"):
        rv = info["rendezvous"]
        refused = f", refused: {rv['refusal']}" if rv["refusal"] else ""
        lines.append(f"path    {info.get('path') or '-'} (rendezvous {rv['relay']}, "
                     f"session {rv['session']}{refused})")
    if peers:
        lines.append(f"total   cap {format_rate(int(info.get('rate_total') or 0))}, "
                     f"wire now {format_rate(int(wire_.get('rate') or 0), zero='0 bit/s')}; "
                     f"{_wire_line(wire_)}")
        for p in peers:
            plink, pwire = p.get("link") or {}, p.get("wire") or {}
            reason = f": {plink['reason']}" if plink.get("reason") else ""
            rtt = (f"  rtt {plink['rtt'] * 1000:.1f} ms" if plink.get("rtt") is not None
                   else "")
            lines.append(f"peer    {p['name']}  {plink.get('state', '?')}{reason}{rtt}")
            lines.append(f"        cap {format_rate(int(p.get('rate') or 0))}, effective "
                         f"{format_rate(int(p.get('effective_rate') or 0))}, wire now "
                         f"{format_rate(int(pwire.get('rate') or 0), zero='0 bit/s')}; "
                         f"{plink.get('peer') or 'not met yet'}")
            lines.append(f"        {_link_wire_line(pwire)}; transfers "
                         f"{_counts(p.get('transfers') or {})}")
    else:
        if link.get("rtt") is not None:
            lines.append(f"rtt     {link['rtt'] * 1000:.1f} ms  cwnd {format_size(link['cwnd'])}")
        if "rate" in info:
            lines.append(
                f"cap     {format_rate(info['rate'])}"
                + (f"  (wire now {format_rate(wire_['rate'], zero='0 bit/s')}, payload "
                   f"{format_rate(wire_.get('payload_rate', 0), zero='0 bit/s')})"
                   if wire_.get("rate") is not None else ""))
        lines.append(f"wire    {_wire_line(wire_)}")
    lines.append("transfers " + _counts(info["transfers"]))
    if info.get("datagrams"):
        dg = info["datagrams"]
        dropped = {r: dg[f"dropped_{r}"] for r in ("late", "too_big", "link_down", "queue_full",
                                                    "unread") if dg.get(f"dropped_{r}")}
        lines.append(f"datagrams sent {dg['sent']}, delivered {dg['delivered']}, dropped "
                     + (", ".join(f"{n} {r}" for r, n in dropped.items()) or "0"))
    return lines


@app.command()
def status(control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False) -> None:
    """Show the agent's link (on a hub: every peer's), cap and counters."""
    info = run_client(control, lambda c: c.status(), as_json=as_json)
    if as_json:
        _json_out(info)
        return
    for line in status_lines(info):
        typer.echo(line)


def ls_lines(transfers: list[dict[str, Any]]) -> list[str]:
    """``quelay ls`` rows; a PEER column when any transfer has a named peer (a hub)."""
    width = max((len(t.get("peer") or "") for t in transfers), default=0)
    lines = []
    for t in transfers:
        size = format_size(t["size"]) if t["size"] is not None else "?"
        peer = f"{t.get('peer') or '-':<{width}}  " if width else ""
        lines.append(
            f"{t['id']}  {peer}{t['direction']:3} {t['kind']:6} {t['state']:8} "
            f"p{t['priority']:<2} {format_size(t['bytes'])}/{size}  {t['name']}"
            + ("  expired" if t.get("expired") else
               f"  expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(t['expires']))}"
               if t.get("expires") else "")
        )
    return lines


@app.command()
def ls(control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False,
       limit: Annotated[int, typer.Option("--limit", min=1,
                                          help="Show the newest N transfers.")] = 100,
       show_all: Annotated[bool, typer.Option("--all", help="Every transfer the agent keeps "
                                              "(fetched page by page).")] = False,
       remote: Annotated[bool, typer.Option("--remote", help="The peer's exported files "
                                            "(name, size, modification time).")] = False,
       peer: Annotated[str | None, typer.Option(
           "--peer", "--from", metavar="NAME", help="Only this peer's transfers (with "
           "--remote: whose exports; a hub; not needed with one peer).")] = None) -> None:
    """List transfers, newest first (with --remote: the files the peer exports)."""
    if remote:
        files = run_client(control, lambda c: c.ls_remote(peer=peer), as_json=as_json)
        if as_json:
            _json_out(files)
            return
        for f in files:
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(f["mtime"]))
            typer.echo(f"{f['export']}/{f['name']}  {format_size(f['size'])}  {stamp}")
        return

    async def fetch(c: Client) -> tuple[list[dict[str, Any]], int, bool]:
        if show_all:
            items = await c.ls(peer=peer)
            return items, len(items), False
        page = await c.ls_page(0, min(limit, 500), peer=peer)
        items = page["transfers"]
        if limit > 500:
            items = await c.ls(limit, peer=peer)
        more = page.get("next") is not None and len(items) < int(page.get("total", 0))
        return items, int(page.get("total", len(items))), more

    transfers, total, more = run_client(control, fetch, as_json=as_json)
    if as_json:
        _json_out(transfers)
        return
    for line in ls_lines(transfers):
        typer.echo(line)
    if peer is not None and more:  # "total" counts every peer's transfers
        typer.echo(f"... older transfers of {peer} not shown (--all shows them)")
    elif peer is None and total > len(transfers):
        typer.echo(f"... {total - len(transfers)} older transfers not shown (--all shows them)")


@app.command()
def get(
    transfer_id: str, control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False
) -> None:
    """Show one transfer."""
    info = run_client(control, lambda c: c.get(transfer_id), as_json=as_json)
    if as_json:
        _json_out(info)
        return
    for key, value in info.items():
        typer.echo(f"{key:<10} {value}")


@app.command()
def wait(
    transfer_id: str, control: ControlOpt = DEFAULT_CONTROL, quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Wait until a transfer ends; exit 0 only if it is done (delivered and verified)."""
    info = run_client(control, lambda c: follow(c, transfer_id, show=not (quiet or as_json)),
                      as_json=as_json)
    if as_json:
        _json_out(info)
    _exit_for(info)


@app.command()
def cancel(
    transfer_id: str, control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False
) -> None:
    """Cancel a transfer (both sides release it)."""
    info = run_client(control, lambda c: c.cancel(transfer_id), as_json=as_json)
    _print_info(info, as_json)


class RateArgs(NamedTuple):
    """What ``quelay rate`` was asked: show (``bps`` None) or set, and which cap."""

    peer: str | None  # a named link's cap; None: the sole link's, or the total
    bps: int | None  # None: show
    total: bool  # the cap shared by every link (rate_total)


def _bps(text: str) -> int:
    try:
        return parse_rate(text)
    except UnitError as exc:
        raise ValueError(f"rate: {exc}") from exc


def rate_args(args: list[str], total: bool, peers: Collection[str]) -> RateArgs:
    """``quelay rate [NAME] [RATE] [--total]`` -> RateArgs; ValueError says what is wrong.

    One argument is a configured peer's name if it is one (``peers``), else a rate.
    """
    from ..agent.peerspec import peer_name_problem

    if len(args) > 2:
        raise ValueError("give at most NAME and RATE")
    if total:
        if len(args) > 1:
            raise ValueError("--total takes a RATE only: the total is not a peer's")
        return RateArgs(None, _bps(args[0]) if args else None, True)
    if len(args) == 2:
        name, value = args
        problem = peer_name_problem(name)
        if problem is not None:
            raise ValueError(f"NAME: {problem}")
        return RateArgs(name, _bps(value), False)
    if not args:
        return RateArgs(None, None, False)
    (one,) = args
    named = sorted(p for p in peers if p)
    if one in named:
        return RateArgs(one, None, False)
    try:
        return RateArgs(None, parse_rate(one), False)
    except UnitError as exc:
        if named and peer_name_problem(one) is None:
            raise ValueError(f"{one!r} is neither a peer ({', '.join(named)}) nor a rate: "
                             f"{exc}") from exc
        raise ValueError(f"rate: {exc}") from exc


def rate_lines(rates: dict[str, Any]) -> list[str]:
    """Every cap: the sole link's as today, or on a hub the total and each link's."""
    peers = {k: v for k, v in (rates.get("peers") or {}).items() if k}
    if not peers:
        return [format_rate(int(rates["rate"]))]
    width = max(len("total"), *(len(name) for name in peers))
    lines = [f"{'total':<{width}}  {format_rate(int(rates.get('rate_total') or 0))}"]
    for name, link in peers.items():
        lines.append(f"{name:<{width}}  {format_rate(int(link['rate'])):<12} (effective "
                     f"{format_rate(int(link.get('effective') or 0))})")
    return lines


@app.command()
def rate(
    args: Annotated[list[str] | None, typer.Argument(
        metavar="[NAME] [RATE]", show_default=False,
        help="RATE: a new cap, e.g. 2Mbps, 500kbit/s, 0 (uncapped); NAME: a hub's peer "
             "(its link's cap). One argument is a peer's name if the agent has such a "
             "peer, else a rate.")] = None,
    total: Annotated[bool, typer.Option(
        "--total", help="Show or set the cap shared by every link (rate_total; 0 = none).")]
    = False,
    control: ControlOpt = DEFAULT_CONTROL,
    as_json: JsonOpt = False,
) -> None:
    """Show or set wire rate caps (bits per second; 0 = uncapped).

    quelay rate: every cap. quelay rate RATE: the sole link's. quelay rate NAME
    [RATE]: a hub's link to NAME. quelay rate --total [RATE]: the cap shared by
    every link.
    """
    words = list(args or [])
    if len(words) > 2:
        raise fail("rate: give at most NAME and RATE", 2)

    async def go(client: Client) -> tuple[RateArgs, dict[str, Any]]:
        known: Collection[str] = ()
        if len(words) == 1 and not total:
            known = (await client.rates()).get("peers") or {}
        plan = rate_args(words, total, known)
        if plan.bps is not None:
            try:
                await client.set_rate(plan.bps, plan.peer, total=plan.total)
            except ClientError as exc:
                if exc.code != "peer_required":
                    raise
                raise ClientError(exc.code, f"{exc.message} (quelay rate NAME RATE: one "
                                  "link's cap; quelay rate --total RATE: the total)") from exc
        return plan, await client.rates()

    try:
        plan, rates = run_client(control, go, as_json=as_json)
    except ValueError as exc:
        if as_json:
            _json_out({"ok": False, "error": {"code": "invalid_argument", "message": str(exc)}})
        raise fail(str(exc), 1) from exc
    if plan.total:
        doc: dict[str, Any] = {"rate_total": int(rates.get("rate_total") or 0)}
        lines = [format_rate(doc["rate_total"])]
    elif plan.peer is not None:
        link = (rates.get("peers") or {}).get(plan.peer) or {}
        doc = {"peer": plan.peer, "rate": link.get("rate"), "effective": link.get("effective")}
        lines = [f"{format_rate(int(link.get('rate') or 0))} (effective "
                 f"{format_rate(int(link.get('effective') or 0))})"]
    else:
        doc = rates
        lines = rate_lines(rates) if plan.bps is None else [format_rate(int(rates["rate"]))]
    if as_json:
        _json_out(doc)
    else:
        for line in lines:
            typer.echo(line)


def health_report(status_: dict[str, Any], name: str | None) -> dict[str, Any]:
    """``{"link", "reason", "links"?}`` from a status: one link, every link, or NAME's."""
    peers = named_peers(status_)
    if not peers and name is None:
        return {"link": status_["link"]["state"],
                "reason": status_["link"].get("reason") or None}
    links = {p["name"]: {"state": (p.get("link") or {}).get("state"),
                         "reason": (p.get("link") or {}).get("reason") or None} for p in peers}
    if name is not None:
        if name not in links:
            known = ", ".join(links) or "none: this agent has one unnamed peer"
            return {"link": None, "reason": f"no peer named {name!r} (peers: {known})",
                    "links": links}
        return {"link": links[name]["state"], "reason": links[name]["reason"],
                "links": links}
    down = [(n, link) for n, link in links.items() if link["state"] != "up"]
    if not down:
        return {"link": "up", "reason": None, "links": links}
    first, link = down[0]
    why = f": {link['reason']}" if link["reason"] else ""
    return {"link": link["state"], "reason": f"{first} {link['state']}{why}"
            + (f" (and {len(down) - 1} more)" if len(down) > 1 else ""), "links": links}


@app.command()
def health(
    name: Annotated[str | None, typer.Argument(
        metavar="[NAME]", show_default=False,
        help="A hub's peer: healthy only while the link to it is up (implies --link).")]
    = None,
    control: ControlOpt = DEFAULT_CONTROL,
    link: Annotated[bool, typer.Option(
        "--link", help="Healthy only while the link is up (on a hub: every link, or NAME's).")]
    = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Exit 0 if the agent answers (with --link: and its link is up); for healthchecks.

    Exit codes: 0 healthy; 1 the agent answers but the link is not up (--link;
    on a hub: some link, or NAME's, or there is no peer NAME); 2 no agent answers
    on the control socket within --timeout.
    """

    async def probe() -> dict[str, Any]:
        with trio.move_on_after(timeout):
            async with open_client(control) as client:
                return await client.status()
        raise AgentUnavailable(f"agent on {control} did not answer within {timeout:g} s")

    report: dict[str, Any] = {"ok": False, "agent": False, "link": None, "reason": None}
    code = 0
    try:
        status_ = trio.run(probe)
    except (AgentUnavailable, ClientError) as exc:
        report["error"] = str(exc)
        code = 2
    else:
        report["agent"] = True
        report.update(health_report(status_, name))
        code = 1 if (link or name is not None) and report["link"] != "up" else 0
    report["ok"] = code == 0
    links = report.get("links") or {}
    where = "link" if name is None else f"link {name}"
    if as_json:
        _json_out(report)
    elif code == 2:
        typer.echo(f"unhealthy: {report['error']}", err=True)
    elif code == 1:
        why = f": {report['reason']}" if report["reason"] else ""
        state = "" if report["link"] is None else f" {report['link']}"
        typer.echo(f"unhealthy: agent answers, {where}{state}{why}", err=True)
    elif links and name is None:
        typer.echo("ok: agent answers, links "
                   + ", ".join(f"{n} {v['state']}" for n, v in links.items()))
    else:
        typer.echo(f"ok: agent answers, {where} {report['link']}")
    raise typer.Exit(code)


@app.command()
def watch(
    control: ControlOpt = DEFAULT_CONTROL,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.05)] = 1.0,
    count: Annotated[int | None, typer.Option(help="Stop after this many refreshes.",
                                              min=1)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per refresh (status, transfers, rates).")] = False,
) -> None:
    """Live view of the link and every transfer, updated in place (Ctrl-C to quit)."""

    async def go(client: Client) -> int:
        return await run_watch(client, sys.stdout, interval=interval, count=count,
                               as_json=as_json)

    try:
        run_client(control, go, as_json=as_json)
    except typer.Exit as exc:
        if exc.exit_code == 130:  # Ctrl-C is how one leaves a live view
            raise typer.Exit(0) from None
        raise


@app.command()
def events(
    control: ControlOpt = DEFAULT_CONTROL,
    count: Annotated[int | None, typer.Option(help="Stop after this many events.",
                                              min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Events are always JSON lines; "
                                          "accepted for uniformity.")] = True,
) -> None:
    """Print the agent's events as JSON lines, as they happen."""

    async def go(client: Client) -> None:
        seen = 0
        async for event in client.events():
            typer.echo(json.dumps(event))
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return

    try:
        run_client(control, go)
    except typer.Exit as exc:
        if exc.exit_code == 130:
            raise typer.Exit(0) from None
        raise


# -- rendezvous relay -----------------------------------------------------------------


@app.command("rendezvous")
def rendezvous_command(
    listen: Annotated[str, typer.Option("--listen", metavar="HOST:PORT",
                                        help="UDP address the agents register with.")],
    secret_file: Annotated[Path, typer.Option("--secret-file", metavar="FILE",
                                              help="Shared secret (both agents hold it).")],
    session_timeout: Annotated[float, typer.Option(
        "--session-timeout", metavar="SECONDS", min=1.0,
        help="An agent idle this long is dropped from its session.")] = 60.0,
    max_sessions: Annotated[int, typer.Option("--max-sessions", metavar="N", min=1,
                                              help="Sessions the table holds.")] = 1024,
    stats_interval: Annotated[float, typer.Option(
        "--stats-interval", metavar="SECONDS", min=0.0,
        help="Seconds between counter lines on the log; 0 disables.")] = 10.0,
    control: Annotated[Path | None, typer.Option(
        "--control", metavar="PATH", help="Unix socket serving the counters "
        "(quelay rendezvous-status).")] = None,
    as_json: JsonOpt = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, "
                                           "error.")] = "info",
) -> None:
    """Run the rendezvous relay: agents behind NAT meet here (see docs/rendezvous.md)."""
    from ..rendezvous.protocol import RelayLimits
    from ..rendezvous.server import RendezvousServer, read_secret

    address = parse_hostport(listen)
    try:
        setup_logging(log_level, "json" if as_json else "human")
        secret = read_secret(secret_file)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot start: {exc}", 1) from exc
    server = RendezvousServer(address, secret, control=control, stats_interval=stats_interval,
                              limits=RelayLimits(max_sessions=max_sessions,
                                                 session_timeout=session_timeout))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return
    except OSError as exc:
        raise fail(f"rendezvous: {exc}", 1) from exc


@app.command("rendezvous-status")
def rendezvous_status(
    control: Annotated[Path, typer.Option("--control", metavar="PATH",
                                          help="The relay's --control socket.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a running rendezvous relay's sessions and counters."""
    from ..rendezvous.server import read_status

    try:
        info = trio.run(read_status, control)
    except (OSError, ValueError) as exc:
        raise fail(f"no rendezvous relay answers on {control}: {exc}", 2) from exc
    if as_json:
        _json_out(info)
        return
    typer.echo(f"relay      udp {info['listen']}  up {info['uptime']:.0f} s  "
               f"cpu {info['cpu_seconds']:.2f} s")
    typer.echo(f"sessions   {info['sessions']} ({info['paired']} paired), "
               f"{info['registrations']} registrations, {info['moves']} moves")
    typer.echo(f"relayed    {info['relayed_datagrams']} datagrams, "
               f"{format_size(info['relayed_bytes'])}; dropped {info['dropped_datagrams']}")
    refusals = {k: v for k, v in info["refusals"].items() if v}
    typer.echo("refusals   " + (", ".join(f"{k} {v}" for k, v in refusals.items()) or "none"))


# -- link simulator -------------------------------------------------------------------


@app.command()
def linksim(
    listen: Annotated[str, typer.Option(help="HOST:PORT the dialling agent sends to.",
                                        envvar="QUELAY_LINKSIM_LISTEN")] = "127.0.0.1:0",
    upstream: Annotated[str | None, typer.Option(help="HOST:PORT of the listening agent.",
                                                 envvar="QUELAY_LINKSIM_UPSTREAM")] = None,
    profile: Annotated[str, typer.Option(help="NAME[,key=value...]: clean, LOS-250ms, "
                                         "BLOS-750ms, Degraded-BLOS.",
                                         envvar="QUELAY_LINKSIM_PROFILE")] = "clean",
    outage: Annotated[list[str] | None, typer.Option(
        metavar="START:SECONDS", help="Scheduled outage, seconds after start (repeatable).")]
    = None,
    stats: Annotated[Path | None, typer.Option(metavar="FILE",
                                               help="Write stats JSON here.")] = None,
    seed: Annotated[int | None, typer.Option(help="RNG seed (default: random).")] = None,
    control: Annotated[Path | None, typer.Option(
        help="Unix socket for text commands (outage on|off|toggle, stats).")] = None,
    stats_interval: Annotated[float, typer.Option(
        help="Seconds between summaries and stats writes; 0 disables.")] = 5.0,
    list_profiles: Annotated[bool, typer.Option("--list-profiles",
                                                help="Print the profiles and exit.")] = False,
) -> None:
    """Run the link simulator: a UDP proxy that impairs traffic between two agents."""
    from ..linksim.command import parse_hostport as parse_sim_address
    from ..linksim.command import parse_outage, run_linksim
    from ..linksim.profiles import PROFILES, parse_profile

    if list_profiles:
        for pname, prof in PROFILES.items():
            typer.echo(f"{pname}: up={prof.up} down={prof.down}")
        return
    if not upstream:
        raise fail("--upstream: required (HOST:PORT of the listening agent)", 2)
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("--listen", lambda: parse_sim_address(listen)),
        ("--upstream", lambda: parse_sim_address(upstream)),
        ("--profile", lambda: parse_profile(profile)),
    ]
    values = []
    for option, check in checks:
        try:
            values.append(check())
        except ValueError as exc:
            raise fail(f"{option}: {exc}", 2) from exc
    outages = []
    for text in outage or []:
        try:
            outages.append(parse_outage(text))
        except ValueError as exc:
            raise fail(f"--outage: {exc}", 2) from exc
    try:
        trio.run(lambda: run_linksim(values[0], values[1], profile, outages, stats, seed,
                                     stats_interval, control_path=control))
    except KeyboardInterrupt:
        return
    except OSError as exc:
        raise fail(f"linksim: {exc}", 1) from exc


# -- demo -----------------------------------------------------------------------------


@app.command()
def demo(
    size: Annotated[str, typer.Option(help="Size of the demo file and stream.")] = "16MiB",
    keep: Annotated[bool, typer.Option(help="Keep the temporary directory.")] = False,
) -> None:
    """Start two agents on loopback, send a file and a stream, verify both."""
    from .demo import run_demo

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    ok = trio.run(run_demo, parse_size(size), keep)
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
