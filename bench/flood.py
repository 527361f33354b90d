"""An open UDP port under an Initial flood: what the listener absorbs, at what CPU, and how
fast the trusted peer still connects and moves a file.

    flock /tmp/quelay-cpu.lock python bench/flood.py --seconds 20 --file-mb 20

Three processes besides this one: the listening agent (``quelay run --listen``,
with ``--metrics``), a flooder (``tests/flooder.py --mode spoof`` from eight
loopback source addresses, flat out, never answering), and the trusted
dialler (``quelay run --peer``), started twice: once without the flood
(baseline) and once during it. Reported: Initials the listener absorbed per
second (answered by Retry or dropped, from its own counters), its CPU use
(utime + stime from /proc over the flood), the trusted peer's connect time
(start of ``quelay run`` to link up, as its control socket reports it) and the
file's transfer time, with and without the flood.

Not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from quelay.client import AgentUnavailable, open_client  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402

QUELAY = [sys.executable, "-m", "quelay.cli"]
TICKS = os.sysconf("SC_CLK_TCK")
CONNECT_TIMEOUT = 30.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"[{v}]" for v in s.labels.values())
            out[key] = s.value
    return out


async def status(control: Path) -> dict[str, Any] | None:
    try:
        async with open_client(control) as client:
            result: dict[str, Any] = await client.request("status")
            return result
    except (AgentUnavailable, OSError):
        return None


async def dial_and_send(root: Path, peer_port: int, trust: str, src: Path) -> tuple[float, float]:
    """Start the trusted dialler; (seconds to link up, seconds to move ``src``)."""
    control = root / "control.sock"
    start = time.monotonic()
    proc = subprocess.Popen([*QUELAY, "run", "--state-dir", str(root / "state"),
                             "--control", str(control), "--inbox", str(root / "inbox"),
                             "--peer", f"127.0.0.1:{peer_port}", "--trust", trust,
                             "--reconnect-interval", "0.2"], stderr=subprocess.DEVNULL)
    try:
        while True:
            st = await status(control)
            if st is not None and st["link"]["state"] == "up":
                break
            if time.monotonic() - start > CONNECT_TIMEOUT:
                raise SystemExit(f"the trusted peer did not connect within {CONNECT_TIMEOUT} s")
            await trio.sleep(0.01)
        connected = time.monotonic() - start
        t0 = time.monotonic()
        async with open_client(control) as client:
            info = await client.send_file(src)
            done = await client.wait(info["id"])
        if done["state"] != "done":
            raise SystemExit(f"transfer ended {done['state']}: {done.get('error')}")
        return connected, time.monotonic() - t0
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="flood duration")
    parser.add_argument("--file-mb", type=float, default=20.0)
    parser.add_argument("--sources", type=int, default=8, help="flooding source addresses")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        fp_l = load_or_create_identity(base / "l" / "state").fingerprint
        fp_d = [load_or_create_identity(base / f"d{i}" / "state").fingerprint
                for i in range(2)]
        src = base / "payload.bin"
        src.write_bytes(os.urandom(int(args.file_mb * 1e6)))
        port, mport = 24433 + os.getpid() % 1000, 29464 + os.getpid() % 1000
        listener = subprocess.Popen(
            [*QUELAY, "run", "--state-dir", str(base / "l" / "state"),
             "--control", str(base / "l" / "control.sock"), "--inbox", str(base / "l" / "in"),
             "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}",
             *[a for fp in fp_d for a in ("--trust", fp)]], stderr=subprocess.DEVNULL)
        try:
            while await status(base / "l" / "control.sock") is None:
                await trio.sleep(0.05)
            base_connect, base_move = await dial_and_send(base / "d0", port, fp_l, src)
            before = scrape(mport)
            cpu0, t0 = cpu_seconds(listener.pid), time.monotonic()
            sources = ",".join(f"127.0.0.{i}" for i in range(2, 2 + args.sources))
            flood = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "flooder.py"), f"127.0.0.1:{port}",
                 "--mode", "spoof", "--seconds", str(args.seconds), "--sources", sources],
                stdout=subprocess.PIPE)
            try:
                await trio.sleep(min(2.0, args.seconds / 4))
                flood_connect, flood_move = await dial_and_send(base / "d1", port, fp_l, src)
                out, _ = flood.communicate()
            finally:
                stop(flood)
            cpu1, t1 = cpu_seconds(listener.pid), time.monotonic()
            after = scrape(mport)
        finally:
            stop(listener)
    sent = json.loads(out)
    reasons = sorted({k.split("[")[1][:-1] for k in after
                      if k.startswith("quelay_handshakes_refused_total[")})
    absorbed = {r: after[f"quelay_handshakes_refused_total[{r}]"]
                - before.get(f"quelay_handshakes_refused_total[{r}]", 0) for r in reasons}
    total = sum(absorbed.values())
    print(f"flood: {sent['initials']:.0f} Initials in {sent['seconds']:.1f} s "
          f"({sent['initials'] / sent['seconds']:.0f}/s offered) from {args.sources} addresses")
    print(f"listener absorbed {total:.0f} ({total / (t1 - t0):.0f}/s): "
          + ", ".join(f"{r} {n:.0f}" for r, n in absorbed.items() if n))
    print(f"listener CPU during the flood: {100 * (cpu1 - cpu0) / (t1 - t0):.0f} % of one core")
    print(f"trusted peer connect: {base_connect:.2f} s without flood, {flood_connect:.2f} s "
          "during it (process start to link up)")
    print(f"{args.file_mb:g} MB file: {base_move:.2f} s without flood, {flood_move:.2f} s "
          "during it")


if __name__ == "__main__":
    trio.run(main)
