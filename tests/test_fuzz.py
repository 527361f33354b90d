"""Hypothesis fuzzing of every parser of untrusted bytes: only the project's errors come out.

The targets live in ``tests/fuzz_targets.py`` (shared with ``bench/fuzz.py``,
which runs them for minutes). Here each runs a bounded number of examples
(``QUELAY_FUZZ_EXAMPLES``, default 300) so CI stays fast and deterministic.
Targets that draw from one strategy object (the framed parsers) run on the same
examples: each example is drawn once and given to every one of them.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from quelay.errors import RemoteProtocolError
from quelay.framing import FrameDecoder

from .fuzz_targets import TARGETS, Target, check

EXAMPLES = int(os.environ.get("QUELAY_FUZZ_EXAMPLES", "300"))


def _by_strategy(targets: list[Target]) -> list[list[Target]]:
    groups: dict[int, list[Target]] = {}
    for target in targets:
        groups.setdefault(id(target.strategy), []).append(target)
    return list(groups.values())


GROUPS = _by_strategy(TARGETS)


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(t.name for t in g) for g in GROUPS])
def test_parser_raises_only_protocol_errors(group: list[Target]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(group[0].strategy)
    def run(value: Any) -> None:
        for target in group:
            check(target, value)

    run()


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
