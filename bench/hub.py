"""Hub benchmark (issue 17): one hub, 3 or 10 sites on mixed links, under a total cap.

    python bench/hub.py [--sites 3,10] [--seconds 60 | --quick] [--warm S]
                        [--total-fraction 0.6] [--cap-fraction 1] [--low-fraction 0.333]
                        [--outage S] [--cut NAME] [--profile SPEC ...] [--spool BYTES]
                        [--seed N] [--json FILE]
    python bench/hub.py --table FILE       # re-print a previous run's tables

Shape. Real UDP on loopback. The **hub** runs in its own process (this script
with ``--_hub``), so its CPU is its own: nothing else runs there (no client, no
simulator; only the bench's log of what it sends, one list append per
datagram), and its user and system time are read from ``/proc/PID/stat``. The
**sites** — ordinary single-peer agents that dial the hub — run in-process in
one other process (this script with ``--_case``), together with one in-process
link simulator per site (:func:`quelay.linksim.open_linksim`), the stream
writers (clients of the hub's control socket) and the readers (clients of each
site's). Every site dials the hub through its own simulator, so what the hub
sends to a site is the simulator's ``down`` direction (the profile's downlink
rate, delay, jitter and impairments), and the site's ACKs go ``up``.

Sites take the profiles BLOS-750ms, LOS-250ms, Degraded-BLOS in turn (s01
BLOS, s02 LOS, s03 Degraded, s04 BLOS, ...; ``--profile`` replaces the list).
Each hub link's own cap (``PeerSpec.rate``) is its downlink rate ×
``--cap-fraction``, except the last LOS site's, lowered to ``--low-fraction``
of that, so two kinds of capped links show the max-min redistribution (the
Degraded ones at their 150 kbit/s, and that one). The total cap
(``rate_total``) is ``--total-fraction`` of the sum of the link caps, so it
binds. Every link's expected share is :func:`quelay.core.share.max_min_shares`
of the total over the link caps (every link busy).

The hub sends one stream to every site at once, written without end (a
64-KiB block per site, repeated, as fast as the hub takes it); each site's
reader checks every byte against the block. Once every reader has bytes, a
warm-up (``--warm``), then ``--seconds`` of measurement. Per link, ratios to
its share:

* ``eff``, ``eff max`` — the rate the hub gave the link (its
  ``effective_rate``), time-weighted mean and highest over the window (the
  hub process logs every change). Max-min counts only *busy* links
  (``PeerLink.busy``: a transfer waits for bytes, QUIC holds unsent bulk, or
  one did within the last second), so while another link is not — e.g. every
  byte its stream may hold is in flight, waiting for ACKs — this one may get
  more than its share, up to its own cap;
* ``idle``      — the fraction of the window the hub saw this link not busy;
* ``send max``  — most bytes the hub handed to the kernel for that site in any
  window (t − 1 s, t] of the measurement, IP+UDP headers counted (the hub
  process times every ``send_batch``): what its gates enforce;
* ``wire max``  — the same at the simulator (what it received from the hub,
  headers counted, timed by its receive loop, ``quelay.linksim.measure``):
  what the link saw, the sites' process's scheduling jitter included;
* ``wire mean`` — what the simulator received over the window;
* ``good``      — payload delivered to the site's reader and verified, per
  second (a full datagram carries 0.954 of its wire bytes as stream payload,
  so that is the ceiling);
* ``max gap``   — the longest time the reader got nothing (window edges count);
* ``run max / cap`` — the simulator's 1-s maximum over the whole run
  (handshake, warm-up, outage) against the link's own cap;
* ``q-drops``, ``lost`` — the simulated link's queue overflows, the hub's QUIC
  loss count for that link.

The total row does the same against the total cap, summing every link at the
hub and at the simulators. The hub's CPU is user + system over the window: %
of one core, CPU-seconds per 100 MB of payload delivered, µs per datagram
sent; the sites' process (everything else) is shown too. The JSON file also
has each link's return traffic (``up_mean``, ``up_datagrams``: the site's
ACKs, at the simulator) and the hub's RTT and congestion window every 2 s.

``--outage S`` (default 15 s, 10 with ``--quick``; 0 = off): afterwards one
site's link (``--cut``, default s02, a LOS site) is cut at its simulator for S
seconds. The hub notices (liveness, ``dead_after``) and divides the total among
the others again; from 1 s after the hub reported the link down until the cut
ends, every other link is measured against its new share (``eff``, ``send
max``, ``wire mean``, ``good``, ``idle``), with its longest gap over the whole
cut; then the seconds until the cut site's stream delivers again (it resumes;
nothing is restarted).

``ok`` names misses: ``CAP`` (at the hub's sends: send max over 1.02 × the
highest rate the hub gave the link in the window, or over 1.02 × the link's
own cap anywhere in the run), ``CAP(sim)`` (over at the simulator only),
``SHARE`` (goodput under 0.93 of the share, 0.80 on Degraded-BLOS: a little
under what one link alone reaches at its cap, ``bench/links.py --quick`` in
docs/performance.md), ``EFF`` (the hub gave the link less than 0.99 of its
share on average), ``BYTES`` (a reader saw a wrong byte), ``STALL`` (a gap
over 5 s or 5 RTT). Not a test: the figures depend on the machine and its
load.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import heapq
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.agent import Agent, AgentConfig  # noqa: E402
from quelay.agent.peerspec import PeerSpec  # noqa: E402
from quelay.client import open_client  # noqa: E402
from quelay.core.codes import LinkState  # noqa: E402
from quelay.core.share import max_min_shares  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402
from quelay.linksim import LinkSim, open_linksim  # noqa: E402
from quelay.linksim.measure import Arrivals, max_window_bytes, run_isolated  # noqa: E402
from quelay.linksim.profiles import Profile, parse_profile  # noqa: E402

CYCLE = ["BLOS-750ms", "LOS-250ms", "Degraded-BLOS"]
CHUNK = 64 * 1024
TARGET_WIRE = 1.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


def good_target(profile: str) -> float:
    """What one link alone reaches at its cap (docs/performance.md, bench/links.py
    --quick: 0.94 on LOS-250ms and BLOS-750ms, 0.83 on Degraded-BLOS), less 0.01–0.03."""
    return 0.80 if profile.startswith("Degraded") else 0.93


def stall_limit(rtt: float) -> float:
    return max(5.0, 5 * rtt)


@dataclass
class Case:
    sites: int
    seconds: float
    warm: float
    total_fraction: float
    cap_fraction: float
    low_fraction: float
    outage: float
    cut: str
    seed: int
    congestion: str
    profiles: list[str] = field(default_factory=lambda: list(CYCLE))
    spool: int = 0  # each stream's spool (0: the agent's spool_size)


def plan(case: Case) -> tuple[list[dict[str, Any]], int]:
    """Every site (name, profile, link rate, own cap) and the total cap."""
    sites: list[dict[str, Any]] = []
    for i in range(case.sites):
        prof = parse_profile(case.profiles[i % len(case.profiles)])
        link = int(prof.down.rate_bps or 0)
        sites.append({"name": f"s{i + 1:02d}", "profile": prof.name, "link_rate": link,
                      "spec": case.profiles[i % len(case.profiles)],
                      "cap": int(link * case.cap_fraction)})
    los = [s for s in sites if s["profile"].startswith("LOS")]
    if los and case.low_fraction:
        los[-1]["cap"] = int(los[-1]["cap"] * case.low_fraction)
        los[-1]["low"] = True
    total = int(sum(s["cap"] for s in sites) * case.total_fraction)
    return sites, total


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def window_max(log: list[tuple[float, int]], t0: float, t1: float) -> int:
    """Most bytes in any 1-s window (t − 1, t] of the entries timed in [t0, t1]."""
    lo = bisect.bisect_left(log, (t0, -1))
    hi = bisect.bisect_right(log, (t1, math.inf))
    return max_window_bytes(log[lo:hi], 1.0) if hi > lo else 0


def window_sum(log: list[tuple[float, int]], t0: float, t1: float) -> int:
    lo = bisect.bisect_left(log, (t0, -1))
    hi = bisect.bisect_right(log, (t1, math.inf))
    return sum(n for _, n in log[lo:hi])


def window_count(log: list[tuple[float, int]], t0: float, t1: float) -> int:
    return bisect.bisect_right(log, (t1, math.inf)) - bisect.bisect_left(log, (t0, -1))


def rate_summary(changes: list[tuple[float, int, bool]], t0: float, t1: float
                 ) -> dict[str, Any]:
    """A link's effective rate over [t0, t1]: time-weighted mean, lowest, highest, how
    often it changed, and the fraction of the time the link was not busy."""
    if not changes:
        return {}
    i = max(0, bisect.bisect_right(changes, (t0, math.inf, True)) - 1)
    points = [(max(t0, changes[i][0]), changes[i][1], changes[i][2])]
    points += [c for c in changes[i + 1:] if c[0] <= t1]
    weighted = idle = 0.0
    for (t, rate, busy), nxt in zip(points, [p[0] for p in points[1:]] + [t1], strict=True):
        weighted += rate * (nxt - t)
        idle += 0.0 if busy else nxt - t
    return {"mean": weighted / (t1 - t0), "min": min(p[1] for p in points),
            "max": max(p[1] for p in points), "changes": len(points) - 1,
            "idle_fraction": idle / (t1 - t0)}


# ---- the hub's process ------------------------------------------------------------------


async def hub_main(spec: dict[str, Any]) -> None:
    """The hub alone: an agent, a send log, and a line protocol on stdin/stdout."""
    root = Path(spec["root"])
    peers = [PeerSpec(p["name"], trust=[p["fp"]], rate=p["cap"]) for p in spec["peers"]]
    cfg = AgentConfig(name="hub", state_dir=root / "hub" / "state", inbox=root / "hub" / "inbox",
                      control=root / "hub" / "c.sock", listen=("127.0.0.1", 0), peers=peers,
                      rate_total=spec["total"], congestion=spec["congestion"])
    agent = Agent(cfg)
    sends: dict[Any, list[tuple[float, int]]] = {}
    names: dict[Any, str] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert agent.sock is not None and agent.total_gate is not None
        per = agent.total_gate.per_datagram
        kernel_send = agent.sock.send_batch

        async def send_batch(datagrams: Any) -> None:
            batch = list(datagrams)
            now = time.monotonic()
            for data, addr in batch:
                log = sends.get(addr)
                if log is None:
                    log = sends[addr] = []
                log.append((now, len(data) + per))
            await kernel_send(batch)

        agent.sock.send_batch = send_batch  # type: ignore[method-assign]

        # Every change of a link's effective rate or busy flag, timed (the share is
        # divided again every 0.5 s and whenever a link comes or goes).
        shares: dict[str, list[tuple[float, int, bool]]] = {n: [] for n in agent.links}
        for name, link in agent.links.items():
            def apply_rate(rate_bps: int, name: str = name, link: Any = link,
                           original: Any = link.apply_rate) -> None:
                original(rate_bps)
                log = shares[name]
                busy = link.busy()
                if not log or log[-1][1:] != (link.effective_rate, busy):
                    log.append((time.monotonic(), link.effective_rate, busy))

            link.apply_rate = apply_rate  # type: ignore[method-assign]

        async def learn_names() -> None:
            while True:
                for name, link in agent.links.items():
                    if link.session is not None:
                        names[link.session.conn.peer] = name
                await trio.sleep(0.5)

        nursery.start_soon(learn_names)

        def report(t0: float, t1: float) -> dict[str, Any]:
            by_name: dict[str, list[tuple[float, int]]] = {}
            for addr, log in sends.items():
                by_name.setdefault(names.get(addr, "?"), []).extend(log)
            out: dict[str, Any] = {}
            for name, log in by_name.items():
                log.sort()
                out[name] = {"send_max": window_max(log, t0, t1) * 8,
                             "send_bytes": window_sum(log, t0, t1),
                             "send_datagrams": window_count(log, t0, t1),
                             "run_max": max_window_bytes(log, 1.0) * 8}
            for name, changes in shares.items():
                out.setdefault(name, {})["rates"] = rate_summary(changes, t0, t1)
            merged = list(heapq.merge(*(sorted(v) for v in by_name.values())))
            out["_total"] = {"send_max": window_max(merged, t0, t1) * 8,
                             "send_bytes": window_sum(merged, t0, t1),
                             "send_datagrams": window_count(merged, t0, t1),
                             "run_max": max_window_bytes(merged, 1.0) * 8}
            return out

        print(json.dumps({"udp": list(agent.udp_address), "control": str(cfg.control),
                          "pid": os.getpid()}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode().split()
                if words and words[0] == "report":
                    print(json.dumps(report(float(words[1]), float(words[2]))), flush=True)
        await agent.shutdown("benchmark over")


class HubProcess:
    """The hub's process, seen from the sites' process."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.buf = b""
        self.udp: tuple[str, int] = ("", 0)
        self.control = Path()

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self.buf:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError("the hub process exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    async def report(self, t0: float, t1: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(f"report {t0} {t1}\n".encode())
        return await self.line()

    def cpu(self) -> tuple[float, float]:
        return cpu_seconds(self.proc.pid)


# ---- the sites' process ----------------------------------------------------------------


@dataclass
class Site:
    name: str
    profile: Profile
    spec: str
    link_rate: int
    cap: int
    low: bool
    sim: LinkSim | None = None
    agent: Agent | None = None
    arrivals: Arrivals = field(default_factory=lambda: Arrivals(time.monotonic))
    wire: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, bytes) at the sim
    bad: bool = False
    errors: list[str] = field(default_factory=list)


