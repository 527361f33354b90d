"""Link benchmark: the rate cap, goodput and fairness through the simulated satellite links.

    python bench/links.py [--profiles clean,LOS-250ms,...,Degraded-BLOS+reorder]
                          [--congestion reno,cubic,allotted] [--caps 1,0.5]
                          [--seconds 60 | --quick] [--fair-seconds S] [--single-only]
                          [--json FILE] [--inproc-sim] [--probe-interval S]
                          [--retries N] [--seed N]
    python bench/links.py --file-test [--file-size BYTES] [--seed N]

For every profile × cap factor × congestion control, two agents run through
the link simulator (real UDP on loopback; by default ``python -m
quelay.linksim`` in its own process, read over its control socket; with
``--inproc-sim`` the library inside the agents' Trio run). The listening agent
A sits behind the simulator's upstream side; the dialling agent B is the
sender (the ``up`` direction), capped at the profile's uplink rate × the cap
factor (the clean profile has no uplink rate: ``--clean-rate``, default
20 Mbit/s, stands in for it). Two phases on the same pair of agents:

1. **single**: one stream of ``seconds`` worth of data at the cap, written as
   fast as the agent takes it, read at A and checked with SHA-256;
2. **fair**: four concurrent equal-priority streams, written without end; once
   all four have delivered a byte, a warm-up, then ``--fair-seconds``
   (default ``seconds``) of measurement.

Columns (all relative to the cap):

* ``wire max``  — highest ``up_in`` bytes (what B put on the wire, as the
  simulator received it) in any ten consecutive 100-ms bins, over the whole
  run (handshake, both phases, keep-alives) — the issue's measure;
* ``send max``  — the same from B's side, exact: most bytes B handed to the
  kernel in any window (t − 1 s, t] (every ``send_batch``, timed), the
  definition the wire gate enforces;
* ``send 1.01`` — most bytes in any window of 1.01 s, / 1.01: what an observer
  whose clock or queue adds up to 10 ms of jitter can see;
* ``wire mean`` — ``up_in`` over the single transfer's busy period (stream
  opened → its last byte's arrival minus the one-way delay);
* ``good st``   — steady goodput: payload bytes delivered to A's reader from
  ``warm`` (max(2 s, 4 RTT), at most seconds/3) after the first byte to the
  last byte, per second;
* ``good all``  — whole-transfer goodput: all payload / (last byte's arrival −
  stream opened), slow start and one-way delay included;
* ``spread``    — fair phase: (max − min) / mean of the bytes each of the four
  readers got over the same measurement interval;
* ``4x good``   — fair phase: the four streams' bytes over that interval;
* ``4th start`` — fair phase: seconds from opening the four streams until the
  last of them delivered its first byte;
* ``lost pkts`` (B's QUIC loss count), ``sim q-drops`` (the simulated link's
  drop-tail queue overflowing), ``srtt`` (median of B's smoothed RTT).

Profiles are names or spec strings (``"clean,rate=2.4M,rtt=750ms"``); every
built-in profile has a ``+reorder`` variant (each datagram's delay drawn on
its own, netem-like, so datagrams overtake; ±25 ms where the base has no
jitter), and the default runs all eight. Bytes on the wire are counted as the
link sees them: the simulator adds 28 B of IPv4+UDP headers per datagram (B's
own ``send max`` adds them too).

``--file-test`` is issue 11's whole-transfer measure instead: agents connected
first, then a 2 MB file (``--file-size``) with ``send`` + ``wait`` at a 2 Mbit/s
cap through a 2.4 Mbit/s, 750 ms link: clean, ±25 ms reordering, 5 % loss + 1 %
corrupt + 3 % duplicate, and both; ``good all`` is file bytes / (send → done,
verification included), and the row shows B's spurious losses and tail copies.

Targets (issue 11): wire max ≤ 1.02; steady goodput ≥ 0.95 (clean, LOS-250ms,
BLOS-750ms, with and without reordering), ≥ 0.90 (Degraded-BLOS, both);
file test ≥ 0.85 clean, ≥ 0.80 reordering, ≥ 0.75 degraded, ≥ 0.70 degraded
with reordering. ``ok`` names the misses (``CAP(sim)``:
over at the simulator, not at B's own send times). Each case runs in its own
process group; a crashed or stalled case is run again with another seed
(``--retries``) and reported. B's ``probe_interval`` is max(1 s, 4 RTT) unless
``--probe-interval`` says otherwise (see docs/performance.md: with the 1-s
default, the Degraded-BLOS handshake trips an agent crash). Not a test: the
figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.agent import Agent, AgentConfig  # noqa: E402
from quelay.client import open_client  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402
from quelay.linksim import BIN_S, open_linksim  # noqa: E402
from quelay.linksim import parse_profile as get_profile  # noqa: E402  (names and specs)
from quelay.linksim.measure import Arrivals, max_window_bytes, run_isolated  # noqa: E402
from quelay.linksim.profiles import Profile  # noqa: E402

BASE_PROFILES = ["clean", "LOS-250ms", "BLOS-750ms", "Degraded-BLOS"]
PROFILES = BASE_PROFILES + [name + "+reorder" for name in BASE_PROFILES]
FILE_LINK = "rate=2.4M,rtt=750ms"
FILE_PROFILES = {  # issue 11's file test: name -> (link spec, whole-transfer target)
    "clean": (f"clean,{FILE_LINK}", 0.85),
    "reorder ±25 ms": (f"clean+reorder,{FILE_LINK}", 0.80),
    "5 % loss": (f"Degraded-BLOS,{FILE_LINK},jitter=0", 0.75),
    "5 % loss + reorder": (f"Degraded-BLOS+reorder,{FILE_LINK},jitter=25ms", 0.70),
}
FILE_CAP = 2_000_000
CONGESTION = ["reno", "cubic", "allotted"]
CHUNK = 64 * 1024
TARGET_WIRE = 1.02


def goodput_target(profile: str) -> float:
    return 0.90 if profile.lower().startswith("degraded-blos") else 0.95


@dataclass
class Case:
    profile: str
    congestion: str
    factor: float  # cap = uplink rate × factor
    seconds: float
    clean_rate: float
    seed: int
    sim_process: bool = True
    probe: float = 0.0  # the dialler's probe_interval; 0 = max(1 s, 4 RTT)
    fair_seconds: float = 0.0  # the fair phase's measurement; 0 = ``seconds``
    fair: bool = True  # run the 4-stream phase
    file_size: int = 0  # > 0: issue 11's file test instead of the two phases
    label: str = ""  # the file test's row name
    target: float = 0.0  # the file test's whole-transfer target
    max_datagram: int = 0  # both agents' max_datagram_size; 0 = the agent's default

    def probe_interval(self, rtt: float) -> float:
        return self.probe if self.probe > 0 else max(1.0, 4 * rtt)

    def cap(self) -> int:
        """The rate every ratio is taken against: uplink × factor (factor 0: the uplink
        itself, while the agent runs uncapped)."""
        prof = get_profile(self.profile)
        base = prof.up.rate_bps if prof.up.rate_bps is not None else self.clean_rate
        return int(base * (self.factor or 1.0))

    def agent_rate(self) -> int:
        return 0 if self.factor == 0 else self.cap()


def _path_stats(agent: Agent) -> dict[str, Any] | None:
    """Everything the agent's loss recovery counted (the JSON result keeps it, so a
    goodput miss can be traced to losses, spurious losses, probes or tail copies)."""
    session = agent.default.session
    if session is None:
        return None
    stats = dataclasses.asdict(session.conn.path_stats())
    stats["return_probes"] = session.conn.quic._recovery.return_probes
    return stats


def _pattern(seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(CHUNK)


def _bins(hist: list[dict[str, Any]], key: str, start: float, t0: float, t1: float) -> tuple[
        int, float]:
    """Bytes of ``key`` in whole bins inside [t0, t1] (trio times), and the span they cover."""
    first = math.ceil((t0 - start) / BIN_S - 1e-9)
    last = math.floor((t1 - start) / BIN_S + 1e-9)  # exclusive
    if last <= first:
        return 0, 0.0
    total = sum(hist[i][key] for i in range(max(0, first), min(len(hist), last)))
    return total, (last - first) * BIN_S


def _peak(values: list[int], n: int = 10) -> int:
    """Most bytes in any ``n`` consecutive bins (as ``LinkModel.peak_bytes``)."""
    total = best = sum(values[:n])
    for i in range(n, len(values)):
        total += values[i] - values[i - n]
        best = max(best, total)
    return best


class InProcessSim:
    """The simulator as a library, in the agents' own Trio run."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.address = sim.address
        self.start = sim.model.start  # trio time of bin 0

    async def histogram(self) -> list[dict[str, Any]]:
        return self.sim.histogram()  # type: ignore[no-any-return]

    async def up_stats(self) -> dict[str, int]:
        up = self.sim.stats.up
        return {k: getattr(up, k) for k in ("datagrams_in", "bytes_in", "dropped_queue",
                                            "dropped_loss", "corrupted", "duplicated")}


