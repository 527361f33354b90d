"""Prometheus metrics: event counters kept by the agent, read at scrape time.

Two halves:

* :class:`Stats` — plain counters and fixed-bucket histograms that the agent,
  the transfer book, the session and the control server bump where the events
  happen (a refused request, a refused peer frame, a transfer's ending, a
  handshake, a recovery). No I/O, no prometheus_client objects, one per agent
  (two agents may share a process, as they do in tests).
* :class:`AgentCollector` and :func:`serve_metrics` — a prometheus_client
  collector that reads the agent's live state *at scrape time* (link, path
  statistics, socket counters, the wire gate, the transfer table, the spool,
  free space) plus the :class:`Stats`, and a small HTTP/1.0 responder on Trio
  that answers ``GET /metrics`` with ``generate_latest``. prometheus_client's
  own threaded server is not used: the agent is one Trio nursery tree, and a
  scrape must read agent state from the Trio thread.

Labels are bounded: link states, directions, kinds, failure codes, control
error codes and fixed peer-refusal reasons — never transfer ids or names.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from ..core.codes import LinkState
from ..core.datagrams import DROP_REASONS as DATAGRAM_DROP_REASONS
from ..core.transfer import State
from ..transport.admission import REASONS as ADMISSION_REASONS

log = logging.getLogger("quelay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request head we read before answering 400
REQUEST_TIMEOUT = 5.0  # seconds a scraper has to send its request
MAX_SCRAPERS = 8  # concurrent scrape connections; more wait in the kernel backlog

# Durations on a satellite link: 10 ms (loopback) to a minute (long outages).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# Why a peer's frame or stream was refused (a fixed vocabulary: the label set).
PEER_REJECT_REASONS = ("invalid_message", "bad_data_stream", "refused_data_stream",
                       "untrusted_identity")


class Histogram:
    """Cumulative fixed-bucket histogram (seconds), exported as a Prometheus histogram."""

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((_float_label(bound), running))
        out.append(("+Inf", self.count))
        return out


def _float_label(value: float) -> str:
    return repr(float(value))


@dataclass
class Stats:
    """Counters of events, bumped where they happen; read by :class:`AgentCollector`."""

    control_rejected: Counter[str] = field(default_factory=Counter)  # by control error code
    control_clients: int = 0
    peer_rejected: Counter[str] = field(default_factory=Counter)  # by PEER_REJECT_REASONS
    completed: Counter[str] = field(default_factory=Counter)  # by direction
    failed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (direction, code)
    handshake: Histogram = field(default_factory=Histogram)
    handshakes: Counter[str] = field(default_factory=Counter)  # "full" / "resumed" TLS
    recovery: Histogram = field(default_factory=Histogram)
    # Per-connection path counters of connections that ended (so totals never go back).
    ended_paths: Counter[str] = field(default_factory=Counter)
    # Time per link state: seconds accumulated in states left, and the current one.
    state_seconds: dict[str, float] = field(default_factory=dict)
    state: str = LinkState.CONNECTING.value
    state_since: float | None = None
    down_since: float | None = None

    def peer_refused(self, reason: str) -> None:
        assert reason in PEER_REJECT_REASONS, reason
        self.peer_rejected[reason] += 1

    def transfer_ended(self, direction: str, state: str, code: str | None) -> None:
        if state == State.DONE.value:
            self.completed[direction] += 1
        else:
            self.failed[(direction, code or state)] += 1

    def link_changed(self, state: str, now: float) -> None:
        """The link moved to ``state``: close the time in the old one, time recoveries."""
        if self.state_since is not None:
            self.state_seconds[self.state] = (self.state_seconds.get(self.state, 0.0)
                                              + now - self.state_since)
        self.state, self.state_since = state, now
        if state == LinkState.DOWN.value:
            if self.down_since is None:
                self.down_since = now
        elif state == LinkState.UP.value and self.down_since is not None:
            self.recovery.observe(now - self.down_since)
            self.down_since = None

    def seconds_in(self, now: float) -> dict[str, float]:
        out = {s.value: self.state_seconds.get(s.value, 0.0) for s in LinkState}
        if self.state_since is not None:
            out[self.state] = out.get(self.state, 0.0) + now - self.state_since
        return out

    def connection_ended(self, path: Any) -> None:
        """Fold an ended connection's loss counters into the running totals."""
        for name in PATH_COUNTERS:
            self.ended_paths[name] += int(getattr(path, name, 0) or 0)


# PathStats fields exported as counters (summed over every connection of the agent).
PATH_COUNTERS = ("lost_packets", "lost_bytes", "spurious_losses", "probes", "tail_copies",
                 "tail_copy_bytes")
