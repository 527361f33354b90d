"""The sans-IO dead-link detector, on explicit time."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from quelay.transport.liveness import Liveness


def test_dead_after_silence_or_four_rtts() -> None:
    live = Liveness(dead_after=3.0)
    assert live.silence(0.0) == math.inf and live.is_dead(0.0, rtt=None)
    live.heard(10.0)
    assert not live.is_dead(12.9, rtt=None)
    assert live.is_dead(13.1, rtt=None)
    assert not live.is_dead(13.1, rtt=0.9)  # 4 RTTs = 3.6 s on a long path
    assert live.is_dead(13.7, rtt=0.9)
    assert live.dead_at(0.9) == pytest.approx(13.6)
    live.heard(13.7)
    assert not live.is_dead(14.0, rtt=0.9)


def test_time_never_goes_back() -> None:
    live = Liveness(dead_after=1.0)
    live.heard(5.0)
    live.heard(4.0)  # a datagram processed with an older timestamp
    assert live.last_heard == 5.0


def test_rejects_nonsense_bound() -> None:
    with pytest.raises(ValueError):
        Liveness(dead_after=0)


def test_module_is_sans_io_and_old_import_still_works() -> None:
    code = ("import sys; import quelay.transport.liveness; "
            "assert 'trio' not in sys.modules and 'socket' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('trio', 'socket'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    from quelay.transport.connection import Liveness as Reexported

    assert Reexported is Liveness