@asynccontextmanager
async def in_process_sim(upstream: Any, profile: str, seed: int) -> AsyncIterator[Any]:
    async with open_linksim(upstream=upstream, profile=profile, seed=seed) as sim:
        yield InProcessSim(sim)


class ProcessSim:
    """``python -m quelay.linksim`` in its own process (its own core), read over its
    control socket. Its histogram's bin 0 is placed on our clock by one ``snapshot``
    (``elapsed_s`` at the moment of the reply; error ≈ the reply's latency, ~1 ms)."""

    def __init__(self, control: Path, address: tuple[str, int]) -> None:
        self.control = control
        self.address = address
        self.start = 0.0

    async def snapshot(self) -> dict[str, Any]:
        from quelay.linksim.command import control_command

        reply = await control_command(self.control, "snapshot")
        return reply["snapshot"]  # type: ignore[no-any-return]

    async def align(self) -> None:
        best = math.inf
        for _ in range(5):
            t0 = trio.current_time()
            snap = await self.snapshot()
            t1 = trio.current_time()
            if t1 - t0 < best:
                best = t1 - t0
                self.start = (t0 + t1) / 2 - snap["elapsed_s"]

    async def histogram(self) -> list[dict[str, Any]]:
        return (await self.snapshot())["histogram"]  # type: ignore[no-any-return]

    async def up_stats(self) -> dict[str, int]:
        return (await self.snapshot())["up"]  # type: ignore[no-any-return]