def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


async def run_case(case: Case, root: Path) -> dict[str, Any]:
    planned, total = plan(case)
    sites = [Site(p["name"], parse_profile(p["spec"]), p["spec"], p["link_rate"], p["cap"],
                  p.get("low", False)) for p in planned]
    caps = {s.name: s.cap for s in sites}
    shares = max_min_shares(total, caps)
    result: dict[str, Any] = {"case": case.__dict__, "total": total, "errors": [],
                              "sites": planned, "shares": shares}
    mono_offset = time.monotonic() - trio.current_time()
    hub_fp = load_or_create_identity(root / "hub" / "state").fingerprint
    fps = {s.name: load_or_create_identity(root / s.name / "state").fingerprint for s in sites}
    spec = {"root": str(root), "total": total, "congestion": case.congestion,
            "peers": [{"name": s.name, "fp": fps[s.name], "cap": s.cap} for s in sites]}
    cmd = [sys.executable, __file__, "--_hub", json.dumps(spec)]
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE)
        hub = HubProcess(proc)
        try:
            with trio.fail_after(30):
                hello = await hub.line()
            hub.udp, hub.control = (hello["udp"][0], hello["udp"][1]), Path(hello["control"])
            await _with_hub(case, root, sites, shares, total, hub, hub_fp, mono_offset,
                            result, nursery)
        finally:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                await proc.stdin.aclose()
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
            nursery.cancel_scope.cancel()
    return result


