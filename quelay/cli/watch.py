"""Progress bars and the live view (``quelay watch``), as plain text renderers.

Rendering is pure (data in, lines out) so tests can check the text with a
fixed terminal size; the Trio loops around it only fetch data and write.

On a terminal a progress bar is redrawn in place (``\\r`` and erase to end
of line) and the live view repaints the screen from the top; elsewhere
(logs, pipes) progress is a plain line every few seconds and the live view
prints one frame per refresh separated by a blank line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from ..client import Client
from ..units import format_duration, format_rate, format_size

WATCH_LIMIT = 200  # the newest transfers a refresh fetches (one page: bounded by design)

CLEAR_LINE = "\x1b[K"
HOME = "\x1b[H"
CLEAR_BELOW = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"

STATE_ORDER = {"active": 0, "pending": 1, "failed": 2, "canceled": 3, "done": 4}


# -- numbers -----------------------------------------------------------------------------


class RateMeter:
    """Bits per second from successive byte counts, over a sliding time window."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, now: float, count: int) -> float | None:
        """Record ``count`` bytes at ``now``; the rate so far (None before two samples)."""
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.pop(0)
        return self.rate()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return max(0.0, 8 * (b1 - b0) / (t1 - t0))


def eta(info: dict[str, Any], rate_bps: float | None) -> float | None:
    """Seconds left for a transfer of known size at ``rate_bps``, else None."""
    size = info.get("size")
    if size is None or not rate_bps:
        return None
    left = max(0, size - int(info.get("bytes", 0)))
    return 8 * left / rate_bps


def bar(fraction: float, width: int) -> str:
    """``[=====>    ]`` of ``width`` characters in all (ASCII: fine in any log)."""
    inner = max(1, width - 2)
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * inner)
    body = "=" * inner if full >= inner else "=" * full + ">" + " " * (inner - full - 1)
    return f"[{body}]"


def _rate_text(rate_bps: float | None) -> str:
    return "-" if rate_bps is None else format_rate(rate_bps, zero="0 bit/s")


def _label(info: dict[str, Any]) -> str:
    return str(info.get("name") or info["id"][:8])


# -- progress bars (send --wait, stream) -------------------------------------------------


def progress_text(info: dict[str, Any], rate_bps: float | None, width: int = 80, *,
                  with_bar: bool = True, written: int | None = None) -> str:
    """One line about a transfer: bar and ETA when its size is known, bytes otherwise.

    ``written`` is, for an outbound stream, what the local writer has handed
    over so far (the bar cannot know the end of a stream, so it shows counts).
    """
    done = int(info.get("bytes", 0))
    size = info.get("size")
    name = _label(info)
    rate = _rate_text(rate_bps)
    if size:
        pct = 100 * done / size
        left = eta(info, rate_bps)
        tail = (f" {pct:5.1f}% {format_size(done)}/{format_size(size)} {rate}"
                f" ETA {format_duration(left) if left is not None else '-'}")
        if with_bar:
            room = width - len(name) - len(tail) - 2
            if room >= 12:
                return f"{name} {bar(done / size, min(room, 40))}{tail}"
        return f"{name}{tail}"
    parts = [name]
    if written is not None:
        parts.append(f"written {format_size(written)}")
    parts.append(f"acknowledged {format_size(done)}")
    parts.append(rate)
    return " ".join(parts)


class ProgressPrinter:
    """Shows a transfer's progress on ``stream``: in place on a TTY, plain lines otherwise.

    Plain lines come at most every ``plain_interval`` seconds (and once at the
    end, from :meth:`finish`), so a log is not flooded.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 plain_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_interval = plain_interval
        self.clock = clock
        self.meter = RateMeter()
        self._last_plain: float | None = None
        self._drawn = False
        self.written: int | None = None

    def _width(self) -> int:
        """The width of the terminal we draw on (stderr), not of stdout; COLUMNS wins."""
        if os.environ.get("COLUMNS", "").isdigit():
            return int(os.environ["COLUMNS"])
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return shutil.get_terminal_size((80, 24)).columns

    def update(self, info: dict[str, Any]) -> None:
        now = self.clock()
        rate = self.meter.add(now, int(info.get("bytes", 0)))
        if self.tty:
            width = self._width()
            line = progress_text(info, rate, width - 1, written=self.written)[: width - 1]
            self.stream.write("\r" + line + CLEAR_LINE)
            self.stream.flush()
            self._drawn = True
        elif self._last_plain is None or now - self._last_plain >= self.plain_interval:
            self._last_plain = now
            print(progress_text(info, rate, with_bar=False, written=self.written),
                  file=self.stream, flush=True)

    def finish(self, info: dict[str, Any]) -> None:
        """The final line: the terminal state, size and average figures."""
        state = info.get("state", "?")
        done = int(info.get("bytes", 0))
        elapsed = None
        if info.get("finished") and info.get("created"):
            elapsed = max(0.0, float(info["finished"]) - float(info["created"]))
        avg = f" in {format_duration(elapsed)}" if elapsed is not None else ""
        if elapsed:
            avg += f", {format_rate(8 * done / elapsed, zero='0 bit/s')}"
        line = f"{_label(info)}: {state}, {format_size(done)}{avg}"
        if info.get("error"):
            line += f" ({info['error'].get('code')}: {info['error'].get('message')})"
        if self.tty:
            self.stream.write("\r" + line + CLEAR_LINE + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# -- the live view -----------------------------------------------------------------------


def named_peers(status: dict[str, Any]) -> list[dict[str, Any]]:
    """A hub's per-peer status entries (empty for an agent with one unnamed peer)."""
    peers = status.get("peers") or []
    return peers if any(p.get("name") for p in peers) else []