@asynccontextmanager
async def process_sim(upstream: Any, profile: str, seed: int, root: Path
                      ) -> AsyncIterator[Any]:
    control = root / "linksim.sock"
    cmd = [sys.executable, "-m", "quelay.linksim", "--listen", "127.0.0.1:0",
           "--upstream", f"{upstream[0]}:{upstream[1]}", "--profile", profile,
           "--seed", str(seed), "--stats-interval", "0", "--control", str(control)]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(trio.run_process, cmd, stdout=subprocess.PIPE, check=False))
        try:
            assert proc.stdout is not None
            buf = b""
            with trio.fail_after(20):
                while b"listening on" not in buf:
                    chunk = await proc.stdout.receive_some(4096)
                    if not chunk:
                        raise RuntimeError(f"linksim exited: {buf.decode(errors='replace')}")
                    buf += chunk
            line = buf.decode().split("listening on ", 1)[1].split(" ", 1)[0]
            host, port = line.rsplit(":", 1)
            sim = ProcessSim(control, (host, int(port)))
            await sim.align()

            async def drain() -> None:
                async for _ in proc.stdout:  # type: ignore[union-attr]
                    pass

            nursery.start_soon(drain)
            yield sim
        finally:
            proc.terminate()
            nursery.cancel_scope.deadline = trio.current_time() + 5


