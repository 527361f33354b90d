"""Link simulator, sans-IO core: every test drives the model with an explicit ``now``."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quelay.linksim import (
    BIN_S,
    BLOS_750MS,
    CLEAN,
    DEGRADED_BLOS,
    LOS_250MS,
    PROFILES,
    DirectionModel,
    DirectionParams,
    LinkModel,
    Profile,
    get_profile,
    parse_profile,
    symmetric,
)
from quelay.linksim.command import parse_hostport, parse_outage
from quelay.linksim.impairment import Direction

# --- helpers -----------------------------------------------------------------


def run_through(model: LinkModel, direction: Direction,
                arrivals: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """Submit datagrams at their arrival times and deliver everything at its due time.

    Returns what came out, in delivery order, with delivery times. Deliveries
    are interleaved with arrivals by time, as the proxy's scheduler would do.
    """
    pending: list[tuple[float, int, bytes]] = []
    out: list[tuple[float, bytes]] = []
    seq = 0

    def flush(until: float) -> None:
        pending.sort()
        while pending and pending[0][0] <= until:
            due, _, data = pending.pop(0)
            if model.deliver(direction, len(data), due):
                out.append((due, data))

    for now, data in arrivals:
        flush(now)
        for due, d in model.submit(direction, data, now):
            assert due >= now
            pending.append((due, seq, d))
            seq += 1
    flush(math.inf)
    return out


def check_invariant(model: LinkModel) -> None:
    for dm in (model.up, model.down):
        s = dm.stats
        assert s.datagrams_in + s.duplicated == (
            s.datagrams_forwarded + s.dropped + s.in_flight_datagrams)
        assert s.in_flight_datagrams >= 0 and s.in_flight_bytes >= 0


def max_window_bytes(deliveries: list[tuple[float, bytes]], window: float) -> int:
    """Largest byte count delivered in any half-open window [t, t + window)."""
    times = [t for t, _ in deliveries]
    sizes = [len(d) for _, d in deliveries]
    best = total = j = 0
    for i in range(len(times)):
        while j < len(times) and times[j] < times[i] + window:
            total += sizes[j]
            j += 1
        best = max(best, total)
        total -= sizes[i]
    return best


# --- profiles ----------------------------------------------------------------


def test_builtin_profiles_match_the_design_table() -> None:
    base = {"clean", "LOS-250ms", "BLOS-750ms", "Degraded-BLOS"}
    assert set(PROFILES) == base | {name + "+reorder" for name in base}
    assert CLEAN.up == CLEAN.down == DirectionParams()
    assert (LOS_250MS.up.rate_bps, LOS_250MS.down.rate_bps) == (500e3, 11e6)
    assert LOS_250MS.rtt_s == pytest.approx(0.250)
    assert LOS_250MS.up.jitter_s == 0.010
    assert (BLOS_750MS.up.rate_bps, BLOS_750MS.down.rate_bps) == (100e3, 13e6)
    assert BLOS_750MS.rtt_s == pytest.approx(0.750)
    assert BLOS_750MS.down.jitter_s == 0.050
    d = DEGRADED_BLOS
    assert (d.up.rate_bps, d.down.rate_bps) == (100e3, 150e3)
    for p in (d.up, d.down):
        assert (p.loss, p.corrupt, p.duplicate) == (0.05, 0.01, 0.03)
    assert d.rtt_s == pytest.approx(0.750)
    assert get_profile("degraded-blos") is DEGRADED_BLOS
    with pytest.raises(ValueError, match="unknown link profile"):
        get_profile("nope")


def test_profile_overrides() -> None:
    fast = DEGRADED_BLOS.with_overrides(rate_bps=20e6, rtt_s=0.02, name="fast")
    assert fast.name == "fast"
    assert fast.up.rate_bps == fast.down.rate_bps == 20e6
    assert fast.up.delay_s == fast.down.delay_s == 0.01
    assert fast.up.loss == 0.05  # untouched fields kept
    one = CLEAN.with_overrides(loss_up=0.5, down={"delay_s": 0.1}, overhead_bytes=28)
    assert (one.up.loss, one.down.loss, one.down.delay_s, one.overhead_bytes) == (0.5, 0, 0.1, 28)
    assert CLEAN.with_overrides(up=DirectionParams(rate_bps=1e6)).up.rate_bps == 1e6
    assert symmetric("s", loss=0.1).down.loss == 0.1
    with pytest.raises(ValueError, match="unknown link parameter"):
        CLEAN.with_overrides(bogus=1)
    with pytest.raises(ValueError, match="probability"):
        CLEAN.with_overrides(loss=1.5)
    with pytest.raises(ValueError, match="rate_bps"):
        CLEAN.with_overrides(rate_bps=0)


def test_parse_profile_spec() -> None:
    assert parse_profile("clean") is CLEAN
    p = parse_profile("LOS-250ms, loss=1%, rate_up=2Mbps, rtt=20ms, dup_down=0.5, queue=64k,"
                      " overhead=28, reorder=yes, jitter_dist=normal")
    assert p.up.rate_bps == 2e6 and p.down.rate_bps == 11e6
    assert p.up.loss == p.down.loss == pytest.approx(0.01)
    assert p.up.delay_s == pytest.approx(0.01)
    assert (p.up.duplicate, p.down.duplicate) == (0, 0.5)
    assert p.up.queue_bytes == 64000 and p.overhead_bytes == 28
    assert p.up.reorder and p.down.jitter_dist == "normal"
    assert parse_profile("BLOS-750ms,rate=unlimited").up.rate_bps is None
    for bad, msg in [("clean,loss", "key=value"), ("clean,colour=red", "unknown profile override"),
                     ("clean,rate=fast", "bad rate"), ("clean,delay=soon", "bad duration"),
                     ("clean,rtt_up=1", "both directions"), ("LEO", "unknown link profile"),
                     ("clean,jitter_dist=pareto", "jitter_dist")]:
        with pytest.raises(ValueError, match=msg):
            parse_profile(bad)


def test_parse_outage_and_hostport() -> None:
    assert parse_outage("10:5") == (10.0, 5.0)
    assert parse_outage("2.5s:500ms") == (2.5, 0.5)
    for bad in ("10", "a:5", "10:0", "-1:5", "1:x"):
        with pytest.raises(ValueError, match="bad outage"):
            parse_outage(bad)
    assert parse_hostport("127.0.0.1:4433") == ("127.0.0.1", 4433)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    assert parse_hostport("localhost:0") == ("localhost", 0)
    for bad, msg in [("4433", "HOST:PORT"), (":1", "HOST:PORT"), ("h:x", "not a number"),
                     ("h:70000", "outside"), ("::1:9", r"\[ADDR\]"), ("[::1]9", "IPV6")]:
        with pytest.raises(ValueError, match=msg):
            parse_hostport(bad)


# --- bottleneck --------------------------------------------------------------


def test_rate_limit_holds_in_every_window() -> None:
    rate = 1e6
    model = LinkModel(symmetric("r", rate_bps=rate, delay_s=0.05, queue_bytes=10**7))
    rng = random.Random(1)
    arrivals = []
    t = 0.0
    for _ in range(3000):  # bursts faster than the link, with pauses
        t += rng.choice([0.0, 0.0, 0.0001, 0.02])
        arrivals.append((t, bytes(rng.randint(20, 1400))))
    out = run_through(model, "up", arrivals)
    assert len(out) == 3000  # queue big enough: nothing dropped
    for window in (0.01, 0.1, 0.35, 1.0):
        assert max_window_bytes(out, window) <= rate * window / 8 + 1400
    # and the link was actually used at its rate while backlogged
    busy = out[-1][0] - out[0][0]
    assert sum(len(d) for _, d in out) * 8 / busy == pytest.approx(rate, rel=0.05)
    check_invariant(model)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([100e3, 1e6, 20e6]),
    overhead=st.sampled_from([0, 28]),
    gaps=st.lists(st.tuples(st.floats(0, 0.01), st.integers(1, 1500)), min_size=1,
                  max_size=300),
)
def test_rate_limit_property(rate: float, overhead: int, gaps: list[tuple[float, int]]) -> None:
    profile = symmetric("p", rate_bps=rate, delay_s=0.1, queue_bytes=20000)
    profile = profile.with_overrides(overhead_bytes=overhead)
    model = LinkModel(profile)
    t, arrivals = 0.0, []
    for gap, size in gaps:
        t += gap
        arrivals.append((t, bytes(size)))
    out = run_through(model, "down", arrivals)
    for window in (0.005, 0.1, 1.0):
        wire = max_window_bytes([(w, d + bytes(overhead)) for w, d in out], window)
        assert wire <= rate * window / 8 + 1500 + overhead + 1e-6
    assert all(a[0] <= b[0] for a, b in zip(out, out[1:], strict=False))  # FIFO
    check_invariant(model)


def test_queue_overflow_drops_tail_then_recovers() -> None:
    model = LinkModel(symmetric("q", rate_bps=1e6, queue_bytes=10_000))
    burst = [model.submit("up", bytes(1000), 0.0) for _ in range(100)]
    accepted = sum(1 for r in burst if r)
    # the first goes straight onto the wire; 9 more fit behind it (backlog + size <= 10 kB)
    assert accepted == 10
    assert model.up.stats.dropped_queue == 90
    # 1000 bytes take 8 ms at 1 Mbit/s: once drained, it accepts again
    assert model.submit("up", bytes(1000), 0.080)
    assert model.up.backlog_bytes(0.080) == pytest.approx(1000)
    assert model.down.stats.datagrams_in == 0  # directions are independent


def test_rate_derived_queue_size() -> None:
    assert DirectionParams(rate_bps=11e6).queue_limit == 343750  # 250 ms at 11 Mbit/s
    assert DirectionParams(rate_bps=100e3).queue_limit == 15000  # floor
    assert DirectionParams(rate_bps=1e6, queue_s=1.0).queue_limit == 125000
    assert DirectionParams().queue_limit is None


def test_oversized_datagram_at_empty_queue_is_accepted() -> None:
    model = LinkModel(symmetric("q", rate_bps=1e5, queue_bytes=100))
    assert model.submit("up", bytes(1400), 0.0)
    assert not model.submit("up", bytes(10), 0.0)


def test_in_flight_bound_for_unlimited_rate() -> None:
    model = LinkModel(symmetric("m", delay_s=1.0, max_in_flight_bytes=10_000))
    results = [model.submit("down", bytes(1000), 0.0) for _ in range(15)]
    assert sum(1 for r in results if r) == 10
    assert model.down.stats.dropped_overflow == 5
    assert model.down.stats.in_flight_bytes == 10_000
    for due, data in [r[0] for r in results if r]:
        assert model.deliver("down", len(data), due)
    assert model.down.stats.in_flight_bytes == 0
    assert model.submit("down", bytes(1000), 1.0)
    check_invariant(model)


# --- delay and jitter --------------------------------------------------------


@pytest.mark.parametrize("dist,bound", [("uniform", 1.0), ("normal", 3.0)])
def test_delay_and_jitter_bounds_with_reordering(dist: str, bound: float) -> None:
    delay, jitter = 0.2, 0.02
    dm = DirectionModel(DirectionParams(delay_s=delay, jitter_s=jitter, jitter_dist=dist,  # type: ignore[arg-type]
                                        reorder=True), random.Random(3))
    lags = []
    for i in range(5000):
        now = i * 0.001
        [(due, _)] = dm.submit(bytes(10), now)
        lags.append(due - now)
    assert all(delay - bound * jitter - 1e-12 <= lag <= delay + bound * jitter + 1e-12
               for lag in lags)
    assert sum(lags) / len(lags) == pytest.approx(delay, abs=0.002)
    assert max(lags) - min(lags) > jitter  # it does vary
    dues = [i * 0.001 + lag for i, lag in enumerate(lags)]
    assert any(b < a for a, b in zip(dues, dues[1:], strict=False))  # jitter implies reordering


def test_fifo_jitter_never_reorders_and_stays_in_bounds() -> None:
    delay, jitter = 0.375, 0.05
    dm = DirectionModel(DirectionParams(delay_s=delay, jitter_s=jitter), random.Random(4))
    prev = -1.0
    for i in range(5000):
        now = i * 0.0005
        [(due, _)] = dm.submit(bytes(10), now)
        assert due >= prev
        assert delay - jitter - 1e-12 <= due - now <= delay + jitter + 1e-12
        prev = due


def test_jitter_never_delivers_before_the_datagram_left() -> None:
    dm = DirectionModel(DirectionParams(delay_s=0.001, jitter_s=0.05, reorder=True),
                        random.Random(5))
    assert all(dm.submit(b"x", 1.0)[0][0] >= 1.0 for _ in range(1000))


def test_clean_profile_is_immediate_and_untouched() -> None:
    model = LinkModel(CLEAN)
    data = bytes(range(256))
    assert model.submit("up", data, 5.0) == [(5.0, data)]


# --- loss, corruption, duplication -------------------------------------------


def test_loss_dup_corrupt_rates_match_parameters() -> None:
    n = 20000
    p = DirectionParams(loss=0.05, corrupt=0.02, duplicate=0.03)
    model = LinkModel(Profile("imp", up=p, down=p), seed=7)
    sent = [i.to_bytes(4, "big") * 25 for i in range(n)]
    out = run_through(model, "up", [(i * 0.001, d) for i, d in enumerate(sent)])
    s = model.up.stats
    sigma = math.sqrt(n * 0.05 * 0.95)
    assert s.dropped_loss == pytest.approx((n + s.duplicated) * 0.05, abs=4 * sigma)
    assert s.duplicated == pytest.approx(n * 0.03, abs=4 * math.sqrt(n * 0.03))
    assert s.corrupted == pytest.approx(n * 0.02, abs=4 * math.sqrt(n * 0.02))
    assert s.datagrams_forwarded == len(out)
    check_invariant(model)
    originals = set(sent)
    damaged = [d for _, d in out if d not in originals]
    assert 0 < len(damaged) <= s.corrupted  # a corrupted copy may still be lost afterwards
    for d in damaged:  # exactly one byte differs from the original (index = majority chunk)
        chunks = [d[k:k + 4] for k in range(0, 100, 4)]
        i = int.from_bytes(max(set(chunks), key=chunks.count), "big")
        assert sum(a != b for a, b in zip(sent[i], d, strict=True)) == 1


def test_corruption_is_counted_only_for_delivered_or_lost_copies() -> None:
    model = LinkModel(symmetric("c", corrupt=1.0), seed=1)
    [(_, out)] = model.submit("down", b"\x00" * 8, 0.0)
    assert out != b"\x00" * 8 and sum(b != 0 for b in out) == 1
    assert model.submit("down", b"", 0.0) == [(0.0, b"")]  # nothing to flip
    assert model.down.stats.corrupted == 1


def test_same_seed_same_run_different_seed_different_run() -> None:
    def run(seed: int) -> list[tuple[float, bytes]]:
        model = LinkModel(DEGRADED_BLOS.with_overrides(rate_bps=20e6, rtt_s=0.02), seed=seed)
        return run_through(model, "down", [(i * 1e-4, bytes([i % 256]) * 100)
                                           for i in range(2000)])
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_seed_none_picks_and_records_a_seed() -> None:
    model = LinkModel(CLEAN, seed=None)
    assert isinstance(model.seed, int)


# --- outages -----------------------------------------------------------------


def test_scheduled_outage_drops_everything_then_recovers() -> None:
    model = LinkModel(symmetric("o", delay_s=0.1), start=100.0, outages=[(1.0, 0.5)])
    assert not model.outage_active(100.99)
    assert model.outage_active(101.0) and model.outage_active(101.49)
    assert not model.outage_active(101.5)
    # in flight when the outage starts: dropped at its due time
    [(due, data)] = model.submit("up", b"a" * 10, 100.95)
    assert not model.deliver("up", len(data), due)
    # arriving during the outage, either direction: dropped at once
    assert model.submit("up", b"b", 101.2) == []
    assert model.submit("down", b"c", 101.2) == []
    # after: back to normal
    [(due, data)] = model.submit("down", b"d", 101.5)
    assert model.deliver("down", len(data), due)
    assert model.up.stats.dropped_outage == 2 and model.down.stats.dropped_outage == 1
    assert model.down.stats.datagrams_forwarded == 1
    check_invariant(model)


def test_manual_outage_toggle() -> None:
    model = LinkModel(CLEAN, start=10.0)
    model.set_outage(True, 12.0)
    assert model.outage_active(12.0) and model.submit("up", b"x", 12.5) == []
    model.set_outage(True, 12.6)  # no-op: already on
    model.set_outage(False, 13.0)
    [(due, d)] = model.submit("up", b"y", 13.0)
    assert model.deliver("up", len(d), due)
    assert model.toggles == [(2.0, True), (3.0, False)]
    snap = model.snapshot(14.0)
    assert snap["outage_toggles"] == [{"t": 2.0, "on": True}, {"t": 3.0, "on": False}]
    assert snap["up"]["dropped_outage"] == 1 and snap["up"]["dropped"] == 1


def test_bad_outage_schedule_rejected() -> None:
    with pytest.raises(ValueError):
        LinkModel(CLEAN, outages=[(-1.0, 2.0)])


# --- histogram ---------------------------------------------------------------


def test_histogram_sums_equal_forwarded_bytes() -> None:
    model = LinkModel(DEGRADED_BLOS.with_overrides(rate_bps=2e6, rtt_s=0.05), seed=3,
                      outages=[(0.3, 0.2)])
    rng = random.Random(9)
    ups = [(i * 0.0007, bytes(rng.randint(1, 1300))) for i in range(1500)]
    downs = [(i * 0.0011, bytes(rng.randint(1, 1300))) for i in range(900)]
    out_up = run_through(model, "up", ups)
    out_down = run_through(model, "down", downs)
    hist = model.histogram()
    assert sum(b["up"] for b in hist) == model.up.stats.bytes_forwarded == sum(
        len(d) for _, d in out_up)
    assert sum(b["down"] for b in hist) == model.down.stats.bytes_forwarded == sum(
        len(d) for _, d in out_down)
    assert sum(b["up_in"] for b in hist) == model.up.stats.bytes_in
    assert [b["t"] for b in hist] == [round(i * BIN_S, 3) for i in range(len(hist))]
    # the outage shows up as empty bins (nothing forwarded between 0.3 s and 0.5 s)
    assert all(b["up"] == 0 and b["down"] == 0 for b in hist if 0.3 <= b["t"] < 0.5)
    # bins land where the deliveries were
    for t, d in out_up[:50]:
        assert hist[int(t / BIN_S)]["up"] >= len(d)
    assert json.loads(model.histogram_json()) == hist
    check_invariant(model)
    # peak over aligned 1-s windows: never above the link rate (+ one datagram per window edge)
    assert 0 < model.peak_bytes("up", 1.0) <= 2e6 / 8 + 1300
    assert model.peak_bytes("up_in", 0.1) == max(b["up_in"] for b in hist)


def test_peak_bytes_sliding_windows() -> None:
    model = LinkModel(CLEAN)
    for t, size in [(0.05, 100), (0.15, 200), (0.95, 300), (1.05, 400), (2.55, 50)]:
        for due, d in model.submit("down", bytes(size), t):
            model.deliver("down", len(d), due)
    assert model.peak_bytes("down", 1.0) == 900  # bins 1..10
    assert model.peak_bytes("down_in", 0.2) == 700
    assert model.peak_bytes("up", 1.0) == 0
    assert LinkModel(CLEAN).peak_bytes("up") == 0


def test_histogram_counts_overhead_when_configured() -> None:
    model = LinkModel(CLEAN.with_overrides(overhead_bytes=28))
    [(due, d)] = model.submit("up", bytes(100), 0.05)
    model.deliver("up", len(d), due)
    assert model.histogram() == [{"t": 0.0, "up": 128, "down": 0, "up_in": 128, "down_in": 0}]
    assert model.up.stats.bytes_forwarded == 100  # counters stay payload-only


def test_reordering_variants_draw_each_delay_on_its_own() -> None:
    """The "+reorder" profiles keep the base figures, add reordering (and ±25 ms of
    jitter where the base has none), and datagrams closer than the spread overtake."""
    from quelay.linksim import BLOS_750MS_REORDER, CLEAN_REORDER, with_reordering

    assert get_profile("blos-750ms+reorder") is BLOS_750MS_REORDER
    assert BLOS_750MS_REORDER.up.reorder and BLOS_750MS_REORDER.down.reorder
    assert BLOS_750MS_REORDER.down.jitter_s == BLOS_750MS.down.jitter_s
    assert BLOS_750MS_REORDER.rtt_s == BLOS_750MS.rtt_s
    assert CLEAN_REORDER.up.jitter_s == 0.025 and CLEAN_REORDER.up.reorder
    assert with_reordering(CLEAN, 0.01).down.jitter_s == 0.01
    assert parse_profile("Degraded-BLOS+reorder,loss=0").up.reorder
    # 1000 datagrams 1 ms apart through ±25 ms: many overtake, none is lost or doubled.
    model = LinkModel(CLEAN_REORDER.with_overrides(rtt_s=0.1), seed=4)
    order = []
    for i in range(1000):
        for due, data in model.submit("up", i.to_bytes(2, "big"), i * 0.001):
            order.append((due, int.from_bytes(data, "big")))
    arrival = [n for _, n in sorted(order)]
    assert sorted(arrival) == list(range(1000))
    overtaken = sum(1 for a, b in zip(arrival, arrival[1:], strict=False) if b < a)
    assert overtaken > 300
    # The same profile without reordering keeps FIFO order.
    fifo = LinkModel(CLEAN.with_overrides(rtt_s=0.1, jitter_s=0.025), seed=4)
    dues = [fifo.submit("up", b"x", i * 0.001)[0][0] for i in range(1000)]
    assert dues == sorted(dues)


def test_wire_counters_count_headers_per_datagram() -> None:
    for header in (28, 48):
        model = LinkModel(CLEAN.with_overrides(overhead_bytes=4), header_bytes=header,
                          trace=True)
        for i in range(10):
            for due, data in model.submit("down", bytes(100), i * 0.01):
                model.deliver("down", len(data), due)
        st = model.down.stats
        assert st.bytes_in == st.bytes_forwarded == 1000
        assert st.wire_bytes_in == st.wire_bytes_forwarded == 1000 + 10 * (header + 4)
        assert model.peak_bytes("down_in") == 1000 + 10 * (header + 4)
        assert model.events is not None
        assert [e[2] for e in model.events].count("out") == 10
    with pytest.raises(ValueError):
        LinkModel(CLEAN, header_bytes=-1)


def test_a_benchmark_case_runs_in_a_process_of_its_own() -> None:
    """``run_isolated`` (the benchmarks' case runner): the case's last JSON line, or why
    there is none — its error line, or the timeout (its process group is killed)."""
    import sys

    from quelay.linksim.measure import run_isolated

    ok, error = run_isolated([sys.executable, "-c", "print('noise'); print('{\"n\": 3}')"], 30)
    assert error is None and ok is not None and ok["n"] == 3 and ok["wall"] >= 0
    failed, error = run_isolated([sys.executable, "-c", "raise ValueError('boom')"], 30)
    assert failed is None and error == "exit 1: ValueError: boom"
    slow, error = run_isolated([sys.executable, "-c", "import time; time.sleep(30)"], 0.2)
    assert slow is None and error is not None and error.startswith("timed out")
