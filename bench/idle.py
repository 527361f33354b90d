"""Idle benchmark: the CPU a connected pair of ``quelay run`` processes uses with no transfers.

    flock /tmp/quelay-cpu.lock python bench/idle.py [--seconds 20] [--rates 0,100kbps]
                                                    [--settle 3] [--json FILE]

For each rate cap, two agents run as separate ``quelay run`` processes on
loopback (A listens, B dials, both pinned to each other, default settings
otherwise: keep-alive 1 s). Once the link is up and a settle time has passed,
each process's CPU time (utime + stime of every thread, from
``/proc/PID/stat``) and its main thread's voluntary context switches (from
``/proc/PID/status``: how often the event loop went to sleep, i.e. woke up)
are read, then read again ``--seconds`` later.

Columns: ``cpu %`` (CPU seconds / wall seconds × 100, per process: % of one
core; 10-ms resolution), ``sched %`` (the same from the live threads'
``/proc/PID/task/*/schedstat``, in nanoseconds), ``wakes/s`` (voluntary
context switches per second of the main thread). Target (issue 12):
≤ 0.5 % of a core each. A last row measures the same way a bare Trio loop
that only sleeps, waking ``--reference-wakes`` times a second (the agents'
rate): on a virtual machine a wake-up costs far more than the work done in
it, and this row says how much. Not a test: the figures depend on the
machine and its load; run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.client import AgentUnavailable, open_client  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402

TARGET_PERCENT = 0.5
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def run_ns(pid: int) -> int:
    """Nanoseconds on a CPU, summed over the live threads (/proc/PID/task/*/schedstat):
    finer than the 10-ms ticks of ``cpu_seconds``, blind to threads that exited."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
    return total


def voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise RuntimeError("no voluntary_ctxt_switches in /proc status")


Sample = tuple[float, int, int]  # (CPU seconds, voluntary switches, run ns)


def sample(pid: int) -> Sample:
    """One reading of a process: :func:`cpu_seconds`, :func:`voluntary_switches`,
    :func:`run_ns`."""
    return cpu_seconds(pid), voluntary_switches(pid), run_ns(pid)


def usage(before: Sample, after: Sample, wall: float) -> dict[str, float]:
    """What a process used between two samples ``wall`` seconds apart."""
    cpu = after[0] - before[0]
    return {"cpu_s": round(cpu, 3), "cpu_percent": round(100 * cpu / wall, 3),
            "sched_percent": round(100 * (after[2] - before[2]) / 1e9 / wall, 3),
            "wakes_per_s": round((after[1] - before[1]) / wall, 1)}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def link_up(control: Path, timeout: float) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                async with open_client(control) as client:
                    while (await client.status())["link"]["state"] != "up":
                        await trio.sleep(0.2)
                    return
            except (OSError, AgentUnavailable):
                await trio.sleep(0.2)


def run_case(rate: str, seconds: float, settle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="quelay-idle-") as tmp:
        root = Path(tmp)
        fps = {side: load_or_create_identity(root / side).fingerprint for side in "ab"}
        port = free_udp_port()
        # The console script's entry point (pyproject: quelay = "quelay.cli:main"), run by
        # this interpreter so that the PID we read is the agent itself.
        base = [sys.executable, "-c", "from quelay.cli import main; main()", "run",
                "--rate", rate]
        cmds = {
            "a": [*base, "--state-dir", str(root / "a"), "--listen", f"127.0.0.1:{port}",
                  "--trust", fps["b"], "--name", "a"],
            "b": [*base, "--state-dir", str(root / "b"), "--peer", f"127.0.0.1:{port}",
                  "--trust", fps["a"], "--name", "b"],
        }
        logs = {side: (root / f"{side}.log").open("wb") for side in cmds}
        procs = {side: subprocess.Popen(cmd, stdout=logs[side], stderr=subprocess.STDOUT)
                 for side, cmd in cmds.items()}
        try:
            for side in "ab":
                trio.run(link_up, root / side / "control.sock", 30.0)
            time.sleep(settle)
            before = {s: sample(p.pid) for s, p in procs.items()}
            t0 = time.monotonic()
            time.sleep(seconds)
            wall = time.monotonic() - t0
            after = {s: sample(p.pid) for s, p in procs.items()}
            for side, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"agent {side} exited with {p.returncode}")
        except BaseException:
            for side in procs:
                logs[side].flush()
                tail = (root / f"{side}.log").read_text(errors="replace")[-2000:]
                print(f"--- agent {side} log (tail) ---\n{tail}", file=sys.stderr)
            raise
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            for f in logs.values():
                f.close()
    out: dict[str, Any] = {"rate": rate, "seconds": round(wall, 2)}
    for side in "ab":
        out[side] = usage(before[side], after[side], wall)
    out["ok"] = all(out[s]["cpu_percent"] <= TARGET_PERCENT for s in "ab")
    return out


REFERENCE = """
import trio
async def main(period):
    while True:
        await trio.sleep(period)
trio.run(main, 1 / {wakes})
"""


def run_reference(wakes: float, seconds: float, settle: float) -> dict[str, Any]:
    """The machine's floor: a bare Trio loop that only sleeps, ``wakes`` times a second,
    in its own process, measured as the agents are (on a VM every wake-up costs its
    scheduling, whoever wakes)."""
    proc = subprocess.Popen([sys.executable, "-c", REFERENCE.format(wakes=wakes)])
    try:
        time.sleep(settle)
        before = sample(proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        after = sample(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {"wakes": wakes, **usage(before, after, wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--rates", default="0,100kbps",
                        help="comma-separated caps (0 = uncapped)")
    parser.add_argument("--reference-wakes", type=float, default=2.0,
                        help="wake-ups per second of the bare-Trio reference row (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    print(f"{'rate':>10} {'A cpu %':>8} {'A sched %':>9} {'A wakes/s':>10}"
          f" {'B cpu %':>8} {'B sched %':>9} {'B wakes/s':>10}  ok")
    for rate in args.rates.split(","):
        res = run_case(rate.strip(), args.seconds, args.settle)
        results.append(res)
        a, b = res["a"], res["b"]
        print(f"{res['rate']:>10} {a['cpu_percent']:>8.2f} {a['sched_percent']:>9.3f}"
              f" {a['wakes_per_s']:>10.1f} {b['cpu_percent']:>8.2f} {b['sched_percent']:>9.3f}"
              f" {b['wakes_per_s']:>10.1f}  "
              f"{'ok' if res['ok'] else 'MISS'}", flush=True)
    if args.reference_wakes > 0:
        ref = run_reference(args.reference_wakes, args.seconds, args.settle)
        results.append({"reference": ref})
        print(f"reference: a bare Trio loop waking {ref['wakes']:g} times/s: cpu "
              f"{ref['cpu_percent']:.2f} %, sched {ref['sched_percent']:.3f} %, "
              f"{ref['wakes_per_s']:.1f} wakes/s (what waking costs on this machine)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
