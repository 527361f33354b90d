"""A directory of many small files through the link simulator: files/s and overhead.

Two agents in this process, the project's link simulator between them (clean
profile, a capped link), one directory of N small files sent as one transfer.
Reports files per second to a verified, published tree, and the link bytes
(IP/UDP headers included, both directions) per file beyond the payload.

Usage: ``python bench/dirs.py [--files 1000] [--size 2000] [--rate 2Mbps]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.agent import Agent, AgentConfig  # noqa: E402
from quelay.client import open_client  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402
from quelay.linksim import CLEAN, open_linksim  # noqa: E402
from quelay.units import parse_rate  # noqa: E402


def config(root: Path, **kw: object) -> AgentConfig:
    return AgentConfig(state_dir=root / "state", inbox=root / "inbox",
                       control=root / "control.sock", name=root.name, **kw)  # type: ignore[arg-type]


async def run(files: int, size: int, rate: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tree = base / "tree"
        rng = random.Random(1)
        payload = 0
        for i in range(files):
            path = tree / f"d{i % 10}" / f"f{i}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = rng.randbytes(size)
            path.write_bytes(data)
            payload += len(data)
        fp_a = load_or_create_identity(base / "a" / "state").fingerprint
        fp_b = load_or_create_identity(base / "b" / "state").fingerprint
        async with trio.open_nursery() as nursery:
            a = Agent(config(base / "a", listen=("127.0.0.1", 0), trust=[fp_b],
                             max_incoming=max(4096, files + 10)))
            await nursery.start(a.run)
            async with open_linksim(upstream=a.udp_address,
                                    profile=CLEAN.with_overrides(name="dirs", rtt_s=0.05)) as sim:
                b = Agent(config(base / "b", peer=sim.address, trust=[fp_a], rate=rate))
                await nursery.start(b.run)
                while not (a.link_state == "up" and b.link_state == "up"):
                    await trio.sleep(0.05)
                wire0 = sim.stats.up.wire_bytes_forwarded + sim.stats.down.wire_bytes_forwarded
                async with open_client(b.config.control) as client:
                    t0 = trio.current_time()
                    info = await client.send_file(tree)
                    final = await client.wait(info["id"])
                    elapsed = trio.current_time() - t0
                wire = sim.stats.up.wire_bytes_forwarded + sim.stats.down.wire_bytes_forwarded \
                    - wire0
            nursery.cancel_scope.cancel()
    return {"files": files, "file_size": size, "rate_bps": rate, "state": final["state"],
            "seconds": round(elapsed, 2), "files_per_s": round(files / elapsed, 1),
            "payload_bytes": payload, "link_bytes": wire,
            "overhead_bytes_per_file": round((wire - payload) / files),
            "goodput_of_cap": round(payload * 8 / elapsed / rate, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--rate", default="2Mbps")
    args = ap.parse_args()
    print(json.dumps(trio.run(run, args.files, args.size, parse_rate(args.rate)), indent=1))


if __name__ == "__main__":
    main()
