"""Long fuzz run of every parser of untrusted bytes (the targets of tests/fuzz_targets.py).

    flock /tmp/quelay-cpu.lock python bench/fuzz.py --seconds 60
    flock /tmp/quelay-cpu.lock python bench/fuzz.py --seconds 600 --only wire.

Each target gets the same time budget and runs hypothesis in batches of
``--batch`` examples (random seeds, no example database, no shrinking deadline)
until its budget is spent. A finding (an exception other than the target's
allowed protocol errors) stops that target, prints the shrunk input and the
traceback, and makes the exit status 1. The closing table gives, per target,
executions, executions per second and the time run without a finding.

Not a test: CI runs the same targets with a bounded number of examples
(tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.fuzz_targets import TARGETS, Target, check  # noqa: E402


def fuzz(target: Target, seconds: float, batch: int) -> tuple[int, float, str | None]:
    """Run ``target`` for ``seconds``; (executions, seconds run, finding or None)."""
    count = 0

    def one(value: Any) -> None:
        nonlocal count
        count += 1
        check(target, value)

    start = time.perf_counter()
    size = 50  # the first batch measures the rate; later ones fit the time left
    while (elapsed := time.perf_counter() - start) < seconds:
        if count:
            size = max(20, min(batch, int(count / elapsed * (seconds - elapsed)) + 1))
        run_batch = settings(max_examples=size, deadline=None, database=None,
                             derandomize=False, phases=[Phase.generate, Phase.shrink],
                             suppress_health_check=list(HealthCheck))(given(target.strategy)(one))
        try:
            run_batch()
        except Exception:  # noqa: BLE001 - a finding: report it, do not crash the bench
            return count, time.perf_counter() - start, traceback.format_exc()
    return count, time.perf_counter() - start, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="total time budget, shared equally by the targets")
    parser.add_argument("--batch", type=int, default=2000, help="examples per hypothesis run")
    parser.add_argument("--only", default="", help="run targets whose name starts with this")
    args = parser.parse_args()
    targets = [t for t in TARGETS if t.name.startswith(args.only)]
    if not targets:
        parser.error(f"no target starts with {args.only!r}")
    each = args.seconds / len(targets)
    print(f"{len(targets)} targets, {each:.1f} s each", flush=True)
    print(f"{'target':<22} {'execs':>9} {'execs/s':>9} {'clean for':>10}  result")
    findings = 0
    total_execs, total_time = 0, 0.0
    for target in targets:
        execs, took, finding = fuzz(target, each, args.batch)
        total_execs += execs
        total_time += took
        result = "no finding" if finding is None else "FINDING"
        print(f"{target.name:<22} {execs:>9} {execs / took:>9.0f} {took:>9.1f}s  {result}",
              flush=True)
        if finding is not None:
            findings += 1
            print(finding, file=sys.stderr)
    print(f"{'all':<22} {total_execs:>9} {total_execs / total_time:>9.0f} {total_time:>9.1f}s  "
          f"{findings} finding(s)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
