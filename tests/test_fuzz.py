"""Hypothesis fuzzing of every parser of untrusted bytes: only the project's errors come out.

The targets live in ``tests/fuzz_targets.py`` (shared with ``bench/fuzz.py``,
which runs them for minutes). Here each runs a bounded number of examples
(``QUELAY_FUZZ_EXAMPLES``, default 300) so CI stays fast and deterministic.
Targets that draw from one strategy object (the framed parsers) run on the same
examples: each example is drawn once and given to every one of them.

Drawing is nearly all of the cost (6 s of CPU for the whole file; giving the same
examples to the targets takes 0.1 s), and a derandomized run draws the same examples
every time: they depend only on the strategy, the code around it, Hypothesis,
Python and the count. So a run keeps what it drew in pytest's cache, under a key made
of exactly those, and later runs give the same examples to the targets without drawing
them again. A change to any of them draws afresh; a failure on a kept example is drawn
again too, so Hypothesis shrinks it and reports the smallest one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings

from quelay.errors import RemoteProtocolError
from quelay.framing import HEADER, FrameDecoder

from . import fuzz_targets
from .fuzz_targets import TARGETS, Target, check

EXAMPLES = int(os.environ.get("QUELAY_FUZZ_EXAMPLES", "300"))


def _by_strategy(targets: list[Target]) -> list[list[Target]]:
    groups: dict[int, list[Target]] = {}
    for target in targets:
        groups.setdefault(id(target.strategy), []).append(target)
    return list(groups.values())


GROUPS = _by_strategy(TARGETS)


def _examples_key(group: list[Target]) -> str:
    """Everything a derandomized run's examples depend on: the strategy (its repr names
    every part, down to the values sampled from), this file (the seed comes from the
    test function), the targets' module, the frame header the strategies pack with,
    Hypothesis, Python and the count."""
    digest = hashlib.sha256()
    for part in (repr(group[0].strategy), Path(__file__).read_text(),
                 Path(fuzz_targets.__file__).read_text(), HEADER.format, hypothesis.__version__,
                 platform.python_version(), str(EXAMPLES)):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:32]


def _kept(request: pytest.FixtureRequest, group: list[Target]) -> Path | None:
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if cache is None:
        return None
    return Path(cache.mkdir("quelay-fuzz-examples")) / f"{_examples_key(group)}.pickle"


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(t.name for t in g) for g in GROUPS])
def test_parser_raises_only_protocol_errors(group: list[Target],
                                            request: pytest.FixtureRequest) -> None:
    kept = _kept(request, group)
    replay_failure: BaseException | None = None
    if kept is not None and kept.exists():
        examples = pickle.loads(kept.read_bytes())
        try:
            for blob in examples:
                for target in group:
                    check(target, pickle.loads(blob))
            return
        except Exception as exc:  # drawn again below: Hypothesis shrinks and reports it
            replay_failure = exc
    drawn: list[bytes] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(group[0].strategy)
    def run(value: Any) -> None:
        drawn.append(pickle.dumps(value))  # as drawn, before a target could touch it
        for target in group:
            check(target, value)

    run()
    if replay_failure is not None:  # a kept example fails, the fresh draw does not
        raise replay_failure
    if kept is not None:
        partial = kept.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(pickle.dumps(drawn))
        partial.replace(kept)  # whole or not at all, whichever worker writes last


def test_every_target_is_fuzzed() -> None:
    assert sorted(t.name for g in GROUPS for t in g) == sorted(t.name for t in TARGETS)
    assert [t.name for t in next(g for g in GROUPS if len(g) > 1)] == \
        ["control.frames", "wire.frames", "wire.data_header"]


def test_a_finding_is_reported() -> None:
    """The harness itself: an error outside ``allowed`` escapes ``check``."""
    target = Target("broken", TARGETS[0].strategy, lambda v: {}["missing"], (ValueError,))
    with pytest.raises(KeyError):
        check(target, b"")


def test_frame_decoder_refuses_a_huge_announced_length_before_buffering() -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(b"\xff\xff\xff\xff" + b"x" * 10)
    with pytest.raises(RemoteProtocolError, match="above the 1024-byte limit"):
        decoder.next_frame_untrusted()
