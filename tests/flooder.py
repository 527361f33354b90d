"""A QUIC Initial flooder, run as its own process by tests/test_flood.py and bench/flood.py.

    python tests/flooder.py HOST:PORT --mode spoof --sources 127.0.0.2,127.0.0.3 --seconds 5
    python tests/flooder.py HOST:PORT --mode untrusted --sources 127.0.0.20 --seconds 5

``spoof``: real client Initials (fresh connection IDs and keys, made by
aioquic, each sent ``--reuse`` times) sent as fast as the socket takes them,
from each source address in turn, never answering anything: what a flood
with spoofed source addresses looks like to the listener (the replies go
nowhere). ``untrusted``: one real client
per source completing handshakes with its own certificate (not pinned by the
listener), reconnecting at once after each refusal; an attempt that gets no
answer within ``--attempt-timeout`` counts as ``unanswered``.

Prints one JSON object at the end: initials sent, handshakes completed,
refused, unanswered, seconds.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quelay.core.messages import ALPN  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402


def _config(identity_dir: Path | None) -> QuicConfiguration:
    conf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE,
                             server_name="quelay-peer")
    if identity_dir is not None:
        ident = load_or_create_identity(identity_dir)
        conf.certificate, conf.private_key = ident.certificate, ident.private_key
    return conf


def make_initials(target: tuple[str, int], count: int) -> list[bytes]:
    """``count`` distinct client Initial datagrams (each a new connection)."""
    conf = _config(None)
    out = []
    for _ in range(count):
        quic = QuicConnection(configuration=conf)
        quic.connect(target, now=0.0)
        out.append(quic.datagrams_to_send(now=0.0)[0][0])
    return out


def spoof(target: tuple[str, int], sources: list[str], seconds: float, pool: int,
          rate: float, reuse: int) -> dict[str, float]:
    initials = make_initials(target, pool)
    socks = []
    for host in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        s.setblocking(False)
        socks.append(s)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        if rate and sent >= rate * (now - start):
            time.sleep(0.001)
            continue
        s = socks[sent % len(socks)]
        try:
            s.sendto(initials[sent % len(initials)], target)
        except BlockingIOError:
            select.select([], [s], [], 0.01)
            continue
        sent += 1
        if sent % (len(initials) * reuse) == 0:
            initials = make_initials(target, pool)  # fresh connection IDs now and then
    return {"initials": sent, "seconds": time.monotonic() - start}


def untrusted(target: tuple[str, int], sources: list[str], seconds: float,
              attempt_timeout: float) -> dict[str, float]:
    stats = {"initials": 0, "completed": 0, "refused": 0, "unanswered": 0}
    with tempfile.TemporaryDirectory() as tmp:
        conf = _config(Path(tmp) / "identity")
        start = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            for host in sources:
                outcome = _one_handshake(conf, target, host, attempt_timeout)
                stats["initials"] += 1
                stats[outcome] += 1
        stats["seconds"] = time.monotonic() - start
    return stats


def _one_handshake(conf: QuicConfiguration, target: tuple[str, int], host: str,
                   timeout: float) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    quic = QuicConnection(configuration=conf)
    start = time.monotonic()
    quic.connect(target, now=start)
    heard = completed = False
    try:
        while (now := time.monotonic()) < start + timeout:
            for data, addr in quic.datagrams_to_send(now=now):
                s.sendto(data, addr)
            timer = quic.get_timer()
            wait = min(start + timeout, timer if timer is not None else now + 0.05) - now
            readable, _, _ = select.select([s], [], [], max(0.0, wait))
            now = time.monotonic()
            if readable:
                data, addr = s.recvfrom(65536)
                heard = True
                quic.receive_datagram(data, addr, now=now)
            elif timer is not None and now >= timer:
                quic.handle_timer(now=now)
            while (event := quic.next_event()) is not None:
                if isinstance(event, events.HandshakeCompleted):
                    completed = True
                elif isinstance(event, events.ConnectionTerminated):
                    return "refused" if heard else "unanswered"
        return "completed" if completed else ("refused" if heard else "unanswered")
    finally:
        s.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--mode", choices=("spoof", "untrusted"), default="spoof")
    parser.add_argument("--sources", default="127.0.0.2")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pool", type=int, default=200, help="distinct Initials per round")
    parser.add_argument("--reuse", type=int, default=10,
                        help="times each Initial is sent before new ones are made")
    parser.add_argument("--rate", type=float, default=0.0, help="Initials/s, 0 = flat out")
    parser.add_argument("--attempt-timeout", type=float, default=0.5)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    sources = args.sources.split(",")
    if args.mode == "spoof":
        stats = spoof(target, sources, args.seconds, args.pool, args.rate, args.reuse)
    else:
        stats = untrusted(target, sources, args.seconds, args.attempt_timeout)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