async def _with_hub(case: Case, root: Path, sites: list[Site], shares: dict[str, int],
                    total: int, hub: HubProcess, hub_fp: str, mono_offset: float,
                    result: dict[str, Any], nursery: trio.Nursery) -> None:
    stack = contextlib.AsyncExitStack()
    async with stack:
        for i, s in enumerate(sites):
            s.sim = await stack.enter_async_context(open_linksim(
                upstream=hub.udp, profile=s.profile, seed=case.seed * 100 + i, trace=True))
            rtt = s.profile.rtt_s
            s.agent = Agent(AgentConfig(
                name=s.name, state_dir=root / s.name / "state", inbox=root / s.name / "inbox",
                control=root / s.name / "c.sock", peer=s.sim.address, trust=[hub_fp],
                congestion=case.congestion, reconnect_interval=0.2,
                probe_interval=max(1.0, 4 * rtt)))
            await nursery.start(s.agent.run)
        with trio.fail_after(60):
            while any(s.agent is None or s.agent.link_state is not LinkState.UP for s in sites):
                await trio.sleep(0.05)

        async def drain() -> None:
            """The simulators' traces → each site's log of what the hub sent it."""
            while True:
                for s in sites:
                    assert s.sim is not None
                    model = s.sim.model
                    events, model.events = model.events or [], []
                    base = model.start + mono_offset
                    per = model.down.overhead_bytes
                    s.wire.extend((base + t, n + per) for t, d, e, n in events
                                  if d == "down" and e == "in")
                await trio.sleep(0.5)

        hub_client = await stack.enter_async_context(open_client(hub.control))
        work = await stack.enter_async_context(trio.open_nursery())
        work.start_soon(drain)
        stop = trio.Event()

        async def writer(i: int, s: Site) -> None:
            block = _pattern(case.seed * 1000 + i)
            out = await hub_client.open_stream(name=f"bulk-{s.name}", peer=s.name,
                                               spool=case.spool or None)
            try:
                while not stop.is_set():
                    await out.send_all(block)
            except Exception as exc:  # noqa: BLE001 - reported with the figures
                if not stop.is_set():
                    s.errors.append(f"writer: {exc!r}")

        async def reader(i: int, s: Site) -> None:
            block = _pattern(case.seed * 1000 + i)
            twice = block + block
            assert s.agent is not None
            async with open_client(s.agent.config.control) as c:
                incoming = await c.accept_incoming(name=f"bulk-{s.name}")
                try:
                    async for chunk in incoming:
                        at = s.arrivals.total % CHUNK
                        if len(chunk) > CHUNK or twice[at:at + len(chunk)] != chunk:
                            s.bad = True
                        s.arrivals.add(len(chunk))
                except Exception as exc:  # noqa: BLE001 - reported with the figures
                    if not stop.is_set():
                        s.errors.append(f"reader: {exc!r}")

        for i, s in enumerate(sites):
            work.start_soon(reader, i, s)
            work.start_soon(writer, i, s)
        t_open = time.monotonic()
        with trio.move_on_after(120) as scope:
            while not all(s.arrivals.total for s in sites):
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            result["errors"].append("some site got no byte within 120 s: " + ", ".join(
                s.name for s in sites if not s.arrivals.total))
            work.cancel_scope.cancel()
            return
        result["all_started"] = time.monotonic() - t_open
        await trio.sleep(case.warm)

        # ---- phase 1: every link busy, the total binds ---------------------------------
        t0, cpu_hub0, cpu_self0 = time.monotonic(), hub.cpu(), time.process_time()
        got0 = {s.name: s.arrivals.total for s in sites}
        up0 = {s.name: _up(s) for s in sites}
        paths: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sites}
        with trio.move_on_at(trio.current_time() + case.seconds):
            while True:  # the hub's view of each path, every 2 s (for the JSON)
                await trio.sleep(2.0)
                for p in (await hub_client.status())["peers"]:
                    link = p["link"] or {}
                    paths[p["name"]].append({k: link.get(k) for k in (
                        "rtt", "cwnd", "bytes_in_flight", "lost_packets")})
                    paths[p["name"]][-1]["effective"] = p["effective_rate"]
        t1, cpu_hub1, cpu_self1 = time.monotonic(), hub.cpu(), time.process_time()
        got1 = {s.name: s.arrivals.total for s in sites}
        up1 = {s.name: _up(s) for s in sites}
        status = await hub_client.status()
        await trio.sleep(1.0)  # the simulators' traces up to t1 drained
        sent = await hub.report(t0, t1)
        span = t1 - t0
        hub_s = sum(cpu_hub1) - sum(cpu_hub0)
        payload = sum(got1[n] - got0[n] for n in got0)
        links = {p["name"]: p for p in status["peers"]}
        rows = []
        for s in sites:
            assert s.sim is not None
            share = shares[s.name]
            good = (got1[s.name] - got0[s.name]) * 8 / span
            rows.append({
                "name": s.name, "profile": s.profile.name, "link_rate": s.link_rate,
                "spec": s.spec, "rtt": s.profile.rtt_s,
                "cap": s.cap, "low": s.low, "share": share,
                "effective": _median([links[s.name]["effective_rate"]]
                                     + [x["effective"] for x in paths[s.name]]),
                "send_max": sent.get(s.name, {}).get("send_max"),
                "rates": sent.get(s.name, {}).get("rates"),
                "send_datagrams": sent.get(s.name, {}).get("send_datagrams"),
                "send_mean": sent.get(s.name, {}).get("send_bytes", 0) * 8 / span,
                "run_send_max": sent.get(s.name, {}).get("run_max"),
                "wire_max": window_max(s.wire, t0, t1) * 8,
                "wire_mean": window_sum(s.wire, t0, t1) * 8 / span,
                "run_max": max_window_bytes(s.wire, 1.0) * 8,
                "good": good, "max_gap": s.arrivals.max_gap(t0, t1),
                "max_gap_at": s.arrivals.gap(t0, t1)[1],
                "q_drops": s.sim.stats.down.dropped_queue,
                "lost": (links[s.name]["link"] or {}).get("lost_packets"),
                "srtt": (links[s.name]["link"] or {}).get("rtt"),
                "up_mean": (up1[s.name][0] - up0[s.name][0]) * 8 / span,
                "up_datagrams": (up1[s.name][1] - up0[s.name][1]) / span,
                "up_q_drops": up1[s.name][2] - up0[s.name][2],
                "path": paths[s.name], "bad": s.bad, "errors": list(s.errors)})
        merged = list(heapq.merge(*(s.wire for s in sites)))
        tot = sent.get("_total", {})
        result["phase1"] = {
            "span": span, "links": rows,
            "total": {"cap": total, "shares": sum(shares.values()),
                      "send_max": tot.get("send_max"), "run_send_max": tot.get("run_max"),
                      "send_datagrams": tot.get("send_datagrams"),
                      "send_mean": tot.get("send_bytes", 0) * 8 / span,
                      "wire_max": window_max(merged, t0, t1) * 8,
                      "wire_mean": window_sum(merged, t0, t1) * 8 / span,
                      "run_max": max_window_bytes(merged, 1.0) * 8,
                      "good": payload * 8 / span},
            "cpu": {"hub_s": hub_s, "hub_core": hub_s / span,
                    "hub_user": cpu_hub1[0] - cpu_hub0[0], "hub_sys": cpu_hub1[1] - cpu_hub0[1],
                    "hub_s_per_100MB": hub_s / (payload / 1e8) if payload else None,
                    "sites_core": (cpu_self1 - cpu_self0) / span,
                    "payload_bytes": payload},
            "load": os.getloadavg()}

        # ---- phase 2: one site's link cut -------------------------------------------------
        if case.outage > 0:
            await _outage(case, sites, total, hub, hub_client, result)
        stop.set()
        work.cancel_scope.cancel()