def peer_key(name: str) -> str:
    """The key of a peer's wire-out rate in the rates of :meth:`WatchState.observe`."""
    return f"peer/{name}"


@dataclass
class WatchState:
    """What the live view remembers between refreshes (to turn counters into rates)."""

    transfer_meters: dict[str, RateMeter] = field(default_factory=dict)
    sent: RateMeter = field(default_factory=RateMeter)
    received: RateMeter = field(default_factory=RateMeter)
    wire_sent: RateMeter = field(default_factory=RateMeter)  # with IP/UDP headers
    peer_meters: dict[str, RateMeter] = field(default_factory=dict)  # a hub's links, wire out
    link_state: str | None = None
    link_since: float | None = None  # wall clock of the last link state change

    def observe(self, status: dict[str, Any], transfers: list[dict[str, Any]],
                now: float, wall: float) -> dict[str, float | None]:
        """Feed one refresh; returns ``{"sent", "received", "wire_sent", <transfer id>:
        rate}`` and on a hub ``peer_key(name)``: that link's wire-out rate."""
        rates: dict[str, float | None] = {}
        for p in named_peers(status):
            pwire = p.get("wire") or {}
            meter = self.peer_meters.setdefault(p["name"], RateMeter())
            rate = meter.add(now, int(pwire.get("wire_bytes_sent", 0)))
            if rate is None and pwire.get("rate") is not None:
                rate = float(pwire["rate"])
            rates[peer_key(p["name"])] = rate
        wire = status.get("wire") or {}  # the agent's socket: every link's datagrams
        rates["sent"] = self.sent.add(now, int(wire.get("bytes_sent", 0)))
        rates["received"] = self.received.add(now, int(wire.get("bytes_received", 0)))
        first = wire.get("payload_rate", wire.get("rate"))
        if rates["sent"] is None and first is not None:
            rates["sent"] = float(first)  # the agent's own 1-s window, first frame
        wire_total = wire.get("wire_bytes_sent", wire.get("bytes_sent", 0))  # older agents
        rates["wire_sent"] = self.wire_sent.add(now, int(wire_total))
        if rates["wire_sent"] is None and wire.get("rate") is not None:
            rates["wire_sent"] = float(wire["rate"])
        live = set()
        for t in transfers:
            live.add(t["id"])
            meter = self.transfer_meters.setdefault(t["id"], RateMeter())
            rates[t["id"]] = meter.add(now, int(t.get("bytes", 0)))
        for tid in list(self.transfer_meters):
            if tid not in live:
                del self.transfer_meters[tid]
        state = (status.get("link") or {}).get("state")
        if state != self.link_state:
            # Since when: known only for a change seen here, not for the first frame.
            self.link_since = wall if self.link_state is not None else None
            self.link_state = state
        return rates


def _fit(text: str, width: int) -> str:
    if len(text) <= width:
        return text.ljust(width)
    return text[: max(0, width - 1)] + "~" if width > 0 else ""


def _short_fp(fp: str | None) -> str:
    if not fp:
        return "-"
    return fp[:19] + "..." if len(fp) > 22 else fp


def _queue_position(t: dict[str, Any]) -> Any:
    for key in ("queue_position", "queue"):
        if t.get(key) is not None:
            return t[key]
    return None


