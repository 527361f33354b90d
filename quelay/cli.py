"""The ``quelay`` command line: ``run`` starts an agent, the rest are its clients."""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from .client import AgentUnavailable, Client, ClientError, open_client
from .units import format_rate, format_size, parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Relay files and streams between two sites over one QUIC link.",
)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "quelay"


def default_control() -> Path:
    return Path(os.environ.get("QUELAY_CONTROL") or default_state_dir() / "control.sock")


DEFAULT_CONTROL = default_control()
ControlOpt = Annotated[
    Path, typer.Option("--control", help="Agent control socket.", envvar="QUELAY_CONTROL")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"quelay: {message}", err=True)
    return typer.Exit(code)


def run_client(control: Path, fn: Any) -> Any:
    """Run ``fn(client)`` against the agent, turning client errors into exit codes."""

    async def main() -> Any:
        async with open_client(control) as client:
            return await fn(client)

    try:
        return trio.run(main)
    except AgentUnavailable as exc:
        raise fail(str(exc), 2) from exc
    except ClientError as exc:
        raise fail(str(exc), 1) from exc


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- run ------------------------------------------------------------------------------

RUN_KEYS = {
    "listen",
    "peer",
    "control",
    "state_dir",
    "inbox",
    "trust",
    "name",
    "spool",
    "log_level",
}


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise fail(f"config {path}: {exc}") from exc
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - RUN_KEYS)
    if unknown:
        raise fail(f"config {path}: unknown key {unknown[0]!r}")
    return data


