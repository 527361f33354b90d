"""What an agent is configured with (``quelay run`` flags, the TOML file, the environment).

The CLI (:mod:`quelay.cli.config`) builds an :class:`AgentConfig`; its
``__post_init__`` rejects combinations that cannot work, with a message that
names the setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..transport.pacing import IPV6_UDP_HEADER, minimum_rate
from ..transport.udp import Address
from .exports import parse_exports
from .peerspec import PeerSpec

MiB = 1024 * 1024


@dataclass
class AgentConfig:
    state_dir: Path
    inbox: Path
    control: Path
    listen: Address | None = None
    peer: Address | None = None
    rendezvous: Address | None = None  # HOST:PORT of a rendezvous relay (replaces listen/peer)
    session: str = ""  # rendezvous session name (the same on both agents)
    rendezvous_secret_file: str = ""  # file with the rendezvous shared secret
    rendezvous_direct: bool = True  # try a direct path (hole punching); False: always relayed
    trust: list[str] = field(default_factory=list)
    export: list[str] = field(default_factory=list)  # NAME=DIR read-only exports the peer may fetch
    name: str = ""
    stream_window: int = 2 * MiB
    connection_window: int = 8 * MiB
    send_high_water: int = 2 * MiB
    max_streams: int = 16384  # per direction; a closed stream is granted again
    spool_size: int = 1 * MiB
    max_datagram_size: int = 1350
    link_overhead: int = 0  # bytes the link adds per datagram beyond IP+UDP (VPN, GSE)
    keepalive: float = 1.0
    dead_after: float = 3.0  # silence (or 4 RTTs) after which the link is declared dead
    probe_interval: float = 1.0  # a dial attempt nobody answers is replaced this often
    idle_timeout: float = 300.0  # a silent connection is held this long for the link's return
    handshake_timeout: float = 10.0
    reconnect_interval: float = 1.0
    congestion: str = "allotted"  # see docs/performance.md for the measurements
    progress_interval: float = 0.5
    rate: int = 0  # wire cap in bits/s; 0 = uncapped
    max_concurrent: int = 0  # outbound transfers active at once; 0 = no limit
    min_free: int = 64 * MiB  # free bytes kept under the inbox; below, incoming files stall
    stall_timeout: float = 3600.0  # a stalled incoming file fails after this long
    max_incoming: int = 16384  # live incoming transfers from the peer; more are "busy"
    history_max: int = 1000  # finished transfers kept (memory and journal)
    history_age: float = 7 * 24 * 3600.0  # seconds a finished transfer is kept
    inbox_ttl: float = 0.0  # seconds a received file stays in the inbox (0 = until removed)
    metrics: Address | None = None  # HOST:PORT of the Prometheus endpoint; None = off
    datagram_share: float = 0.25  # of the cap that best-effort datagrams may use
    datagram_max_age: float = 1.0  # seconds a datagram may wait before it is dropped
    resumption: bool = True  # TLS session resumption on reconnects (identities still proven)
    peers: list[PeerSpec] = field(default_factory=list)  # a hub's named peers (peerspec.py)
    rate_total: int = 0  # bit/s shared by every link's traffic; 0 = no total cap

    def __post_init__(self) -> None:
        if self.peers:
            self._check_peers()
        elif self.rendezvous is not None:
            if self.listen is not None or self.peer is not None:
                raise ValueError("--rendezvous replaces --listen and --peer: give only one")
            if not self.session or not self.rendezvous_secret_file:
                raise ValueError("--rendezvous needs --session NAME and "
                                 "--rendezvous-secret-file FILE")
        elif (self.listen is None) == (self.peer is None):
            raise ValueError("an agent needs exactly one of --listen HOST:PORT or --peer HOST:PORT")
        from ..transport.allotted import CONGESTION_CONTROLS

        if self.congestion not in CONGESTION_CONTROLS:
            raise ValueError(f"congestion must be one of {', '.join(CONGESTION_CONTROLS)}")
        if self.rate < 0:
            raise ValueError("rate must be >= 0 bit/s (0 = uncapped)")
        parse_exports(self.export)  # validates: one-component names, existing directories
        if self.link_overhead < 0:
            raise ValueError("link_overhead must be >= 0 bytes")
        if self.rate_total < 0:
            raise ValueError("rate_total must be >= 0 bit/s (0 = no total cap)")
        floor = minimum_rate(self.max_datagram_size, IPV6_UDP_HEADER + self.link_overhead)
        for what, value in [("rate", self.rate), ("rate_total", self.rate_total)] + [
                (f"the rate of peer {p.name}", p.rate or 0) for p in self.peers]:
            if 0 < value < floor:  # a cap must let one datagram a second through
                raise ValueError(f"{what} must be 0 (uncapped) or at least {floor} bit/s "
                                 "(one datagram with its headers per second)")
        if self.max_concurrent < 0:
            raise ValueError("max_concurrent must be >= 0 (0 = no limit)")
        if self.min_free < 0 or self.history_max < 0:
            raise ValueError("min_free and history_max must be >= 0")
        if self.max_incoming < 1:
            raise ValueError("max_incoming must be >= 1")
        if self.inbox_ttl < 0:
            raise ValueError("inbox_ttl must be >= 0 seconds (0 = keep received files)")
        if self.stall_timeout <= 0 or self.history_age <= 0:
            raise ValueError("stall_timeout and history_age must be > 0 seconds")
        if not 0 < self.datagram_share <= 1:
            raise ValueError("datagram_share must be a fraction of the cap in (0, 1]")
        if not 0 < self.datagram_max_age <= 3600:
            raise ValueError("datagram_max_age must be in (0, 3600] seconds")


    def _check_peers(self) -> None:
        """Named peers (a hub): unique names; whoever has no address dials us."""
        if self.rendezvous is not None:
            raise ValueError("--rendezvous meets one peer: it cannot be used with named peers")
        if self.peer is not None or self.trust:
            raise ValueError("named peers (--trust NAME=PIN, --peer NAME=HOST:PORT) and an "
                             "unnamed --trust/--peer cannot be mixed: name every peer")
        names = [p.name for p in self.peers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"peer {repeated[0]} is configured twice")
        waiting = [p.name for p in self.peers if p.address is None]
        if waiting and self.listen is None:
            raise ValueError(f"peer {waiting[0]} has no address to dial (--peer NAME=HOST:PORT)"
                             ", so it must dial us: give --listen HOST:PORT")
        for spec in self.peers:
            if not spec.trust:
                raise ValueError(f"peer {spec.name} has no pin: give --trust {spec.name}=PIN")
