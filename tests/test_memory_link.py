"""Two real agents on an in-memory datagram network, on Trio's mock clock.

No UDP, no threads for the link, no polling sleeps against wall time: a
30-second outage on a 600 ms-RTT link takes milliseconds, and every fact
asserted is counted (bytes, states, link-ups, datagrams dropped).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from quelay.agent.pipes import OutboundPipe
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.transport.memory import MemoryNetwork

from .conftest import attach_reader, make_file, sha256_file, start_memory_pair, wait_for

DATA = bytes(range(256)) * 2048  # 512 KiB: twice the stream's spool


@pytest.mark.parametrize("held", [True, False], ids=["held", "redialled"])
@pytest.mark.parametrize("kind", ["file", "stream"])
async def test_transfer_across_a_long_outage_on_mock_time(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock,
        kind: str, held: bool) -> None:
    """A 30 s outage: held through it (the default ``idle_timeout`` is longer), the
    connection carries on where it was; held for less, the link is redialled and
    every transfer resumes from its last acknowledged byte."""
    net = MemoryNetwork(delay=0.3)  # 600 ms RTT
    a, b = await start_memory_pair(nursery, tmp_path, net,
                                   **({} if held else {"idle_timeout": 10.0}))
    if kind == "file":
        src = make_file(tmp_path / "f.bin", len(DATA), seed=3)
        t = Transfer(wire.new_transfer_id(), "out", "file", "f.bin", len(DATA), 4)
        t.path = str(src)
        b.book.submit(t)
    else:
        pipe = OutboundPipe(256 * 1024)
        t = Transfer(wire.new_transfer_id(), "out", "stream", "s", None, 4)
        b.book.submit(t, pipe)
    # Half-way, the link drops for 30 s of (mock) time.
    async with trio.open_nursery() as inner:
        if kind == "stream":
            async def write() -> None:
                view = memoryview(DATA)
                while view:
                    view = view[await pipe.write(view):]
                pipe.end()

            async def read() -> None:
                t_in, reader_side = await attach_reader(a, t.id, poll=0.05)
                got = hashlib.sha256()
                n = 0
                with trio.fail_after(300):  # mock time: a byte missing fails, not hangs
                    while n < len(DATA) and (chunk := await reader_side.receive_some(65536)):
                        got.update(chunk)
                        n += len(chunk)
                    await a.book.wait_finished(t_in)
                received["digest"] = got.hexdigest()

            received: dict[str, str] = {}
            inner.start_soon(write)
            inner.start_soon(read)
        while b.transfers[t.id].delivered < len(DATA) // 4:
            await trio.sleep(0.01)
        net.down = True
        while b.link_state != "down":
            await trio.sleep(0.1)
        await trio.sleep(30)
        net.down = False
        await b.book.wait_finished(t)
    assert t.state is State.DONE, t.error_message
    assert a.transfers[t.id].state is State.DONE
    assert net.counters.dropped_down > 0
    if held:  # the link was reported down, then the same connection went on
        assert a.link_ups == 1 and b.link_ups == 1
        assert a.default.revivals == 1 and b.default.revivals == 1
        assert t.resumes == 0
        assert sum(b.book.stats.handshakes.values()) == 1
    else:
        assert a.link_ups == 2 and b.link_ups == 2  # exactly one reconnect
        assert t.resumes >= 1
    if kind == "file":
        assert sha256_file(a.config.inbox / "f.bin") == sha256_file(src)
    else:
        assert received["digest"] == hashlib.sha256(DATA).hexdigest()


async def test_file_and_stream_survive_five_outages(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """Outages of 1–6 s at random points of the stream's progress (mock time): shorter
    ones are bridged by QUIC, longer ones by holding the connection through them
    (the link is reported down, then carries on); every byte arrives exactly once."""
    import random

    net = MemoryNetwork(delay=0.02)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    src = make_file(tmp_path / "big.bin", 512 * 1024, seed=11)
    payload = random.Random(12).randbytes(512 * 1024)  # twice the stream's spool
    rng = random.Random(13)
    f = Transfer(wire.new_transfer_id(), "out", "file", "big.bin", src.stat().st_size, 4)
    f.path = str(src)
    pipe = OutboundPipe(256 * 1024)
    s = Transfer(wire.new_transfer_id(), "out", "stream", "survivor", None, 4)
    b.book.submit(f)
    b.book.submit(s, pipe)
    got = hashlib.sha256()
    count = {"n": 0}

    async def write() -> None:
        view = memoryview(payload)
        while view:
            view = view[await pipe.write(view[:100_000]):]
        pipe.end()

    async def read() -> None:
        _, reader_side = await attach_reader(a, s.id)
        while count["n"] < len(payload):
            chunk = await reader_side.receive_some(65536)
            got.update(chunk)
            count["n"] += len(chunk)

    async def outages() -> None:
        for k in range(5):
            threshold = len(payload) * (k + rng.random()) / 6
            while count["n"] < threshold:
                await trio.sleep(0.01)
            net.down = True
            await trio.sleep(rng.uniform(1.0, 6.0))  # the outage's length (mock time)
            net.down = False

    async with trio.open_nursery() as inner:
        inner.start_soon(write)
        inner.start_soon(read)
        inner.start_soon(outages)
        await b.book.wait_finished(f)
        await b.book.wait_finished(s)
    assert f.state is State.DONE and s.state is State.DONE, (f.error_message, s.error_message)
    assert sha256_file(a.config.inbox / "big.bin") == sha256_file(src)
    assert count["n"] == len(payload)  # exactly once: every byte, none twice
    assert got.digest() == hashlib.sha256(payload).digest()
    assert a.transfers[s.id].delivered == len(payload)
    assert net.counters.dropped_down > 0
    assert b.link_ups == 1  # one session throughout: no reconnect, no resume
    assert b.default.revivals >= 1  # at least one outage outlasted the dead-link bound
    assert f.resumes + s.resumes == 0


async def test_an_idle_agent_does_not_wake_for_housekeeping(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: with no transfer, the housekeeping loop (progress samples, busy
    retries, expiry sweeps, pruning) runs only for the sweep, every SWEEP_EVERY, not
    every progress interval; a transfer wakes it, and progress is sampled again at the
    progress interval while it lives."""
    from quelay.agent.agent import SWEEP_EVERY, Agent

    samples: list[tuple[str, float]] = []
    real = Agent._sample_stats

    def counted(self: Agent) -> None:
        samples.append((self.config.name or "", trio.current_time()))
        real(self)

    monkeypatch.setattr(Agent, "_sample_stats", counted)
    net = MemoryNetwork(delay=0.05)
    a, b = await start_memory_pair(nursery, tmp_path, net)
    samples.clear()
    t0 = trio.current_time()
    await trio.sleep(60)
    per_agent = len(samples) / 2
    assert per_agent <= 60 / SWEEP_EVERY + 1, samples  # was 120: every 0.5 s
    assert per_agent >= 60 / SWEEP_EVERY - 1  # the sweep still runs
    samples.clear()
    src = make_file(tmp_path / "f.bin", len(DATA), seed=4)
    t = Transfer(wire.new_transfer_id(), "out", "file", "f.bin", len(DATA), 4)
    t.path = str(src)
    b.book.submit(t)
    await wait_for(lambda: t.state is State.DONE)
    interval = b.config.progress_interval
    b_samples = [when for name, when in samples if name == b.config.name]
    assert b_samples and b_samples[0] - t0 - 60 <= 2 * interval  # woken, not after a sweep
    assert len(b_samples) >= (trio.current_time() - t0 - 60) / interval - 2
