"""The ``quelay linksim`` / ``python -m quelay.linksim`` process.

Runs one proxy until cancelled (SIGINT, SIGTERM: clean stop), prints a one-line summary
every ``stats_interval`` seconds and writes the stats JSON periodically and
at exit. Run-time control:

* ``SIGUSR1`` toggles the manual outage, ``SIGUSR2`` writes the stats now;
* optionally a Unix stream socket (``control_path``) taking one text command
  per line and answering each with one JSON line: ``outage on``,
  ``outage off``, ``outage toggle``, ``outage`` (query), ``stats``,
  ``snapshot`` (stats plus histogram), ``help``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from .profiles import parse_profile, parse_seconds
from .proxy import Address, LinkSim, open_linksim

MAX_COMMAND = 1024


def parse_hostport(text: str) -> Address:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) -> ``(host, port)``."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = t.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:4433")
        if ":" in host:
            raise ValueError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {text!r}: {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in {text!r}: {port} is outside 0..65535")
    return host, port


def parse_outage(text: str) -> tuple[float, float]:
    """``"START:SECONDS"`` (seconds after start, duration) -> ``(start, duration)``.

    Units ``s`` / ``ms`` are accepted: ``"10:5"``, ``"2.5s:500ms"``.
    """
    start_text, sep, dur_text = text.strip().partition(":")
    if not sep:
        raise ValueError(f"bad outage {text!r}: expected START:SECONDS, e.g. 10:5")
    try:
        start, duration = parse_seconds(start_text), parse_seconds(dur_text)
    except ValueError as exc:
        raise ValueError(f"bad outage {text!r}: {exc}") from None
    if start < 0 or duration <= 0:
        raise ValueError(f"bad outage {text!r}: start must be >= 0 and duration > 0")
    return start, duration


def handle_command(sim: LinkSim, line: str) -> dict[str, Any]:
    """Execute one control command; never raises on bad input."""
    words = line.strip().lower().split()
    if words[:1] == ["outage"] and len(words) <= 2:
        arg = words[1] if len(words) == 2 else ""
        if arg in ("on", "off", "toggle"):
            sim.set_outage(not sim.model.manual_outage if arg == "toggle" else arg == "on")
        elif arg:
            return {"ok": False, "error": f"bad outage argument {arg!r} (on, off, toggle)"}
        return {"ok": True, "outage": sim.outage, "manual": sim.model.manual_outage}
    if words == ["stats"]:
        return {"ok": True, "outage": sim.outage, "stats": sim.stats.to_dict()}
    if words == ["snapshot"]:
        return {"ok": True, "snapshot": sim.snapshot()}
    if words == ["help"]:
        return {"ok": True, "commands": ["outage on", "outage off", "outage toggle", "outage",
                                         "stats", "snapshot", "help"]}
    return {"ok": False, "error": f"unknown command {line.strip()[:80]!r} (try: help)"}


async def _serve_control_connection(sim: LinkSim, stream: trio.SocketStream,
                                    log: Callable[[str], None]) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                reply = handle_command(sim, raw.decode("utf-8", "replace"))
                if "outage" in reply and raw.strip().lower().startswith(b"outage "):
                    log(f"outage {'on' if reply['outage'] else 'off'} (control socket)")
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if len(buf) > MAX_COMMAND:
                await stream.send_all(b'{"ok": false, "error": "command too long"}\n')
                return


async def serve_control(sim: LinkSim, path: Path, log: Callable[[str], None] = print, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the text control protocol on a Unix stream socket at ``path``."""
    if path.is_socket():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(8)
        listener = trio.SocketListener(sock)
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            await _serve_control_connection(sim, stream, log)

        await trio.serve_listeners(handler, [listener])
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def control_command(path: str | Path, command: str) -> dict[str, Any]:
    """Send one command to a running linksim's control socket; returns its reply."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(command.strip().encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


async def run_linksim(
    listen: Address,
    upstream: Address,
    profile_name: str,
    outages: list[tuple[float, float]],
    stats_path: Path | None,
    seed: int | None,
    stats_interval: float = 5.0,
    *,
    control_path: Path | None = None,
    out: TextIO | None = None,
    task_status: trio.TaskStatus[LinkSim] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled; see the module docstring for run-time control.

    ``profile_name`` may carry overrides (``"LOS-250ms,loss=1%"``, see
    :func:`~quelay.linksim.profiles.parse_profile`). ``seed=None`` picks one
    and prints it. ``stats_interval <= 0`` disables the periodic summary and
    writes. ``task_status.started(sim)`` fires once the proxy is bound.
    """
    profile = parse_profile(profile_name)
    stream = out if out is not None else sys.stdout

    def log(message: str) -> None:
        print(f"linksim: {message}", file=stream, flush=True)

    async with open_linksim(listen, upstream, profile=profile, seed=seed,
                            outages=outages) as sim:
        try:
            async with trio.open_nursery() as nursery:
                if threading.current_thread() is threading.main_thread():
                    await nursery.start(_signals, sim, stats_path, log, nursery.cancel_scope)
                if control_path is not None:
                    await nursery.start(serve_control, sim, control_path, log)
                if stats_interval > 0:
                    nursery.start_soon(_reporter, sim, stats_path, stats_interval, log)
                # printed once signals and the control socket are live: scripts may wait for it
                log(f"listening on {sim.address[0]}:{sim.address[1]} -> upstream "
                    f"{sim.upstream[0]}:{sim.upstream[1]}, profile {profile.name}, "
                    f"seed {sim.model.seed}, outages {outages or 'none'}"
                    + (f", control socket {control_path}" if control_path else ""))
                task_status.started(sim)
                await trio.sleep_forever()
        finally:
            if stats_path is not None:
                sim.write_stats(stats_path)
            log(f"stopped: {sim.summary()}")


async def _signals(sim: LinkSim, stats_path: Path | None, log: Callable[[str], None],
                   stop: trio.CancelScope, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    # SIGINT is handled here too (not as KeyboardInterrupt) so that a proxy started in the
    # background by a shell script, where SIGINT is inherited as ignored, still stops on it.
    handled = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)
    # Trio re-raises signals still pending when the receiver closes. Ignore them meanwhile,
    # so a SIGUSR1 arriving together with the stop signal can't kill us before the stats
    # are written (the default action of SIGUSR1 is to terminate).
    previous = {s: signal.getsignal(s) for s in handled}
    for s in handled:
        signal.signal(s, signal.SIG_IGN)
    try:
        with trio.open_signal_receiver(*handled) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    sim.set_outage(not sim.model.manual_outage)
                    log(f"outage {'on' if sim.model.manual_outage else 'off'} (SIGUSR1)")
                elif signum == signal.SIGUSR2:
                    if stats_path is not None:
                        sim.write_stats(stats_path)
                    log(sim.summary())
                else:
                    log(f"{signal.Signals(signum).name}: stopping")
                    stop.cancel()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


async def _reporter(sim: LinkSim, stats_path: Path | None, interval: float,
                    log: Callable[[str], None]) -> None:
    while True:
        await trio.sleep(interval)
        log(sim.summary())
        if stats_path is not None:
            sim.write_stats(stats_path)