@app.command()
def run(
    listen: Annotated[str | None, typer.Option(help="Accept the peer on HOST:PORT (UDP).")] = None,
    peer: Annotated[str | None, typer.Option(help="Dial the peer at HOST:PORT (UDP).")] = None,
    control: Annotated[Path | None, typer.Option(help="Control socket path.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Identity and state.")] = None,
    inbox: Annotated[Path | None, typer.Option(help="Where incoming files land.")] = None,
    trust: Annotated[
        list[str] | None,
        typer.Option(help="Pinned peer: sha256:<hex> or a certificate file (repeatable)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for this agent.")] = None,
    spool: Annotated[str | None, typer.Option(help="Per-stream spool size, e.g. 1MiB.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with these options.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning.")] = None,
) -> None:
    """Start an agent (runs until interrupted)."""
    from .agent import Agent, AgentConfig

    settings: dict[str, Any] = load_config_file(config) if config else {}
    given = {
        "listen": listen,
        "peer": peer,
        "control": control,
        "state_dir": state_dir,
        "inbox": inbox,
        "name": name,
        "spool": spool,
        "log_level": log_level,
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    if trust:
        settings["trust"] = list(trust)
    logging.basicConfig(
        level=str(settings.get("log_level", "info")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    state = Path(settings.get("state_dir") or default_state_dir())
    try:
        cfg = AgentConfig(
            state_dir=state,
            inbox=Path(settings.get("inbox") or state / "inbox"),
            control=Path(settings.get("control") or state / "control.sock"),
            listen=parse_hostport(settings["listen"]) if settings.get("listen") else None,
            peer=parse_hostport(settings["peer"]) if settings.get("peer") else None,
            trust=list(settings.get("trust", [])),
            name=str(settings.get("name", "")),
            spool_size=parse_size(settings.get("spool", "1MiB")),
        )
        agent = Agent(cfg)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    if not cfg.trust:
        typer.echo("quelay: warning: no --trust given; every peer will be refused", err=True)
    try:
        trio.run(agent.run)
    except KeyboardInterrupt:
        typer.echo("quelay: stopped", err=True)


# -- identity -------------------------------------------------------------------------


@app.command()
def identity(
    state_dir: Annotated[Path | None, typer.Option(help="Agent state directory.")] = None,
) -> None:
    """Print this agent's fingerprint (creating the identity on first use)."""
    from .identity import load_or_create_identity

    ident = load_or_create_identity(state_dir or default_state_dir())
    typer.echo(ident.fingerprint)


# -- transfers ------------------------------------------------------------------------


def _progress_line(info: dict[str, Any], rate: float) -> str:
    size = info.get("size")
    done = info.get("bytes", 0)
    pct = f" {100 * done / size:5.1f}%" if size else ""
    total = f"/{format_size(size)}" if size else ""
    return f"{info['name'] or info['id'][:8]}: {format_size(done)}{total}{pct} {format_rate(rate, zero='0 bit/s')}"


async def follow(client: Client, transfer_id: str, *, show: bool) -> dict[str, Any]:
    """Print progress until the transfer is terminal; return its final info."""
    async with trio.open_nursery() as nursery:
        result: dict[str, Any] = {}

        async def waiter() -> None:
            result.update(await client.wait(transfer_id))
            nursery.cancel_scope.cancel()

        async def progress() -> None:
            last_bytes, last_time = 0, trio.current_time()
            while True:
                await trio.sleep(0.5)
                info = await client.get(transfer_id)
                now = trio.current_time()
                rate = 8 * (info["bytes"] - last_bytes) / max(now - last_time, 1e-6)
                last_bytes, last_time = info["bytes"], now
                show_progress(_progress_line(info, rate))

        nursery.start_soon(waiter)
        if show:
            nursery.start_soon(progress)
    if show and sys.stderr.isatty():
        sys.stderr.write("\n")
    return result


def show_progress(line: str) -> None:
    """Update in place on a terminal; plain lines otherwise (logs, pipes)."""
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + "\x1b[K")
        sys.stderr.flush()
    else:
        print(line, file=sys.stderr, flush=True)


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(info))
    else:
        typer.echo(info["id"])


def _exit_for(info: dict[str, Any]) -> None:
    if info.get("state") != "done":
        err = info.get("error") or {}
        raise fail(
            f"transfer {info.get('id')} {info.get('state')}: "
            f"{err.get('code')}: {err.get('message')}"
        )


@app.command()
def send(
    file: Annotated[Path, typer.Argument(help="File to send.", exists=True, dir_okay=False)],
    control: ControlOpt = DEFAULT_CONTROL,
    priority: Annotated[int, typer.Option(min=0, max=15)] = 4,
    name: Annotated[str | None, typer.Option(help="Name at the far side.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the peer verified it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Send a file; prints its transfer id."""

    async def go(client: Client) -> dict[str, Any]:
        info = await client.send_file(file, priority=priority, name=name)
        if not wait:
            return info  # type: ignore[no-any-return]
        if not as_json:
            typer.echo(info["id"])
        return await follow(client, info["id"], show=not as_json)

    info = run_client(control, go)
    if wait:
        if as_json:
            typer.echo(json.dumps(info))
        _exit_for(info)
    else:
        _print_info(info, as_json)


@app.command()
def stream(
    control: ControlOpt = DEFAULT_CONTROL,
    name: Annotated[str | None, typer.Option(help="Stream name at the far side.")] = None,
    priority: Annotated[int, typer.Option(min=0, max=15)] = 4,
    as_json: JsonOpt = False,
) -> None:
    """Send standard input as an open-ended stream; exits 0 once every byte is acknowledged."""

    async def go(client: Client) -> dict[str, Any]:
        out = await client.open_stream(name=name, priority=priority)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            while data := await stdin.receive_some(65536):
                await out.send_all(data)
        return await out.finish()

    info = run_client(control, go)
    if as_json:
        typer.echo(json.dumps(info))
    _exit_for(info)


@app.command()
def recv(
    control: ControlOpt = DEFAULT_CONTROL,
    name: Annotated[str | None, typer.Option(help="Only a stream with this name.")] = None,
    transfer_id: Annotated[str | None, typer.Option("--id", help="Only this transfer.")] = None,
) -> None:
    """Write the next matching incoming stream to standard output."""

    async def go(client: Client) -> dict[str, Any]:
        incoming = await client.accept_incoming(name=name, transfer_id=transfer_id)
        stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
        async with stdout:
            async for chunk in incoming:
                await stdout.send_all(chunk)
        return await client.wait(incoming.id)

    _exit_for(run_client(control, go))


@app.command()
def status(control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False) -> None:
    """Show the agent's link and counters."""
    info = run_client(control, lambda c: c.status())
    if as_json:
        typer.echo(json.dumps(info))
        return
    link = info["link"]
    typer.echo(f"agent   {info['agent']} ({info['role']}, udp {info['udp']})")
    typer.echo(f"link    {link['state']} {link.get('reason') or ''}".rstrip())
    typer.echo(f"peer    {link.get('peer')}")
    if link.get("rtt") is not None:
        typer.echo(f"rtt     {link['rtt'] * 1000:.1f} ms  cwnd {format_size(link['cwnd'])}")
    wire_ = info.get("wire") or {}
    typer.echo(
        f"wire    sent {format_size(wire_.get('bytes_sent', 0))}, "
        f"received {format_size(wire_.get('bytes_received', 0))}"
    )
    typer.echo(
        "transfers " + (", ".join(f"{k} {v}" for k, v in info["transfers"].items()) or "none")
    )


@app.command()
def ls(control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False) -> None:
    """List transfers."""
    transfers = run_client(control, lambda c: c.ls())
    if as_json:
        typer.echo(json.dumps(transfers))
        return
    for t in transfers:
        size = format_size(t["size"]) if t["size"] is not None else "?"
        typer.echo(
            f"{t['id']}  {t['direction']:3} {t['kind']:6} {t['state']:8} "
            f"p{t['priority']:<2} {format_size(t['bytes'])}/{size}  {t['name']}"
        )


@app.command()
def cancel(
    transfer_id: str, control: ControlOpt = DEFAULT_CONTROL, as_json: JsonOpt = False
) -> None:
    """Cancel a transfer (both sides release it)."""
    info = run_client(control, lambda c: c.cancel(transfer_id))
    _print_info(info, as_json)


@app.command()
def demo(
    size: Annotated[str, typer.Option(help="Size of the demo file and stream.")] = "16MiB",
    keep: Annotated[bool, typer.Option(help="Keep the temporary directory.")] = False,
) -> None:
    """Start two agents on loopback, send a file and a stream, verify both."""
    from .demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ok = trio.run(run_demo, parse_size(size), keep)
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
