"""``python -m quelay.linksim``: run the link simulator (same options as ``quelay linksim``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from .command import parse_hostport, parse_outage, run_linksim
from .profiles import PROFILES, parse_profile


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quelay.linksim",
        description="UDP proxy that impairs traffic between two quelay agents "
                    "(SIGUSR1 toggles an outage, SIGUSR2 writes stats).",
    )
    p.add_argument("--listen", required=False, default="127.0.0.1:0",
                   help="HOST:PORT the client agent sends to (default 127.0.0.1:0)")
    p.add_argument("--upstream", required=False, help="HOST:PORT of the server agent")
    p.add_argument("--profile", default="clean",
                   help=f"NAME[,key=value...]; names: {', '.join(PROFILES)}")
    p.add_argument("--outage", action="append", default=[], metavar="START:SECONDS",
                   help="scheduled outage, seconds after start (repeatable)")
    p.add_argument("--stats", type=Path, default=None, metavar="FILE",
                   help="write stats JSON here periodically and at exit")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    p.add_argument("--stats-interval", type=float, default=5.0, metavar="SECONDS",
                   help="summary/stats period; 0 disables (default 5)")
    p.add_argument("--control", type=Path, default=None, metavar="PATH",
                   help="Unix socket for text commands (outage on|off|toggle, stats, ...)")
    p.add_argument("--list-profiles", action="store_true", help="print the profiles and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_profiles:
        for name, prof in PROFILES.items():
            print(f"{name}: up={prof.up} down={prof.down}")
        return 0
    if not args.upstream:
        parser.error("--upstream HOST:PORT is required")
    try:
        listen = parse_hostport(args.listen)
        upstream = parse_hostport(args.upstream)
        outages = [parse_outage(o) for o in args.outage]
        parse_profile(args.profile)
    except ValueError as exc:
        parser.error(str(exc))
    run = partial(run_linksim, listen, upstream, args.profile, outages, args.stats, args.seed,
                  args.stats_interval, control_path=args.control)
    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