def _progress_cell(t: dict[str, Any], width: int) -> str:
    done = int(t.get("bytes", 0))
    size = t.get("size")
    if size:
        pct = f"{100 * done / size:3.0f}%"
        figures = f" {pct} {format_size(done)}/{format_size(size)}"
        room = width - len(figures)
        if room >= 6:
            return bar(done / size, min(room, 22)) + figures
        return figures.strip()
    if t.get("kind") == "stream" and t.get("direction") == "out" and t.get("sent") is not None:
        return f"{format_size(done)} acked, {format_size(int(t['sent']))} sent"
    return format_size(done)


def render_watch(status: dict[str, Any], transfers: list[dict[str, Any]],
                 rates: Mapping[str, float | None], *, width: int = 100, height: int = 30,
                 wall: float | None = None, link_since: float | None = None) -> list[str]:
    """The live view as at most ``height`` lines of exactly ``width`` characters."""
    width, height = max(width, 40), max(height, 1)
    wall = time.time() if wall is None else wall
    lines: list[str] = []
    name = status.get("name") or "agent"
    clock = time.strftime("%H:%M:%S", time.localtime(wall))
    lines.append(f"quelay watch - {name} ({status.get('role', '?')}) "
                 f"{_short_fp(status.get('agent'))}  {clock}")
    peers = named_peers(status)
    if peers:
        lines.extend(_hub_lines(status, peers, rates))
    else:
        lines.extend(_link_lines(status, rates, wall, link_since))
    counts = status.get("transfers") or {}
    lines.append("transfers " + (", ".join(f"{k} {v}" for k, v in sorted(
        counts.items(), key=lambda kv: STATE_ORDER.get(kv[0], 9))) or "none"))
    lines.append("")

    # Table: fixed columns, NAME takes what is left; PEER when a transfer names one (a hub).
    peer_w = min(16, max((len(t.get("peer") or "") for t in transfers), default=0))
    peer_w = max(peer_w, 4) if peer_w else 0
    fixed = {"id": 8, "dir": 3, "pri": 3, "state": 8, "progress": 34, "rate": 12, "queue": 5}
    gaps = len(fixed) + (1 if peer_w else 0)  # one space between columns
    name_w = max(8, width - sum(fixed.values()) - peer_w - gaps)
    peer_head = f"{'PEER':<{peer_w}} " if peer_w else ""
    header = (f"{'ID':<8} {peer_head}{'NAME':<{name_w}} {'DIR':<3} {'PRI':>3} {'STATE':<8} "
              f"{'PROGRESS':<34} {'RATE':<12} {'QUEUE':>5}")
    lines.append(header)
    ordered = sorted(transfers, key=lambda t: (STATE_ORDER.get(t.get("state", ""), 9),
                                               -(t.get("finished") or t.get("created") or 0)))
    room = max(0, height - len(lines))
    shown = ordered if len(ordered) <= room else ordered[: max(0, room - 1)]
    for t in shown:
        queue = _queue_position(t)
        rate = rates.get(t["id"]) if t.get("state") == "active" else None
        peer_cell = f"{_fit(t.get('peer') or '-', peer_w)} " if peer_w else ""
        lines.append(
            f"{t['id'][:8]:<8} {peer_cell}{_fit(_label(t), name_w)} "
            f"{t.get('direction', '?'):<3} "
            f"{int(t.get('priority', 0)):>3} {_fit(str(t.get('state', '?')), 8)} "
            f"{_fit(_progress_cell(t, 34), 34)} {_fit(_rate_text(rate), 12)} "
            f"{'-' if queue is None else str(queue):>5}")
    if len(shown) < len(ordered):
        lines.append(f"... and {len(ordered) - len(shown)} more")
    if not transfers:
        lines.append("(no transfers)")
    return [_fit(line, width) for line in lines[:height]]


def _link_lines(status: dict[str, Any], rates: Mapping[str, float | None], wall: float,
                link_since: float | None) -> list[str]:
    """The one link of a single-peer agent: state, peer, RTT, cap and wire rates."""
    lines: list[str] = []
    link = status.get("link") or {}
    state = str(link.get("state", "?"))
    since = ""
    if link_since is not None:
        since = f" for {format_duration(max(0.0, wall - link_since))}"
    reason = f": {link['reason']}" if link.get("reason") else ""
    lines.append(f"link      {state.upper()}{since}{reason}")
    details = [f"peer {_short_fp(link.get('peer'))}"]
    if link.get("rtt") is not None:
        details.append(f"rtt {1000 * float(link['rtt']):.1f} ms")
    if link.get("cwnd") is not None:
        details.append(f"cwnd {format_size(int(link['cwnd']))}")
    if link.get("lost_packets"):
        details.append(f"lost {link['lost_packets']} pkts")
    lines.append("          " + "  ".join(details))
    cap = status.get("rate")
    cap_text = "?" if cap is None else format_rate(float(cap))
    wire = status.get("wire") or {}
    wire_out = rates.get("wire_sent", rates.get("sent"))
    lines.append(f"cap       {cap_text}   wire out {_rate_text(wire_out)}"
                 f" (payload {_rate_text(rates.get('sent'))})"
                 f"  in {_rate_text(rates.get('received'))}"
                 f"  (sent {format_size(int(wire.get('bytes_sent', 0)))},"
                 f" received {format_size(int(wire.get('bytes_received', 0)))})")
    return lines


