"""Hot-path benchmark: the C module versus the pure-Python model, in one run.

    python bench/native.py [--seconds 0.5]

Spool: write + readinto (into a preallocated buffer) + ack cycles through a
1 MiB spool at 1 KiB, 16 KiB and 64 KiB chunks -> bytes/s.
DRR: schedule() rounds over 10, 100 and 1000 backlogged bulk streams with
mixed priorities; the budget is one round's worth minus one byte, so every
visit goes through the per-stream loop (no whole-round shortcut) and every
call returns one grant per stream -> rounds/s and µs/round.

Not a test: figures depend on the machine.  Targets: C >= 2 GB/s at 64 KiB,
C >= 10x the model at 1 KiB, a 1000-stream round <= 50 µs from Python.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.native import _model as pynative  # noqa: E402
from quelay.native.errors import MAX_BYTES  # noqa: E402

try:
    from quelay.native import _cffi_backend as cnative  # noqa: E402
except ImportError as exc:
    sys.exit(f"bench/native.py needs the C module: {exc}")

KiB = 1024
MiB = 1024 * KiB


def measure(step: Callable[[int], None], seconds: float) -> tuple[int, float]:
    """Run step(batch) until `seconds` have passed; return (iterations, elapsed)."""
    batch = 1
    # warm up and find a batch size that takes ~10 ms
    while True:
        t0 = time.perf_counter()
        step(batch)
        dt = time.perf_counter() - t0
        if dt > 0.01 or batch >= 1 << 20:
            break
        batch *= 2
    done, elapsed = 0, 0.0
    while elapsed < seconds:
        t0 = time.perf_counter()
        step(batch)
        elapsed += time.perf_counter() - t0
        done += batch
    return done, elapsed


def spool_rate(mod: Any, chunk: int, seconds: float) -> float:
    """Bytes per second through write + readinto + ack."""
    s = mod.Spool(1 * MiB)
    data = os.urandom(chunk)
    buf = bytearray(chunk)
    write, readinto, ack = s.write, s.readinto, s.ack
    state = [0]

    def step(n: int) -> None:
        off = state[0]
        for _ in range(n):
            write(data)
            off += readinto(buf)
            ack(off)
        state[0] = off

    iters, elapsed = measure(step, seconds)
    assert s.tail == s.acked == state[0] and s.pending == 0
    return iters * chunk / elapsed


def spool_read_rate(mod: Any, chunk: int, seconds: float) -> float:
    """Bytes per second through write + read (a new bytes object) + ack."""
    s = mod.Spool(1 * MiB)
    data = os.urandom(chunk)
    write, read, ack = s.write, s.read, s.ack
    state = [0]

    def step(n: int) -> None:
        off = state[0]
        for _ in range(n):
            write(data)
            off += len(read(chunk))
            ack(off)
        state[0] = off

    iters, elapsed = measure(step, seconds)
    return iters * chunk / elapsed


def drr_rate(mod: Any, nstreams: int, seconds: float) -> tuple[float, float]:
    """(rounds per second, µs per round) for one DRR round over `nstreams`."""
    t = mod.DrrTable(16384)
    for sid in range(nstreams):
        t.add(sid, sid % 16)
        t.set_backlog(sid, MAX_BYTES)
    budget = sum(t.quantum(sid) for sid in range(nstreams)) - 1
    schedule = t.schedule
    grants = schedule(budget)
    assert len(grants) >= nstreams - 1, len(grants)

    def step(n: int) -> None:
        for _ in range(n):
            schedule(budget)

    iters, elapsed = measure(step, seconds)
    return iters / elapsed, elapsed / iters * 1e6


def drr_c_only_us(nstreams: int, seconds: float) -> float:
    """µs per round spent inside C (no Python list built): the floor of drr_rate()."""
    t = cnative.DrrTable(16384)
    for sid in range(nstreams):
        t.add(sid, sid % 16)
        t.set_backlog(sid, MAX_BYTES)
    budget = sum(t.quantum(sid) for sid in range(nstreams)) - 1
    call, d, out = cnative.lib.qn_drr_schedule, t._d, t._gp

    def step(n: int) -> None:
        for _ in range(n):
            call(d, budget, out)

    iters, elapsed = measure(step, seconds)
    return elapsed / iters * 1e6


def fmt_rate(bps: float) -> str:
    return f"{bps / 1e9:7.2f} GB/s" if bps >= 1e9 else f"{bps / 1e6:7.1f} MB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    sec = args.seconds
    ok = True

    print(f"Python {sys.version.split()[0]} on {os.uname().machine}, {sec:.2f} s per figure\n")
    print("Spool: write + readinto + ack, 1 MiB spool")
    print(f"  {'chunk':>8}  {'C':>12}  {'Python model':>12}  {'C/Python':>8}")
    results: dict[int, tuple[float, float]] = {}
    for chunk in (1 * KiB, 16 * KiB, 64 * KiB):
        c = spool_rate(cnative, chunk, sec)
        p = spool_rate(pynative, chunk, sec)
        results[chunk] = (c, p)
        print(f"  {chunk // KiB:>5} KiB  {fmt_rate(c):>12}  {fmt_rate(p):>12}  {c / p:>7.1f}x")

    print("\nSpool: write + read (new bytes) + ack, 1 MiB spool")
    print(f"  {'chunk':>8}  {'C':>12}  {'Python model':>12}  {'C/Python':>8}")
    for chunk in (1 * KiB, 16 * KiB, 64 * KiB):
        c = spool_read_rate(cnative, chunk, sec)
        p = spool_read_rate(pynative, chunk, sec)
        print(f"  {chunk // KiB:>5} KiB  {fmt_rate(c):>12}  {fmt_rate(p):>12}  {c / p:>7.1f}x")

    print("\nDRR: one round (budget = sum of quanta - 1), mixed priorities")
    print(f"  {'streams':>8}  {'C rounds/s':>11}  {'C µs/round':>10}  "
          f"{'Py rounds/s':>11}  {'Py µs/round':>11}  {'C/Python':>8}")
    drr: dict[int, float] = {}
    for n in (10, 100, 1000):
        c_rps, c_us = drr_rate(cnative, n, sec)
        p_rps, p_us = drr_rate(pynative, n, sec)
        drr[n] = c_us
        print(f"  {n:>8}  {c_rps:>11.0f}  {c_us:>10.1f}  {p_rps:>11.0f}  {p_us:>11.1f}  "
              f"{c_rps / p_rps:>7.1f}x")

    c_only = drr_c_only_us(1000, sec)
    print(f"  (1000 streams: the C call alone takes {c_only:.1f} µs/round; the rest is "
          "building the list of 1000 (id, nbytes) tuples in Python)")

    print("\nTargets")
    checks = [
        ("C spool >= 2 GB/s at 64 KiB", results[64 * KiB][0] >= 2e9,
         fmt_rate(results[64 * KiB][0]).strip()),
        ("C spool >= 10x the model at 1 KiB", results[KiB][0] >= 10 * results[KiB][1],
         f"{results[KiB][0] / results[KiB][1]:.1f}x"),
        ("1000-stream DRR round <= 50 µs", drr[1000] <= 50, f"{drr[1000]:.1f} µs"),
    ]
    for label, passed, figure in checks:
        ok &= passed
        print(f"  [{'ok' if passed else 'MISSED'}] {label}: {figure}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
