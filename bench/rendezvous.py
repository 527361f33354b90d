"""Rendezvous benchmark: relayed versus direct on loopback, all in separate processes.

    flock /tmp/quelay-cpu.lock python bench/rendezvous.py [--size 100MB] [--rounds 1]
                                   [--only pair,relayed,direct] [--json FILE]

Each case starts its own processes on loopback: a ``quelay rendezvous`` relay
and two ``quelay run --rendezvous`` agents (default settings, no cap), or,
for the baseline **pair**, one agent ``--listen`` and one ``--peer``.

* **relayed** — both agents ``--rendezvous-direct false``: QUIC through the relay.
* **direct** — punching allowed: the agents start relayed and move direct.

Reported per case: time from starting both agents to ``link up`` on both
(and, for direct, to ``path: direct`` on both); the smoothed RTT the agents
see once idle (added latency of the relay hop); file throughput (``send_file``
at B, ``wait`` until A verified and published it; MB = 10^6 bytes); the
relay's CPU seconds (its ``cpu_seconds`` counter, process time) per 100 MB it
relayed. Not a test: the figures vary with the machine's load; run it under
the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import os
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
from quelay.rendezvous.server import read_status  # noqa: E402
from quelay.units import parse_size  # noqa: E402

SECRET = b"bench-rendezvous-secret-0123456789abcdef"


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "quelay.cli", *args], stdout=out,
                                stderr=out, env=dict(os.environ, PYTHONUNBUFFERED="1"))


async def status(control: Path) -> dict[str, Any]:
    try:
        async with open_client(control) as client:
            result: dict[str, Any] = await client.status()
            return result
    except (OSError, AgentUnavailable):
        return {}


async def run_case(case: str, size: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    secret = work / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    roots = {s: work / s for s in ("a", "b")}
    fps = {s: load_or_create_identity(r / "state").fingerprint for s, r in roots.items()}
    controls = {s: roots[s] / "control.sock" for s in roots}
    relay_control = work / "relay.sock"
    procs: list[subprocess.Popen[bytes]] = []
    port = free_udp_port()
    try:
        if case != "pair":
            procs.append(spawn(["rendezvous", "--listen", f"127.0.0.1:{port}", "--secret-file",
                                str(secret), "--control", str(relay_control),
                                "--stats-interval", "0"], work / "relay.log"))
            with trio.fail_after(10):
                while not relay_control.exists():
                    await trio.sleep(0.02)
        t0 = time.monotonic()
        for side, other in (("a", "b"), ("b", "a")):
            common = ["run", "--trust", fps[other], "--state-dir", str(roots[side] / "state"),
                      "--control", str(controls[side]), "--name", side]
            if case == "pair":
                where = (["--listen", f"127.0.0.1:{port}"] if side == "a"
                         else ["--peer", f"127.0.0.1:{port}"])
            else:
                where = ["--rendezvous", f"127.0.0.1:{port}", "--session", "bench",
                         "--rendezvous-secret-file", str(secret),
                         "--rendezvous-direct", "true" if case == "direct" else "false"]
            procs.append(spawn(common + where, work / f"{side}.log"))
        out: dict[str, Any] = {"case": case}
        with trio.fail_after(60):
            while True:
                infos = [await status(controls[s]) for s in roots]
                if all(i and i["link"]["state"] == "up" for i in infos):
                    break
                await trio.sleep(0.01)
            out["link_up_s"] = round(time.monotonic() - t0, 3)
            if case == "direct":
                while not all(i.get("path") == "direct" for i in infos):
                    await trio.sleep(0.01)
                    infos = [await status(controls[s]) for s in roots]
                out["direct_s"] = round(time.monotonic() - t0, 3)
        await trio.sleep(1.5)  # a few keep-alives: the smoothed RTT settles
        infos = [await status(controls[s]) for s in roots]
        out["path"] = infos[0].get("path", "pair")
        out["rtt_ms"] = round(1000 * max(i["link"].get("rtt") or 0 for i in infos), 3)
        before = await read_status(relay_control) if case != "pair" else None
        src = work / "payload.bin"
        with open(src, "wb") as f:
            chunk = os.urandom(1 << 20)
            left = size
            while left:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        t1 = time.monotonic()
        async with open_client(controls["b"]) as client:
            info = await client.send_file(src)
            final = await client.wait(info["id"])
        elapsed = time.monotonic() - t1
        if final["state"] != "done":
            raise RuntimeError(f"{case}: transfer ended {final['state']}: {final}")
        out["file_MBps"] = round(size / elapsed / 1e6, 2)
        if before is not None:
            after = await read_status(relay_control)
            relayed = after["relayed_bytes"] - before["relayed_bytes"]
            cpu = after["cpu_seconds"] - before["cpu_seconds"]
            out["relayed_MB"] = round(relayed / 1e6, 1)
            out["relay_cpu_s_per_100MB"] = round(cpu / relayed * 1e8, 3) if relayed > 1e6 \
                else None
        return out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="100MB", help="file size (default 100MB)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="pair,relayed,direct")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    size = parse_size(args.size)
    results = []
    with tempfile.TemporaryDirectory(prefix="quelay-bench-rv-") as tmp:
        for r in range(args.rounds):
            for case in args.only.split(","):
                res = await run_case(case, size, Path(tmp) / f"{case}-{r}")
                results.append(res)
                print(json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    trio.run(main)