async def _status_sampler(agent: Agent, samples: list[dict[str, Any]]) -> None:
    while True:
        await trio.sleep(1.0)
        st = agent.status()
        link = st.get("link", {})
        samples.append({"t": trio.current_time(), "rtt": link.get("rtt"),
                        "cwnd": link.get("cwnd"), "lost": link.get("lost_packets"),
                        "held": (st.get("wire") or {}).get("held_datagrams")})


async def run_case(case: Case, root: Path) -> dict[str, Any]:
    profile: Profile = get_profile(case.profile)
    cap = case.cap()
    rtt = profile.rtt_s
    owd = profile.up.delay_s
    warm = min(max(2.0, 4 * rtt), case.seconds / 3)
    size = int(cap / 8 * case.seconds)
    # A DRR round (4 streams × quantum) can take tens of seconds on a 100-kbit/s link.
    limit = max(3 * case.seconds, case.seconds + 120)
    result: dict[str, Any] = {"profile": profile.name, "congestion": case.congestion,
                              "factor": case.factor, "cap": cap, "seconds": case.seconds,
                              "warm": warm, "size": size, "errors": [], "label": case.label,
                              "target": case.target, "file_size": case.file_size}

    fp_a = load_or_create_identity(root / "a" / "state").fingerprint
    fp_b = load_or_create_identity(root / "b" / "state").fingerprint

    def config(side: str, **kw: Any) -> AgentConfig:
        if case.max_datagram:
            kw["max_datagram_size"] = case.max_datagram
        return AgentConfig(name=side, state_dir=root / side / "state",
                           inbox=root / side / "inbox", control=root / side / "c.sock",
                           congestion=case.congestion, reconnect_interval=0.2, **kw)

    samples: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        a = Agent(config("a", listen=("127.0.0.1", 0), trust=[fp_b]))
        await nursery.start(a.run)
        if case.sim_process:
            opened = process_sim(a.udp_address, profile.name, case.seed, root)
        else:
            opened = in_process_sim(a.udp_address, profile.name, case.seed)
        async with opened as sim:
            start = sim.start
            b = Agent(config("b", peer=sim.address, trust=[fp_a], rate=case.agent_rate(),
                             probe_interval=case.probe_interval(rtt)))
            await nursery.start(b.run)
            # Every batch B hands to the kernel, timed: the exact wire rate at the sender
            # (the simulator's bins are timed by its own receive loop, which lags when
            # its process is descheduled).
            sends: list[tuple[float, int]] = []
            assert b.sock is not None
            kernel_send = b.sock.send_batch

            async def send_batch(datagrams: Any) -> None:
                batch = list(datagrams)
                sends.append((trio.current_time(), sum(len(d) + 28 for d, _ in batch)))
                await kernel_send(batch)

            b.sock.send_batch = send_batch  # type: ignore[method-assign]
            with trio.fail_after(60):
                while a.link_state != "up" or b.link_state != "up":
                    await trio.sleep(0.01)
            nursery.start_soon(_status_sampler, b, samples)
            if case.file_size:
                await _file_phase(case, a, b, root, result, limit)
                hist = await sim.histogram()
                result["wire_max"] = _peak([h["up_in"] for h in hist]) * 8 / (10 * BIN_S)
                result["send_max"] = max_window_bytes(sends, 1.0) * 8
                nursery.cancel_scope.cancel()
                return result
            async with open_client(a.config.control) as ca, \
                    open_client(b.config.control) as cb:
                # ---- phase 1: one stream --------------------------------------------
                block = _pattern(case.seed)
                arrivals = Arrivals(trio.current_time)
                got = hashlib.sha256()
                single: dict[str, Any] = {}

                async def reader() -> None:
                    incoming = await ca.accept_incoming(name="single")
                    async for chunk in incoming:
                        got.update(chunk)
                        arrivals.add(len(chunk))

                with trio.move_on_after(limit) as scope:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(reader)
                        t_open = trio.current_time()
                        sent = hashlib.sha256()
                        async with await cb.open_stream(name="single") as out:
                            for offset in range(0, size, CHUNK):
                                piece = block[: min(CHUNK, size - offset)]
                                await out.send_all(piece)
                                sent.update(piece)
                        single["state"] = out.result["state"] if out.result else None
                if scope.cancelled_caught:
                    result["errors"].append(
                        f"single: stalled, {arrivals.total}/{size} bytes after {limit:.0f} s")
                    nursery.cancel_scope.cancel()
                    return result
                t_last = arrivals.times[-1]
                single["ok"] = got.digest() == sent.digest() and arrivals.total == size
                if not single["ok"]:
                    result["errors"].append("single: bytes differ (SHA-256)")
                t_first = arrivals.times[0]
                t_a = t_first + warm
                steady_bytes = arrivals.total - arrivals.at(t_a)
                single["goodput_steady"] = steady_bytes * 8 / max(1e-9, t_last - t_a)
                single["goodput_whole"] = size * 8 / (t_last - t_open)
                single["duration"] = t_last - t_open
                hist = await sim.histogram()
                busy_bytes, busy_span = _bins(hist, "up_in", start, t_open, t_last - owd)
                single["wire_mean"] = busy_bytes * 8 / busy_span if busy_span else 0.0
                st_bytes, st_span = _bins(hist, "up_in", start, t_a - owd, t_last - owd)
                single["wire_steady"] = st_bytes * 8 / st_span if st_span else 0.0
                single["lost_packets"] = b.status()["link"].get("lost_packets")
                single["path"] = _path_stats(b)
                single["peer_path"] = _path_stats(a)
                result["single"] = single

                # ---- phase 2: four concurrent equal-priority streams -----------------
                if not case.fair:
                    result["fair"] = None  # --single-only
                else:
                    fair: dict[str, Any] = {}
                    readers = [Arrivals(trio.current_time) for _ in range(4)]
                    stop = trio.Event()

                    async def fair_reader(i: int) -> None:
                        incoming = await ca.accept_incoming(name=f"fair-{i}")
                        async for chunk in incoming:
                            readers[i].add(len(chunk))

                    async def fair_writer(i: int) -> None:
                        out = await cb.open_stream(name=f"fair-{i}")
                        try:
                            while not stop.is_set():
                                await out.send_all(block)
                        finally:
                            with trio.CancelScope(shield=True):
                                await out.abort("benchmark over")

                    lost_before = b.status()["link"].get("lost_packets") or 0
                    t_fair = trio.current_time()
                    with trio.move_on_after(limit) as scope:
                        async with trio.open_nursery() as inner:
                            for i in range(4):
                                inner.start_soon(fair_reader, i)
                                inner.start_soon(fair_writer, i)
                            while not all(r.total for r in readers):
                                await trio.sleep(0.05)
                            fair["start_delay"] = trio.current_time() - t_fair
                            await trio.sleep(warm)
                            t0 = trio.current_time()
                            c0 = [r.total for r in readers]
                            await trio.sleep(case.fair_seconds or case.seconds)
                            t1 = trio.current_time()
                            c1 = [r.total for r in readers]
                            fair["measured"] = True
                            stop.set()
                            inner.cancel_scope.cancel()
                    if not fair.pop("measured", False):
                        result["errors"].append(
                            f"fair: stalled, per-stream bytes {[r.total for r in readers]}")
                    else:
                        shares = [y - x for x, y in zip(c0, c1, strict=True)]
                        mean = sum(shares) / 4
                        fair["shares"] = shares
                        fair["spread"] = (max(shares) - min(shares)) / mean if mean else math.inf
                        fair["goodput"] = sum(shares) * 8 / (t1 - t0)
                        hist = await sim.histogram()
                        fb, fspan = _bins(hist, "up_in", start, t0 - owd, t1 - owd)
                        fair["wire_mean"] = fb * 8 / fspan if fspan else 0.0
                        fair["lost_packets"] = (b.status()["link"].get("lost_packets") or 0) - \
                            lost_before
                        result["fair"] = fair

            hist = await sim.histogram()
            up_in = [h["up_in"] for h in hist]
            result["wire_max"] = _peak(up_in) * 8 / (10 * BIN_S)
            result["send_max"] = max_window_bytes(sends, 1.0) * 8
            if b.session is not None:
                result["path"] = dataclasses.asdict(b.session.conn.path_stats())
            result["send_max_10ms"] = max_window_bytes(sends, 1.01) * 8 / 1.01
            up = await sim.up_stats()
            result["sim_up"] = {k: up[k] for k in ("datagrams_in", "bytes_in", "dropped_queue",
                                                  "dropped_loss", "corrupted", "duplicated")}
            rtts = sorted(s["rtt"] for s in samples if s["rtt"] is not None)
            cwnds = sorted(s["cwnd"] for s in samples if s["cwnd"] is not None)
            result["srtt_median"] = rtts[len(rtts) // 2] if rtts else None
            result["cwnd_median"] = cwnds[len(cwnds) // 2] if cwnds else None
            result["held_datagrams"] = samples[-1]["held"] if samples else None
            if os.environ.get("BENCH_HISTOGRAM"):
                result["histogram"] = up_in
        nursery.cancel_scope.cancel()
    return result


async def _file_phase(case: Case, a: Agent, b: Agent, root: Path, result: dict[str, Any],
                      limit: float) -> None:
    """Issue 11's measure: one file, ``send`` then ``wait`` (verification included)."""
    import random

    src = root / "file.bin"
    src.write_bytes(random.Random(case.seed).randbytes(case.file_size))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    async with open_client(b.config.control) as cb:
        with trio.move_on_after(limit) as scope:
            t0 = trio.current_time()
            info = await cb.send_file(src)
            final = await cb.wait(info["id"])
            t1 = trio.current_time()
    if scope.cancelled_caught:
        result["errors"].append(f"file: not done after {limit:.0f} s")
        return
    got = a.config.inbox / "file.bin"
    ok = final.get("state") == "done" and got.exists() and \
        hashlib.sha256(got.read_bytes()).hexdigest() == digest
    if not ok:
        result["errors"].append(f"file: state {final.get('state')}, bytes differ or missing")
    result["single"] = {"ok": ok, "duration": t1 - t0,
                        "goodput_whole": case.file_size * 8 / (t1 - t0)}
    if b.session is not None:
        result["path"] = dataclasses.asdict(b.session.conn.path_stats())


FILE_HEADER = ("| link (2.4 Mbit/s, 750 ms) | cap | file | send → done | good all / cap"
               " | target | wire max | lost pkts | spurious | tail copies | ok |")
FILE_RULE = "|---" * 11 + "|"


def file_row(res: dict[str, Any]) -> str:
    cap = res["cap"]
    single = res.get("single") or {}
    path = res.get("path") or {}
    good = single.get("goodput_whole")
    target = res.get("target", 0.0)
    wm = res.get("wire_max")
    verdict = []
    if good is None or good / cap < target:
        verdict.append("missed")
    if wm is not None and wm / cap > TARGET_WIRE:
        verdict.append("CAP")
    if res.get("errors") or not single.get("ok"):
        verdict.append("ERROR")
    cells = [res.get("label", res["profile"]), _fmt_rate(cap),
             f"{res.get('file_size', 0) / 1e6:g} MB",
             f"{single['duration']:.2f} s" if single.get("duration") else "—",
             f"{good / cap:.3f}" if good else "—", f"≥ {target:.2f}",
             f"{wm / cap:.3f}" if wm is not None else "—",
             str(path.get("lost_packets", "—")), str(path.get("spurious_losses", "—")),
             str(path.get("tail_copies", "—")), " ".join(verdict) or "yes"]
    return "| " + " | ".join(cells) + " |"


# ---- driver: one process per case ---------------------------------------------------


def _one(case: Case) -> dict[str, Any]:
    if os.environ.get("BENCH_LOG"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f %(name)s "
                            "%(message)s")
    with tempfile.TemporaryDirectory(prefix="quelay-links-") as tmp:
        return trio.run(run_case, case, Path(tmp))


def _spawn(case: Case, timeout: float) -> dict[str, Any]:
    """Run one case in its own process group (the simulator process included)."""
    res, error = run_isolated([sys.executable, __file__, "--_case", json.dumps(case.__dict__)],
                              timeout)
    return res if res is not None else {**_ident(case), "errors": [error]}


def _ident(case: Case) -> dict[str, Any]:
    return {"profile": get_profile(case.profile).name, "congestion": case.congestion,
            "factor": case.factor, "cap": case.cap(), "label": case.label,
            "target": case.target, "file_size": case.file_size}


def _fmt_rate(bps: float) -> str:
    if bps >= 1e6:
        return f"{bps / 1e6:g}M"
    return f"{bps / 1e3:g}k"


HEADER = ("| profile | cc | cap | wire max | send max | send 1.01 | wire mean | good st"
          " | good all | spread | 4x good | 4th start | lost pkts | sim q-drops | srtt | ok |")
RULE = "|---" * 16 + "|"


def row(res: dict[str, Any]) -> str:
    cap = res["cap"]
    cells = [res["profile"], res["congestion"],
             _fmt_rate(cap) if res.get("factor") != 0 else f"none (÷{_fmt_rate(cap)})"]
    single, fair = res.get("single"), res.get("fair")
    wm = res.get("wire_max")
    cells.append(f"{wm / cap:.3f}" if wm is not None else "—")
    for key in ("send_max", "send_max_10ms"):
        cells.append(f"{res[key] / cap:.3f}" if res.get(key) is not None else "—")
    if single:
        cells += [f"{single['wire_mean'] / cap:.3f}", f"{single['goodput_steady'] / cap:.3f}",
                  f"{single['goodput_whole'] / cap:.3f}"]
    else:
        cells += ["—"] * 3
    if fair:
        cells += [f"{fair['spread']:.3f}", f"{fair['goodput'] / cap:.3f}",
                  f"{fair['start_delay']:.1f} s"]
    else:
        cells += ["—"] * 3
    lost = single.get("lost_packets") if single else None
    if fair and lost is not None:
        lost += fair.get("lost_packets") or 0
    cells.append(str(lost) if lost is not None else "—")
    sim_up = res.get("sim_up")
    cells.append(str(sim_up["dropped_queue"]) if sim_up else "—")
    srtt = res.get("srtt_median")
    cells.append(f"{srtt * 1000:.0f} ms" if srtt else "—")
    verdict = []
    if wm is not None and wm / cap > TARGET_WIRE and res.get("factor") != 0:
        exact = res.get("send_max")
        verdict.append("CAP" if exact is None or exact / cap > TARGET_WIRE else "CAP(sim)")
    if single and single["goodput_steady"] / cap < goodput_target(res["profile"]):
        verdict.append("GOODPUT")
    if single and not single.get("ok"):
        verdict.append("BYTES")
    if res.get("errors"):
        verdict.append("ERROR")
    cells.append(" ".join(verdict) if verdict else "yes")
    if res.get("failed_attempts"):
        cells[-1] += " (retried)"
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help="comma-separated profile names (default: all four)")
    p.add_argument("--congestion", default=",".join(CONGESTION),
                   help="comma-separated: reno, cubic, allotted (default: all)")
    p.add_argument("--caps", default="1,0.5",
                   help="cap factors × the profile's uplink rate (default 1,0.5); 0 runs the"
                   " agent uncapped and divides by the uplink rate")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="seconds of data at the cap per phase (default 60)")
    p.add_argument("--quick", action="store_true", help="15 s per phase instead of 60")
    p.add_argument("--clean-rate", type=float, default=20e6,
                   help="the clean profile's stand-in uplink rate, bit/s (default 20e6)")
    p.add_argument("--seed", type=int, default=1, help="link simulator seed (default 1)")
    p.add_argument("--fair-seconds", type=float, default=0.0,
                   help="measurement interval of the 4-stream phase (default: --seconds)")
    p.add_argument("--inproc-sim", action="store_true",
                   help="run the simulator inside the agents' process (default: its own)")
    p.add_argument("--probe-interval", type=float, default=0.0,
                   help="the dialling agent's probe_interval (default 0: max(1 s, 4 × RTT))")
    p.add_argument("--retries", type=int, default=1,
                   help="run a case that failed (crash, stall) again this often (default 1)")
    p.add_argument("--single-only", action="store_true",
                   help="skip the 4-stream fairness phase")
    p.add_argument("--file-test", action="store_true",
                   help="issue 11's whole-transfer file test instead (see the docstring)")
    p.add_argument("--file-size", type=int, default=2_000_000,
                   help="the file test's file size in bytes (default 2000000)")
    p.add_argument("--max-datagram", type=int, default=0,
                   help="both agents' max_datagram_size (default: the agent's own)")
    p.add_argument("--json", type=Path, help="also write every case's raw result here")
    p.add_argument("--table", type=Path, metavar="JSON",
                   help="print the table of a previous run's --json file and exit")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.table:
        rows = json.loads(args.table.read_text())
        is_file = bool(rows) and bool(rows[0].get("file_size"))
        print(FILE_HEADER if is_file else HEADER)
        print(FILE_RULE if is_file else RULE)
        for res in rows:
            print(file_row(res) if is_file else row(res))
        return

    if args._case:
        res = _one(Case(**json.loads(args._case)))
        print(json.dumps(res))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds = 15.0 if args.quick else args.seconds
    profiles = [get_profile(n).name for n in args.profiles.split(",") if n.strip()]
    ccs = [c.strip() for c in args.congestion.split(",") if c.strip()]
    for cc in ccs:
        if cc not in CONGESTION:
            p.error(f"unknown congestion control {cc!r}")
    factors = [float(f) for f in args.caps.split(",")]
    cases = [Case(prof, cc, f, seconds, args.clean_rate, args.seed,
                  sim_process=not args.inproc_sim, probe=args.probe_interval,
                  fair_seconds=args.fair_seconds, fair=not args.single_only,
                  max_datagram=args.max_datagram)
             for prof in profiles for f in factors for cc in ccs]
    if args.file_test:
        cases = [Case(spec, cc, FILE_CAP / 2.4e6, 0.0, args.clean_rate, args.seed,
                      sim_process=not args.inproc_sim, probe=args.probe_interval,
                      file_size=args.file_size, label=label, target=target,
                      max_datagram=args.max_datagram)
                 for label, (spec, target) in FILE_PROFILES.items() for cc in ccs]
    print(f"# bench/links.py: {len(cases)} cases, {seconds:g} s per phase, seed {args.seed},"
          f" simulator {'in-process' if args.inproc_sim else 'in its own process'}",
          flush=True)
    print(FILE_HEADER if args.file_test else HEADER)
    print(FILE_RULE if args.file_test else RULE, flush=True)
    results = []
    for case in cases:
        timeout = 4 * seconds + 2 * (args.fair_seconds or seconds) + 400
        res = _spawn(case, timeout)
        failed: list[str] = []
        for attempt in range(args.retries):
            if not res.get("errors"):
                break
            failed += res["errors"]
            case = dataclasses.replace(case, seed=case.seed + 100 * (attempt + 1))
            res = _spawn(case, timeout)
        if failed:
            res["failed_attempts"] = failed
        results.append(res)
        print(file_row(res) if args.file_test else row(res), flush=True)
        for err in res.get("failed_attempts", []):
            print(f"#   {res['profile']} {res['congestion']} {_fmt_rate(res['cap'])}:"
                  f" an earlier attempt failed: {err}", flush=True)
        for err in res.get("errors", []):
            print(f"#   {res['profile']} {res['congestion']} {_fmt_rate(res['cap'])}: {err}",
                  flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