_PATH_HELP = {
    "lost_packets": ("quelay_lost_packets_total",
                     "Packets declared lost (and so retransmitted) by loss detection"),
    "lost_bytes": ("quelay_lost_bytes_total", "Bytes in packets declared lost"),
    "spurious_losses": ("quelay_spurious_losses_total",
                        "Packets declared lost that were acknowledged later (reordering)"),
    "probes": ("quelay_probes_total", "Probe timeouts fired (probe retransmissions)"),
    "tail_copies": ("quelay_tail_copies_total",
                    "Packets re-sent by tail protection at the end of a stream"),
    "tail_copy_bytes": ("quelay_tail_copy_bytes_total",
                        "Stream bytes re-sent by tail protection"),
}


class AgentCollector(Collector):
    """Reads one agent's live state at scrape time (on the Trio thread)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:  # noqa: C901 - one flat list of metrics
        agent = self.agent
        stats: Stats = agent.book.stats
        now = trio.current_time()

        info = GaugeMetricFamily("quelay_agent_info", "This agent's identity and role",
                                 labels=["name", "role", "fingerprint"])
        info.add_metric([agent.config.name, "dial" if agent.config.peer else "listen",
                         agent.fingerprint], 1)
        yield info

        state = GaugeMetricFamily("quelay_link_state", "1 for the link's current state",
                                  labels=["state"])
        for s in LinkState:
            state.add_metric([s.value], 1 if agent.link_state is s else 0)
        yield state
        up = GaugeMetricFamily("quelay_link_up", "1 while a session with the peer is up")
        up.add_metric([], 1 if agent.link_state is LinkState.UP else 0)
        yield up
        seconds = CounterMetricFamily("quelay_link_state_seconds",
                                      "Seconds spent in each link state", labels=["state"])
        for name, value in stats.seconds_in(now).items():
            seconds.add_metric([name], value)
        yield seconds
        ups = CounterMetricFamily("quelay_link_ups", "Sessions established since start")
        ups.add_metric([], agent.link_ups)
        yield ups
        reconnects = CounterMetricFamily("quelay_reconnects",
                                         "Sessions established after the first one")
        reconnects.add_metric([], max(0, agent.link_ups - 1))
        yield reconnects
        yield _histogram("quelay_handshake_duration_seconds",
                         "From the start of a connection attempt to an authenticated peer",
                         stats.handshake)
        handshakes = CounterMetricFamily(
            "quelay_handshakes", "Authenticated TLS handshakes, full or resumed (a ticket)",
            labels=["mode"])
        for mode in ("full", "resumed"):
            handshakes.add_metric([mode], stats.handshakes[mode])
        yield handshakes
        yield _histogram("quelay_recovery_duration_seconds",
                         "From link down to the next session up", stats.recovery)

        # The path of the current connection (gauges), and loss counters over all.
        session = agent.session
        path = session.conn.path_stats() if session is not None else None
        rtt = GaugeMetricFamily("quelay_rtt_seconds",
                                "Smoothed round-trip time of the current connection")
        min_rtt = GaugeMetricFamily("quelay_min_rtt_seconds",
                                    "Minimum round-trip time of the current connection")
        cwnd = GaugeMetricFamily("quelay_congestion_window_bytes",
                                 "Congestion window of the current connection")
        flight = GaugeMetricFamily("quelay_bytes_in_flight",
                                   "Bytes sent and not yet acknowledged or lost")
        if path is not None:
            if path.rtt is not None:
                rtt.add_metric([], path.rtt)
            if path.min_rtt is not None:
                min_rtt.add_metric([], path.min_rtt)
            cwnd.add_metric([], path.cwnd)
            flight.add_metric([], path.bytes_in_flight)
        yield from (rtt, min_rtt, cwnd, flight)
        for name in PATH_COUNTERS:
            metric, help_text = _PATH_HELP[name]
            c = CounterMetricFamily(metric.removesuffix("_total"), help_text)
            live = int(getattr(path, name, 0) or 0) if path is not None else 0
            c.add_metric([], stats.ended_paths[name] + live)
            yield c

        # Bytes on the socket and through the cap.
        counters = agent.sock.counters if agent.sock is not None else None
        wire = CounterMetricFamily("quelay_wire_bytes", "Bytes the link carried for us: "
                                   "UDP payload + IP/UDP headers + link overhead",
                                   labels=["direction"])
        payload = CounterMetricFamily("quelay_payload_bytes", "UDP payload bytes",
                                      labels=["direction"])
        datagrams = CounterMetricFamily("quelay_datagrams", "UDP datagrams",
                                        labels=["direction"])
        if counters is not None:
            wire.add_metric(["sent"], counters.wire_bytes_sent)
            wire.add_metric(["received"], counters.wire_bytes_received)
            payload.add_metric(["sent"], counters.bytes_sent)
            payload.add_metric(["received"], counters.bytes_received)
            datagrams.add_metric(["sent"], counters.datagrams_sent)
            datagrams.add_metric(["received"], counters.datagrams_received)
        yield from (wire, payload, datagrams)
        gate = agent.gate
        cap = GaugeMetricFamily("quelay_rate_cap_bits_per_second",
                                "The operator's wire cap (0 = uncapped)")
        cap.add_metric([], agent.rate)
        yield cap
        rate = GaugeMetricFamily("quelay_wire_rate_bits_per_second",
                                 "Wire bits sent in the last second")
        held = CounterMetricFamily("quelay_cap_held_datagrams",
                                   "Times a datagram had to wait for the rate cap")
        if gate is not None:
            rate.add_metric([], gate.window_bytes(now) * 8)
            held.add_metric([], gate.held)
        yield from (rate, held)
        unsent = GaugeMetricFamily("quelay_unsent_bytes",
                                   "Bulk bytes queued for QUIC and not yet sent (held back "
                                   "by the cap or the congestion window)")
        if session is not None:
            unsent.add_metric([], session.unsent_bulk())
        yield unsent
        yield from _link_metrics(agent, now)

        # Transfers.
        by_state: Counter[tuple[str, str, str]] = Counter()
        spool_used = spool_allocated = 0
        for t in agent.book.table:
            by_state[(t.state.value, t.direction, t.kind)] += 1
        for t in agent.book.table.live():
            if t.direction == "out" and t.kind == "stream":
                out = agent.book.runtime(t).out
                if out is not None and not out.aborted:
                    spool_used += out.spool.tail - out.spool.acked
                    spool_allocated += out.spool.allocated
        transfers = GaugeMetricFamily("quelay_transfers",
                                      "Transfers known to the agent (live and history)",
                                      labels=["state", "direction", "kind"])
        for (st, direction, kind), n in sorted(by_state.items()):
            transfers.add_metric([st, direction, kind], n)
        yield transfers
        done = CounterMetricFamily("quelay_transfers_completed",
                                   "Transfers that completed", labels=["direction"])
        for direction in ("out", "in"):
            done.add_metric([direction], stats.completed[direction])
        yield done
        failed = CounterMetricFamily("quelay_transfers_failed",
                                     "Transfers that failed or were canceled, by failure code",
                                     labels=["direction", "code"])
        for (direction, code), n in sorted(stats.failed.items()):
            failed.add_metric([direction, code], n)
        yield failed
        spool = GaugeMetricFamily("quelay_spool_bytes",
                                  "Bytes held in outbound stream spools (written, not acked)")
        spool.add_metric([], spool_used)
        yield spool
        allocated = GaugeMetricFamily("quelay_spool_allocated_bytes",
                                      "Memory the outbound stream spools hold (rings grow "
                                      "with the bytes held, not with the configured size)")
        allocated.add_metric([], spool_allocated)
        yield allocated

        clients = GaugeMetricFamily("quelay_control_clients", "Connected control clients")
        clients.add_metric([], stats.control_clients)
        yield clients
        rejected = CounterMetricFamily("quelay_control_rejected_requests",
                                       "Control requests answered with an error, by code",
                                       labels=["code"])
        for code, n in sorted(stats.control_rejected.items()):
            rejected.add_metric([code], n)
        yield rejected
        peer = CounterMetricFamily("quelay_peer_rejected",
                                   "Peer frames, streams or identities refused, by reason",
                                   labels=["reason"])
        for reason in PEER_REJECT_REASONS:
            peer.add_metric([reason], stats.peer_rejected[reason])
        yield peer

        yield from _datagram_metrics(getattr(agent, "datagrams", None))

        # Flood protection of a listener (transport/admission.py).
        endpoint = agent.endpoint
        admission = getattr(endpoint, "admission", None)
        in_progress = GaugeMetricFamily("quelay_handshakes_in_progress",
                                        "Accepted connections not yet authenticated")
        refused_hs = CounterMetricFamily("quelay_handshakes_refused",
                                         "Connection-starting Initials answered by a Retry "
                                         "or dropped, by reason", labels=["reason"])
        if admission is not None:
            in_progress.add_metric([], endpoint.handshakes_in_progress())
            for reason in ADMISSION_REASONS:
                refused_hs.add_metric([reason], admission.counters[reason])
        yield from (in_progress, refused_hs)

        free = GaugeMetricFamily("quelay_inbox_free_bytes",
                                 "Free bytes (for this user) under the inbox")
        try:
            fs = os.statvfs(agent.config.inbox)
        except OSError as exc:  # a missing inbox: no sample; the stall shows in transfers
            log.debug("free space under %s unknown: %s", agent.config.inbox, exc)
        else:
            free.add_metric([], fs.f_bavail * fs.f_frsize)
        yield free


def _link_metrics(agent: Any, now: float) -> Iterator[Any]:
    """Each link by its peer's name (a hub has several; a single-peer agent's link is
    named "", or after its one named peer), and the total cap shared by them."""
    up = GaugeMetricFamily("quelay_peer_link_up", "1 while a session with this peer is up",
                           labels=["peer"])
    ups = CounterMetricFamily("quelay_peer_link_ups", "Sessions with this peer since start",
                              labels=["peer"])
    cap = GaugeMetricFamily("quelay_peer_rate_cap_bits_per_second",
                            "This link's own cap (0 = uncapped)", labels=["peer"])
    effective = GaugeMetricFamily("quelay_peer_effective_rate_bits_per_second",
                                  "What this link may use now (its share of the total cap)",
                                  labels=["peer"])
    wire = GaugeMetricFamily("quelay_peer_wire_rate_bits_per_second",
                             "Wire bits sent to this peer in the last second", labels=["peer"])
    sent = CounterMetricFamily("quelay_peer_wire_bytes_sent",
                               "Wire bytes sent to this peer (headers counted)",
                               labels=["peer"])
    for name, link in agent.links.items():
        up.add_metric([name], 1 if link.link_state is LinkState.UP else 0)
        ups.add_metric([name], link.link_ups)
        cap.add_metric([name], link.rate)
        effective.add_metric([name], link.effective_rate)
        wire.add_metric([name], link.gate.window_bytes(now) * 8)
        sent.add_metric([name], link.gate.total_bytes)
    yield from (up, ups, cap, effective, wire, sent)
    total = GaugeMetricFamily("quelay_rate_total_bits_per_second",
                              "The total cap shared by every link (0 = none)")
    total.add_metric([], agent.rate_total)
    yield total


def _datagram_metrics(service: Any) -> Iterator[Any]:
    """Best-effort datagrams (RFC 9221 messages, not UDP datagrams): sent, delivered,
    dropped by reason, malformed (quelay.agent.datagrams)."""
    sent = CounterMetricFamily("quelay_datagrams_sent",
                               "Best-effort datagram messages written into QUIC packets")
    delivered = CounterMetricFamily("quelay_datagrams_delivered",
                                    "Best-effort datagram messages received from the peer")
    dropped = CounterMetricFamily("quelay_datagrams_dropped",
                                  "Best-effort datagram messages dropped, by reason (late, "
                                  "too_big, link_down, queue_full, unread)", labels=["reason"])
    malformed = CounterMetricFamily("quelay_datagrams_malformed",
                                    "DATAGRAM frames from the peer that were not quelay "
                                    "datagrams (dropped)")
    if service is not None:
        total = service.counters.total
        sent.add_metric([], total["sent"])
        delivered.add_metric([], total["delivered"])
        for reason in DATAGRAM_DROP_REASONS:
            dropped.add_metric([reason], total[f"dropped_{reason}"])
        malformed.add_metric([], service.counters.malformed)
    yield from (sent, delivered, dropped, malformed)


def _histogram(name: str, help_text: str, hist: Histogram) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, help_text)
    h.add_metric([], hist.cumulative(), hist.sum)
    return h


def registry_for(agent: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


async def serve_metrics(agent: Any, host: str, port: int, *,
                        task_status: trio.TaskStatus[tuple[str, int]]
                        = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled; reports the bound address."""
    registry = registry_for(agent)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    sockname = listeners[0].socket.getsockname()
    bound = (sockname[0], sockname[1])
    agent.metrics_address = bound
    log.info("%s: metrics on http://%s:%d/metrics", agent.label, *bound,
             extra={"event": "metrics.listening", "agent": agent.label})
    limiter = trio.CapacityLimiter(MAX_SCRAPERS)

    async def handle(stream: trio.SocketStream) -> None:
        async with limiter:
            await _answer(stream, registry)

    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = b""
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_REQUEST:
                data = await stream.receive_some(4096)
                if not data:
                    break
                head += data
            status, body, ctype = _response(head, registry)
            await stream.send_all(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics client went away: %s", exc)
    finally:
        await stream.aclose()


def _response(head: bytes, registry: CollectorRegistry) -> tuple[str, bytes, str]:
    line = head.split(b"\n", 1)[0].strip().split()
    if len(line) < 2 or len(head) >= MAX_REQUEST:
        return "400 Bad Request", b"bad request\n", "text/plain"
    method, target = line[0], line[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", b"only GET\n", "text/plain"
    if target not in (b"/metrics", b"/"):
        return "404 Not Found", b"try /metrics\n", "text/plain"
    body = generate_latest(registry)
    return "200 OK", (b"" if method == b"HEAD" else body), CONTENT_TYPE