def _median(values: list[int]) -> int | None:
    return sorted(values)[len(values) // 2] if values else None


def _up(s: Site) -> tuple[int, int, int]:
    """What the site sent back through its simulator (ACKs, mostly): wire bytes and
    datagrams in, and queue drops."""
    assert s.sim is not None
    up = s.sim.stats.up
    return up.wire_bytes_in, up.datagrams_in, up.dropped_queue


async def _outage(case: Case, sites: list[Site], total: int, hub: HubProcess,
                  hub_client: Any, result: dict[str, Any]) -> None:
    by_name = {s.name: s for s in sites}
    cut = by_name.get(case.cut)
    if cut is None or cut.sim is None:
        result["errors"].append(f"--cut {case.cut}: no such site")
        return
    others = [s for s in sites if s is not cut]
    during = max_min_shares(total, {s.name: s.cap for s in others})
    out: dict[str, Any] = {"cut": cut.name, "profile": cut.profile.name,
                           "seconds": case.outage, "shares": during}
    t_cut = time.monotonic()
    cut.sim.set_outage(True)
    t_down: float | None = None
    t_end = t_cut + case.outage
    effective: dict[str, list[int]] = {s.name: [] for s in others}
    while time.monotonic() < t_end - 0.3:
        st = await hub_client.status()
        if t_down is None:
            state = next(p for p in st["peers"] if p["name"] == cut.name)["link"]["state"]
            if state != "up":
                t_down = time.monotonic()
        if t_down is not None and time.monotonic() > t_down + 1.0:
            for p in st["peers"]:
                effective.get(p["name"], []).append(p["effective_rate"])
        await trio.sleep(max(0.0, min(0.1 if t_down is None else 1.0,
                                      t_end - 0.3 - time.monotonic())))
    await trio.sleep(max(0.0, t_end - time.monotonic()))
    cut.sim.set_outage(False)
    t_restore = time.monotonic()
    mark = cut.arrivals.total
    with trio.move_on_after(120):
        while cut.arrivals.total == mark:
            await trio.sleep(0.05)
    t_resumed = time.monotonic() if cut.arrivals.total > mark else None
    out["down_after"] = None if t_down is None else t_down - t_cut
    out["resumed_after"] = None if t_resumed is None else t_resumed - t_restore
    rows = []
    if t_down is not None and t_restore - t_down > 2:
        a, b = t_down + 1.0, t_restore
        out["window"] = [a - t_cut, b - t_cut]
        await trio.sleep(1.0)  # the simulators' traces up to b drained
        sent = await hub.report(a, b)
        for s in others:
            good = (s.arrivals.at(b) - s.arrivals.at(a)) * 8 / (b - a)
            rows.append({"name": s.name, "profile": s.profile.name, "cap": s.cap,
                         "spec": s.spec, "rtt": s.profile.rtt_s,
                         "share_before": result["shares"][s.name], "share": during[s.name],
                         "effective": _median(effective[s.name]),
                         "effective_samples": effective[s.name],
                         "send_max": sent.get(s.name, {}).get("send_max"),
                         "rates": sent.get(s.name, {}).get("rates"),
                         "good": good, "wire_mean": window_sum(s.wire, a, b) * 8 / (b - a),
                         "max_gap": s.arrivals.max_gap(t_cut, t_restore)})
        merged = list(heapq.merge(*(s.wire for s in others)))
        out["total"] = {"good": sum(r["good"] for r in rows),
                        "wire_mean": window_sum(merged, a, b) * 8 / (b - a),
                        "wire_max": window_max(merged, a, b) * 8,
                        "send_max": sent.get("_total", {}).get("send_max"),
                        "cap": total, "shares": sum(during.values())}
    else:
        result["errors"].append("outage: the hub did not report the cut link down in time "
                                "to measure (a longer --outage?)")
    out["links"] = rows
    out["cut_errors"] = list(cut.errors)
    out["cut_bad"] = cut.bad
    result["outage"] = out


# ---- tables ----------------------------------------------------------------------------


def _rate(bps: float | None) -> str:
    if bps is None:
        return "—"
    return f"{bps / 1e6:.2f}M" if bps >= 1e6 else f"{bps / 1e3:.0f}k"


def _ratio(x: float | None, y: float) -> str:
    return "—" if x is None or not y else f"{x / y:.3f}"


LINK_HEADER = ("| site | link | link rate | cap | share | eff | eff max | idle | send max"
               " | wire max | wire mean | good | good Mbit/s | max gap | run max / cap"
               " | q-drops | lost | ok |")
LINK_RULE = "|---" * 18 + "|"


def _eff(r: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """The hub's effective rate for the link over the window: (mean, max, idle share)."""
    rates = r.get("rates") or {}
    if not rates:
        return r.get("effective"), r.get("effective"), None
    return rates["mean"], rates["max"], rates["idle_fraction"]


def _verdict(r: dict[str, Any], share: int) -> list[str]:
    mean, top, _ = _eff(r)
    verdict = []
    limit = max(share, top or 0)  # the highest rate the hub gave the link in the window
    if r.get("send_max") is not None and r["send_max"] / limit > TARGET_WIRE or \
            r.get("run_send_max") is not None and r["run_send_max"] / r["cap"] > TARGET_WIRE:
        verdict.append("CAP")
    elif r.get("wire_max") is not None and r["wire_max"] / limit > TARGET_WIRE or \
            r.get("run_max") is not None and r["run_max"] / r["cap"] > TARGET_WIRE:
        verdict.append("CAP(sim)")
    if r["good"] / share < good_target(r["profile"]):
        verdict.append("SHARE")
    if mean is not None and mean / share < 0.99:
        verdict.append("EFF")  # the hub gave it less than its share (more: others idled)
    if r.get("bad"):
        verdict.append("BYTES")
    if r["max_gap"] > stall_limit(r["rtt"]):
        verdict.append("STALL")
    if r.get("errors"):
        verdict.append("ERROR")
    return verdict


def link_row(r: dict[str, Any]) -> str:
    share = r["share"]
    mean, top, idle = _eff(r)
    cap = _rate(r["cap"]) + (" (lowered)" if r.get("low") else "")
    cells = [r["name"], r.get("spec", r["profile"]), _rate(r["link_rate"]), cap, _rate(share),
             _ratio(mean, share), _ratio(top, share),
             "—" if idle is None else f"{100 * idle:.1f} %", _ratio(r["send_max"], share),
             _ratio(r["wire_max"], share), _ratio(r["wire_mean"], share),
             _ratio(r["good"], share), f"{r['good'] / 1e6:.3f}", f"{r['max_gap']:.2f} s",
             _ratio(r["run_max"], r["cap"]), str(r["q_drops"]), str(r["lost"]),
             " ".join(_verdict(r, share)) or "yes"]
    return "| " + " | ".join(cells) + " |"


def total_row(t: dict[str, Any]) -> str:
    cap = t["cap"]
    verdict = []
    if (t.get("send_max") or 0) / cap > TARGET_WIRE or (t.get("run_send_max") or 0) / cap > \
            TARGET_WIRE:
        verdict.append("CAP")
    elif t["wire_max"] / cap > TARGET_WIRE or t["run_max"] / cap > TARGET_WIRE:
        verdict.append("CAP(sim)")
    cells = ["**total**", "", "", _rate(cap), _rate(t["shares"]), "", "", "",
             _ratio(t.get("send_max"), cap), _ratio(t["wire_max"], cap),
             _ratio(t["wire_mean"], cap), _ratio(t["good"], cap), f"{t['good'] / 1e6:.3f}", "",
             _ratio(t["run_max"], cap), "", "", " ".join(verdict) or "yes"]
    return "| " + " | ".join(cells) + " |"


OUT_HEADER = ("| site | link | cap | share before | share during | eff | eff max | idle"
              " | send max | wire mean | good | good Mbit/s | max gap | ok |")
OUT_RULE = "|---" * 14 + "|"


def outage_row(r: dict[str, Any]) -> str:
    share = r["share"]
    mean, top, idle = _eff(r)
    cells = [r["name"], r.get("spec", r["profile"]), _rate(r["cap"]),
             _rate(r["share_before"]), _rate(share), _ratio(mean, share), _ratio(top, share),
             "—" if idle is None else f"{100 * idle:.1f} %", _ratio(r.get("send_max"), share),
             _ratio(r["wire_mean"], share), _ratio(r["good"], share), f"{r['good'] / 1e6:.3f}",
             f"{r['max_gap']:.2f} s", " ".join(_verdict(r, share)) or "yes"]
    return "| " + " | ".join(cells) + " |"


def print_result(res: dict[str, Any]) -> None:
    case = res["case"]
    print(f"\n## {case['sites']} sites: total cap {_rate(res['total'])}, "
          f"{case['seconds']:g} s measured after {case['warm']:g} s of warm-up")
    for err in res.get("errors", []):
        print(f"# error: {err}")
    p1 = res.get("phase1")
    if p1:
        print(f"# all streams delivering {res.get('all_started', 0):.1f} s after opening;"
              f" load average at the end {p1['load'][0]:.2f}")
        print(LINK_HEADER)
        print(LINK_RULE)
        for r in p1["links"]:
            print(link_row(r))
        print(total_row(p1["total"]))
        cpu = p1["cpu"]
        per = cpu["hub_s_per_100MB"]
        dgrams = p1["total"].get("send_datagrams")
        print(f"\nhub CPU: {cpu['hub_s']:.2f} s in {p1['span']:.1f} s (user {cpu['hub_user']:.2f}"
              f", system {cpu['hub_sys']:.2f}) = {100 * cpu['hub_core']:.1f} % of a core; "
              + (f"{per:.2f} CPU-s per 100 MB of payload delivered" if per else "—")
              + (f"; {dgrams / p1['span']:.0f} datagrams/s sent, "
                 f"{1e6 * cpu['hub_s'] / dgrams:.0f} µs CPU per datagram" if dgrams else ""))
        print(f"sites' process (site agents, simulators, writers, readers): "
              f"{100 * cpu['sites_core']:.1f} % of a core")
        for r in p1["links"]:
            for err in r["errors"]:
                print(f"# {r['name']}: {err}")
    out = res.get("outage")
    if out:
        down = out.get("down_after")
        resumed = out.get("resumed_after")
        print(f"\noutage: {out['cut']} ({out['profile']}) cut for {out['seconds']:g} s; "
              f"the hub reported it down after "
              f"{'—' if down is None else f'{down:.1f} s'}; "
              f"its stream delivered again {'—' if resumed is None else f'{resumed:.1f} s'}"
              f" after the cut ended" + (f"; measured {out['window'][0]:.1f}–"
                                         f"{out['window'][1]:.1f} s into the cut"
                                         if out.get("window") else ""))
        if out["links"]:
            print(OUT_HEADER)
            print(OUT_RULE)
            for r in out["links"]:
                print(outage_row(r))
            t = out["total"]
            print(f"| **others together** | | | | {_rate(t['shares'])} | | | | "
                  f"{_ratio(t.get('send_max'), t['shares'])} | "
                  f"{_ratio(t['wire_mean'], t['shares'])} | {_ratio(t['good'], t['shares'])} | "
                  f"{t['good'] / 1e6:.3f} | | |")
            print(f"\nduring the cut: total send max / total cap "
                  f"{_ratio(t.get('send_max'), t['cap'])}, wire max / total cap "
                  f"{_ratio(t.get('wire_max'), t['cap'])}")
        if out.get("cut_bad"):
            print(f"# {out['cut']}: a wrong byte arrived")
        for err in out.get("cut_errors", []):
            print(f"# {out['cut']}: {err}")


# ---- driver ------------------------------------------------------------------------------


def _spawn(case: Case, timeout: float) -> dict[str, Any]:
    """One case in its own process group (the hub's process included)."""
    res, error = run_isolated([sys.executable, __file__, "--_case", json.dumps(case.__dict__)],
                              timeout)
    return res if res is not None else {"case": case.__dict__, "errors": [error]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="3,10", help="comma-separated site counts (default 3,10)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds (default 60)")
    p.add_argument("--warm", type=float, default=10.0,
                   help="seconds between every stream delivering and the measurement (10)")
    p.add_argument("--quick", action="store_true",
                   help="15 s measured, 5 s warm-up, 10 s outage")
    p.add_argument("--total-fraction", type=float, default=0.6,
                   help="the total cap as a fraction of the sum of the link caps (0.6)")
    p.add_argument("--cap-fraction", type=float, default=1.0,
                   help="each link's own cap as a fraction of its downlink rate (1)")
    p.add_argument("--low-fraction", type=float, default=1 / 3,
                   help="the last LOS site's cap, a fraction of its normal one (1/3; 0: off)")
    p.add_argument("--outage", type=float, default=15.0,
                   help="seconds one site's link is cut after the measurement (15; 0: none)")
    p.add_argument("--cut", default="s02", help="the site whose link is cut (default s02)")
    p.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    p.add_argument("--congestion", default="allotted", help="every agent's (allotted)")
    p.add_argument("--profile", action="append", metavar="SPEC",
                   help="the sites' link profiles, taken in turn (repeatable; default "
                   + ", ".join(CYCLE) + "); spec strings as in quelay linksim")
    p.add_argument("--spool", type=int, default=0,
                   help="each stream's spool in bytes (default 0: the agent's spool_size)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--table", type=Path, metavar="JSON",
                   help="print the tables of a previous run's --json file and exit")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_hub", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._hub:
        trio.run(hub_main, json.loads(args._hub))
        return
    if args._case:
        case = Case(**json.loads(args._case))
        with tempfile.TemporaryDirectory(prefix="quelay-hub-", dir="/dev/shm"
                                         if Path("/dev/shm").is_dir() else None) as tmp:
            res = trio.run(run_case, case, Path(tmp))
        print(json.dumps(res))
        return
    if args.table:
        for res in json.loads(args.table.read_text()):
            print_result(res)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds, warm, outage = (15.0, 5.0, 10.0) if args.quick else \
        (args.seconds, args.warm, args.outage)
    if args.quick and args.outage == 0:
        outage = 0.0
    results = []
    for n in [int(x) for x in args.sites.split(",") if x.strip()]:
        case = Case(n, seconds, warm, args.total_fraction, args.cap_fraction,
                    args.low_fraction, outage, args.cut, args.seed, args.congestion,
                    args.profile or list(CYCLE), args.spool)
        sites, total = plan(case)
        print(f"# bench/hub.py: {n} sites ({', '.join(s['spec'] for s in sites)}), "
              f"total cap {_rate(total)}; hub in its own process, sites, simulators, "
              f"writers and readers in another", flush=True)
        res = _spawn(case, timeout=warm + seconds + outage + 400)
        results.append(res)
        print_result(res)
        sys.stdout.flush()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