def _hub_lines(status: dict[str, Any], peers: list[dict[str, Any]],
               rates: Mapping[str, float | None]) -> list[str]:
    """A hub: the total cap and wire rates, then one row per link."""
    wire = status.get("wire") or {}
    total = int(status.get("rate_total") or 0)
    lines = [f"total     cap {format_rate(total) if total else 'none'}"
             f"   wire out {_rate_text(rates.get('wire_sent', rates.get('sent')))}"
             f" (payload {_rate_text(rates.get('sent'))})"
             f"  in {_rate_text(rates.get('received'))}"
             f"  (sent {format_size(int(wire.get('bytes_sent', 0)))},"
             f" received {format_size(int(wire.get('bytes_received', 0)))})"]
    name_w = min(16, max(4, *(len(p["name"]) for p in peers)))
    lines.append(f"{'PEER':<{name_w}} {'LINK':<10} {'RTT':>9} {'CAP':>12} {'EFFECTIVE':>12} "
                 f"{'WIRE OUT':>12}  TRANSFERS")
    for p in peers:
        link = p.get("link") or {}
        rtt = f"{1000 * float(link['rtt']):.1f} ms" if link.get("rtt") is not None else "-"
        counts = p.get("transfers") or {}
        lines.append(
            f"{_fit(p['name'], name_w)} {_fit(str(link.get('state', '?')).upper(), 10)} "
            f"{rtt:>9} {format_rate(float(p.get('rate') or 0)):>12} "
            f"{format_rate(float(p.get('effective_rate') or 0)):>12} "
            f"{_rate_text(rates.get(peer_key(p['name']))):>12}  "
            + (", ".join(f"{k} {v}" for k, v in sorted(
                counts.items(), key=lambda kv: STATE_ORDER.get(kv[0], 9))) or "none")
            + (f"  ({link['reason']})" if link.get("state") != "up" and link.get("reason")
               else ""))
    return lines


def terminal_size() -> tuple[int, int]:
    """(columns, lines); ``COLUMNS`` / ``LINES`` in the environment override the tty."""
    size = shutil.get_terminal_size((100, 30))
    return size.columns, size.lines


async def run_watch(client: Client, out: TextIO, *, interval: float = 1.0,
                    count: int | None = None, tty: bool | None = None,
                    size: Callable[[], tuple[int, int]] = terminal_size,
                    as_json: bool = False) -> int:
    """Refresh the view every ``interval`` seconds (``count`` times, or until cancelled).

    Returns the number of frames drawn. On a TTY each frame repaints the
    screen in place; otherwise frames follow each other, separated by a blank
    line. ``as_json`` writes one object per refresh instead:
    ``{"time", "status", "transfers", "rates"}`` (rates in bits/s or null).
    """
    tty = False if as_json else (out.isatty() if tty is None else tty)
    state = WatchState()
    frames = 0
    if tty:
        out.write(HIDE_CURSOR + HOME + "\x1b[2J")
    try:
        while count is None or frames < count:
            status = await client.status()
            transfers = await client.ls(WATCH_LIMIT)
            wall = time.time()
            rates = state.observe(status, transfers, trio.current_time(), wall)
            if as_json:
                out.write(json.dumps({"time": wall, "status": status, "transfers": transfers,
                                      "rates": rates}) + "\n")
                out.flush()
                frames += 1
                if count is not None and frames >= count:
                    break
                await trio.sleep(interval)
                continue
            width, height = size()
            lines = render_watch(status, transfers, rates, width=width, height=height,
                                 wall=wall, link_since=state.link_since)
            if tty:
                out.write(HOME + "".join(line.rstrip() + CLEAR_LINE + "\r\n"
                                         for line in lines[:-1])
                          + lines[-1].rstrip() + CLEAR_LINE + CLEAR_BELOW)
            else:
                if frames:
                    out.write("\n")
                out.write("\n".join(line.rstrip() for line in lines) + "\n")
            out.flush()
            frames += 1
            if count is not None and frames >= count:
                break
            await trio.sleep(interval)
    finally:
        if tty:
            out.write("\r\n" + SHOW_CURSOR)
            out.flush()
    return frames
