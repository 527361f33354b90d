"""Scale benchmark: many transfers on one link, best-effort datagrams, resumed reconnects.

    flock /tmp/quelay-cpu.lock python bench/scale.py [--only open,active,datagram,reconnect]
        [--opens 1000,10000] [--streams 1,10,100,1000] [--total 64MB] [--rounds 5]
        [--json FILE]

Two agents in this process on loopback UDP (the link simulator where a case
needs a long path), driven through their control sockets where a client would
be, and through the book directly where a client per stream would only
measure the client:

* **open** — N ``open_stream`` requests on one control connection (sequential,
  as a script would issue them), timed until the peer holds all N incoming
  transfers. Then RSS (``/proc/self/statm``) after minus before, over N: the
  memory of one *idle open transfer at both ends* (sender's record, spool and
  QUIC stream, the receiver's record and QUIC stream), with the spools'
  allocated bytes beside it (idle spools should hold nothing).
* **active** — N streams carry ``--total`` bytes between them (each total/N),
  uncapped; every stream is written by a task of this process into its pipe
  and read out of the receiver's pipe. Reported: aggregate MB/s, this process's
  CPU (both agents, writers and readers) per MB and per datagram the sender
  sent, and the ratio of CPU per byte to the one-stream case (target: 1000
  streams ≤ 1.5 × one stream), plus RSS growth at the peak over N.
* **datagram** — a 2 Mbit/s cap at the sender, 375 ms each way (750 ms RTT) in
  the simulator, a bulk file saturating the cap; a datagram every 100 ms for
  10 s. Latency = the receiving agent's ``received_at`` minus the sending
  agent's ``sent_at`` (one clock: one process). Target: ≤ one-way delay + 50 ms.
* **reconnect** — the BLOS-750ms profile (100 kbit/s up, 375 ms ± 50 ms each
  way), agents connected and idle; ``--rounds`` times the dialler drops the
  connection and redials at once (``reconnect_interval = 0``): time from the
  drop to both sessions up, with resumption on and off. Target: resumed at
  least one RTT (750 ms) faster.

Not a test: figures depend on the machine; run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.agent import Agent, AgentConfig  # noqa: E402
from quelay.agent.pipes import OutboundPipe  # noqa: E402
from quelay.client import open_client  # noqa: E402
from quelay.core import messages as wire  # noqa: E402
from quelay.core.transfer import State, Transfer  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402
from quelay.linksim import get_profile, open_linksim  # noqa: E402
from quelay.linksim.profiles import DirectionParams, Profile  # noqa: E402
from quelay.units import parse_size  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1_000_000
CHUNK = 64 * 1024


def rss(*, collect: bool = True) -> int:
    if collect:  # not while measuring CPU: a collection of a thousand transfers costs
        gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@asynccontextmanager
async def agent_pair(root: Path, *, profile: Profile | None = None, rate: int = 0,
                     **overrides: Any) -> AsyncIterator[tuple[Agent, Agent, Any]]:
    """A listens on loopback; B dials it (through the simulator if ``profile``)."""
    root.mkdir(parents=True, exist_ok=True)
    fp_a = load_or_create_identity(root / "a" / "state").fingerprint
    fp_b = load_or_create_identity(root / "b" / "state").fingerprint

    def config(side: str, **kw: Any) -> AgentConfig:
        return AgentConfig(name=side, state_dir=root / side / "state",
                           inbox=root / side / "inbox", control=root / side / "c.sock",
                           **overrides, **kw)

    async with trio.open_nursery() as nursery:
        a = Agent(config("a", listen=("127.0.0.1", 0), trust=[fp_b]))
        await nursery.start(a.run)
        if profile is None:
            b = Agent(config("b", peer=a.udp_address, trust=[fp_a], rate=rate))
            await nursery.start(b.run)
            await _until(lambda: a.link_state == "up" and b.link_state == "up", 60)
            yield a, b, None
        else:
            async with open_linksim(upstream=a.udp_address, profile=profile, seed=1) as sim:
                b = Agent(config("b", peer=sim.address, trust=[fp_a], rate=rate))
                await nursery.start(b.run)
                await _until(lambda: a.link_state == "up" and b.link_state == "up", 60)
                yield a, b, sim
        nursery.cancel_scope.cancel()


async def _until(condition: Any, limit: float, step: float = 0.005) -> None:
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(step)


# -- open: time to open N transfers, memory per idle open transfer ---------------------


async def case_open(root: Path, n: int) -> dict[str, Any]:
    async with agent_pair(root, max_streams=max(1024, n + 64),
                          max_incoming=max(4096, n + 64)) as (a, b, _):
        before = rss()
        started = time.perf_counter()
        async with open_client(b.config.control) as cb:
            for i in range(n):
                await cb.request("open_stream", name=f"idle-{i}")
        requested = time.perf_counter() - started
        await _until(lambda: a.book.table.live_incoming() >= n, 600)
        elapsed = time.perf_counter() - started
        await trio.sleep(1.0)  # let acknowledgements and buffers settle
        after = rss()
        allocated = sum(b.book.runtime(t).out.spool.allocated  # type: ignore[union-attr]
                        for t in b.book.table.live("out") if b.book.runtime(t).out is not None)
        return {"n": n, "requests_s": requested, "open_s": elapsed,
                "per_second": n / elapsed, "rss_per_idle": (after - before) / n,
                "spool_allocated": allocated}


# -- active: N streams at once, uncapped ------------------------------------------------


async def case_active(root: Path, n: int, total: int) -> dict[str, Any]:
    each = max(1, total // n)
    payload = os.urandom(min(each, CHUNK))
    async with agent_pair(root, max_streams=max(1024, n + 64),
                          max_incoming=max(4096, n + 64)) as (a, b, _):
        base_rss = rss()
        peak = {"rss": base_rss, "alloc": 0}
        transfers: list[Transfer] = []
        received = {"bytes": 0, "streams": 0}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sent0 = b.sock.counters.datagrams_sent if b.sock is not None else 0

        async def write(pipe: OutboundPipe) -> None:
            left = each
            view = memoryview(payload)
            while left:
                chunk = view[: min(left, len(view))]
                while chunk:
                    chunk = chunk[await pipe.write(chunk):]
                left -= min(left, len(view))
            pipe.end()

        async def read(t_in: Transfer) -> None:
            reader_side, agent_side = trio.testing.memory_stream_pair()
            t_in.claimed = t_in.attached = True
            runtime = a.book.runtime(t_in)
            assert runtime.inp is not None
            runtime.inp.attach(agent_side)
            got = 0
            while got < each:
                chunk = await reader_side.receive_some(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
            received["bytes"] += got
            received["streams"] += 1

        async def readers(nursery: trio.Nursery) -> None:
            started: set[str] = set()
            while len(started) < n:
                for t_in in a.book.table.live("in"):
                    if t_in.kind == "stream" and t_in.id not in started:
                        started.add(t_in.id)
                        nursery.start_soon(read, t_in)
                await trio.sleep(0.005)

        async def sampler() -> None:
            while True:
                await trio.sleep(0.5)
                peak["rss"] = max(peak["rss"], rss(collect=False))
                alloc = sum(b.book.runtime(t).out.spool.allocated  # type: ignore[union-attr]
                            for t in transfers if b.book.runtime(t).out is not None)
                peak["alloc"] = max(peak["alloc"], alloc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(readers, nursery)
            nursery.start_soon(sampler)
            for i in range(n):
                pipe = OutboundPipe(b.spool_size)
                t = Transfer(wire.new_transfer_id(), "out", "stream", f"s{i}", None, 4)
                b.book.submit(t, pipe)
                transfers.append(t)
                nursery.start_soon(write, pipe)
            with trio.fail_after(1800):
                for t in transfers:
                    await b.book.wait_finished(t)
                while received["streams"] < n:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        sent = (b.sock.counters.datagrams_sent if b.sock is not None else 0) - sent0
        bad = [t for t in transfers if t.state is not State.DONE]
        moved = received["bytes"]
        return {"n": n, "bytes": moved, "ok": not bad and moved == each * n,
                "mb_s": moved / MB / wall, "cpu_s": cpu, "cpu_per_mb": cpu / (moved / MB),
                "datagrams": sent, "cpu_us_per_datagram": cpu / max(1, sent) * 1e6,
                "rss_per_active": (peak["rss"] - base_rss) / n, "peak_alloc": peak["alloc"]}


# -- datagram: latency under a saturated cap -------------------------------------------


async def case_datagram(root: Path, seconds: float = 10.0) -> dict[str, Any]:
    one_way = 0.375
    profile = Profile(name="2M-750ms", up=DirectionParams(delay_s=one_way),
                      down=DirectionParams(delay_s=one_way))
    cap = 2_000_000
    src = root / "bulk.bin"
    src.write_bytes(os.urandom(int(cap / 8 * (seconds + 15))))
    async with agent_pair(root, profile=profile, rate=cap) as (a, b, sim):
        async with open_client(a.config.control) as ca, open_client(b.config.control) as cb:
            info = await cb.send_file(src, name="bulk.bin")
            await _until(lambda: b.transfers[info["id"]].delivered > 200_000, 60)
            latencies: list[float] = []
            sent_count = 0
            delivered0 = b.transfers[info["id"]].delivered
            t0 = trio.current_time()

            async def receiver() -> None:
                while True:
                    for msg in await ca.datagram_recv("pos", count=256):
                        latencies.append(msg["received_at"] - msg["sent_at"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                while trio.current_time() - t0 < seconds:
                    await cb.datagram_send("pos", f"fix {sent_count}".encode(), check=False)
                    sent_count += 1
                    await trio.sleep(0.1)
                await trio.sleep(2 * one_way + 0.5)
                nursery.cancel_scope.cancel()
            goodput = (b.transfers[info["id"]].delivered - delivered0) * 8 / \
                (trio.current_time() - t0)
            status = b.datagrams.status() if hasattr(b, "datagrams") else {}
        lat = sorted(latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        return {"sent": sent_count, "delivered": len(lat), "one_way": one_way,
                "p50": pct(0.5), "p95": pct(0.95), "max": lat[-1] if lat else float("nan"),
                "excess_p95_ms": (pct(0.95) - one_way) * 1000,
                "excess_max_ms": ((lat[-1] if lat else float("nan")) - one_way) * 1000,
                "bulk_goodput_bps": goodput, "cap": cap, "counters": status}


# -- reconnect: with and without resumption --------------------------------------------


async def case_reconnect(root: Path, rounds: int, resumption: bool) -> dict[str, Any]:
    profile = get_profile("BLOS-750ms")
    cap = int(profile.up.rate_bps or 0)
    times: list[float] = []
    wire: list[int] = []
    async with agent_pair(root, profile=profile, rate=cap, resumption=resumption,
                          reconnect_interval=0.05) as (a, b, sim):
        if resumption:
            await _until(lambda: b.tickets.held("peer") is not None, 30)
        for _ in range(rounds):
            await trio.sleep(2.0)  # the peer has seen the last session's hello settle
            ups = (a.link_ups, b.link_ups)
            assert b.session is not None
            started = trio.current_time()
            carried = sim.stats.up.wire_bytes_in + sim.stats.down.wire_bytes_in
            b.session.conn.close("bench: reconnect")
            await _until(lambda u=ups: a.link_ups > u[0] and b.link_ups > u[1]
                         and a.link_state == "up" and b.link_state == "up", 60)
            times.append(trio.current_time() - started)
            wire.append(sim.stats.up.wire_bytes_in + sim.stats.down.wire_bytes_in - carried)
        modes = dict(b.book.stats.handshakes)
    return {"resumption": resumption, "rounds": rounds, "times": times,
            "median": statistics.median(times), "min": min(times), "max": max(times),
            "wire_bytes": statistics.median(wire), "handshakes": modes}


# -- report ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="open,active,datagram,reconnect")
    parser.add_argument("--opens", default="1000,10000")
    parser.add_argument("--streams", default="1,10,100,1000")
    parser.add_argument("--total", default="64MB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    only = set(args.only.split(","))
    out: dict[str, Any] = {}

    def run(fn: Any, *a: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="quelay-scale-") as tmp:
            return trio.run(fn, Path(tmp), *a)

    if "open" in only:
        out["open"] = []
        print("| transfers | requests (s) | all open at the peer (s) | opens/s "
              "| RSS per idle open transfer | spool bytes allocated |")
        print("|---|---|---|---|---|---|")
        for n in (int(x) for x in args.opens.split(",")):
            r = run(case_open, n)
            out["open"].append(r)
            print(f"| {n} | {r['requests_s']:.2f} | {r['open_s']:.2f} | {r['per_second']:.0f} "
                  f"| {r['rss_per_idle'] / 1024:.1f} KiB | {r['spool_allocated']} |", flush=True)
    if "active" in only:
        total = parse_size(args.total)
        out["active"] = []
        print("\n| active streams | MB/s | CPU s per MB | µs CPU per datagram "
              "| CPU per byte vs 1 stream | RSS growth per stream | peak spool alloc | ok |")
        print("|---|---|---|---|---|---|---|---|")
        base = None
        for n in (int(x) for x in args.streams.split(",")):
            r = run(case_active, n, total)
            out["active"].append(r)
            base = base or r["cpu_per_mb"]
            r["ratio"] = r["cpu_per_mb"] / base
            print(f"| {n} | {r['mb_s']:.1f} | {r['cpu_per_mb']:.3f} "
                  f"| {r['cpu_us_per_datagram']:.0f} | {r['ratio']:.2f} "
                  f"| {r['rss_per_active'] / 1024:.1f} KiB | {r['peak_alloc'] / 1024:.0f} KiB "
                  f"| {r['ok']} |", flush=True)
    if "datagram" in only:
        r = run(case_datagram)
        out["datagram"] = r
        print(f"\ndatagrams under a saturated {r['cap'] / 1e6:.0f} Mbit/s cap, "
              f"{r['one_way'] * 1000:.0f} ms one way: {r['delivered']}/{r['sent']} delivered; "
              f"latency p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms, "
              f"max {r['max'] * 1000:.0f} ms; beyond the one-way delay: p95 "
              f"{r['excess_p95_ms']:.0f} ms, max {r['excess_max_ms']:.0f} ms (target ≤ 50); "
              f"bulk goodput meanwhile {r['bulk_goodput_bps'] / 1e6:.2f} Mbit/s", flush=True)
    if "reconnect" in only:
        out["reconnect"] = []
        print("\n| BLOS-750ms reconnect | median (s) | min | max "
              "| bytes on the link per reconnect (both ways, headers) | handshakes |")
        print("|---|---|---|---|---|---|")
        for resumption in (False, True):
            r = run(case_reconnect, args.rounds, resumption)
            out["reconnect"].append(r)
            print(f"| resumption {'on' if resumption else 'off'} | {r['median']:.2f} "
                  f"| {r['min']:.2f} | {r['max']:.2f} | {r['wire_bytes']:.0f} "
                  f"| {r['handshakes']} |", flush=True)
        off, on = out["reconnect"]
        print(f"resumed reconnect faster by {off['median'] - on['median']:.2f} s "
              f"(target ≥ 0.75 s, one RTT)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
