"""Throughput benchmark: full relay path versus a bare Trio+aioquic transfer.

    python bench/throughput.py [--size 200MiB]

Prints MB/s for (1) a bare transfer — our Trio UDP driver and aioquic, one
unidirectional stream, no agent, no session, no disk — (2) a file through the
full path (file → agent → QUIC on loopback → agent → inbox, SHA-256 verified)
and (3) a stream through the full path (client socket → agent → QUIC → agent
→ reader socket), and the ratios of (2) and (3) to (1). Not a test: figures
vary with the machine; the target is full path ≥ 0.8 × bare.
"""

from __future__ import annotations

import argparse
import hashlib
import ssl
import sys
import tempfile
import time
from pathlib import Path

import trio
from aioquic.quic.configuration import QuicConfiguration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.agent import Agent, AgentConfig  # noqa: E402
from quelay.client import open_client  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402
from quelay.transport.connection import QuicConn  # noqa: E402
from quelay.transport.endpoint import QuicEndpoint  # noqa: E402
from quelay.transport.udp import UdpSocket  # noqa: E402
from quelay.units import parse_size  # noqa: E402

MB = 1e6
CHUNK = 64 * 1024
DATAGRAM = 1350
MiB = 1024 * 1024
SPOOL = int(__import__("os").environ.get("SPOOL", 1024 * 1024))


def _conf(identity: object, is_client: bool) -> QuicConfiguration:
    conf = QuicConfiguration(is_client=is_client, alpn_protocols=["quelay/1"],
                             max_datagram_size=DATAGRAM, verify_mode=ssl.CERT_NONE,
                             congestion_control_algorithm="cubic")
    conf.certificate = identity.certificate  # type: ignore[attr-defined]
    conf.private_key = identity.private_key  # type: ignore[attr-defined]
    return conf


async def bare(size: int, root: Path) -> float:
    ident = load_or_create_identity(root / "bare")
    kwargs = {"stream_window": 2 * MiB, "connection_window": 8 * MiB, "max_streams": 16}

    def make(quic: object, sock: UdpSocket, peer: tuple[str, int]) -> QuicConn:
        return QuicConn(quic, sock, peer, verify_peer=lambda der: None,  # type: ignore[arg-type]
                        send_high_water=2 * MiB, keepalive=0)

    server_sock = UdpSocket(("127.0.0.1", 0))
    client_sock = UdpSocket(("127.0.0.1", 0))
    server = QuicEndpoint(server_sock, make_connection=make, configuration=_conf(ident, False),
                          quic_kwargs=kwargs)
    client = QuicEndpoint(client_sock, make_connection=make, configuration=_conf(ident, True),
                          quic_kwargs=kwargs)
    result: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, nursery)
        nursery.start_soon(client.run, nursery)

        async def serve() -> None:
            conn = await server.accepted.receive()
            nursery.start_soon(conn.run)
            stream = await conn.accept_stream()
            got = 0
            start = time.perf_counter()
            while data := await stream.receive_some(256 * 1024):
                got += len(data)
            result["seconds"] = time.perf_counter() - start
            result["bytes"] = got

        nursery.start_soon(serve)
        conn = client.connect(server_sock.address)
        nursery.start_soon(conn.run)
        await conn.authenticated.wait()
        sid = conn.open_stream()
        block = b"\x5a" * CHUNK
        for _ in range(size // CHUNK):
            await conn.send(sid, block)
        await conn.send(sid, b"", end_stream=True)
        while "seconds" not in result:
            await trio.sleep(0.01)
        conn.close("done")
        nursery.cancel_scope.cancel()
    assert result["bytes"] == size // CHUNK * CHUNK
    return result["bytes"] / result["seconds"] / MB


async def full_path(size: int, root: Path) -> tuple[float, float]:
    fa = load_or_create_identity(root / "a" / "state").fingerprint
    fb = load_or_create_identity(root / "b" / "state").fingerprint
    a = Agent(AgentConfig(state_dir=root / "a" / "state", inbox=root / "a" / "inbox",
                          control=root / "a" / "c.sock", listen=("127.0.0.1", 0), trust=[fb],
                          spool_size=SPOOL))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        b = Agent(AgentConfig(state_dir=root / "b" / "state", inbox=root / "b" / "inbox",
                              control=root / "b" / "c.sock", peer=a.udp_address, trust=[fa],
                              spool_size=SPOOL))
        await nursery.start(b.run)
        while a.link_state != "up" or b.link_state != "up":
            await trio.sleep(0.01)
        src = root / "src.bin"
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(b"\xa5" * MiB)
        async with open_client(b.config.control) as cb, open_client(a.config.control) as ca:
            start = time.perf_counter()
            info = await cb.send_file(src)
            final = await cb.wait(info["id"])
            file_rate = final["bytes"] / (time.perf_counter() - start) / MB
            assert final["state"] == "done"

            got = hashlib.sha256()
            stream_result: dict[str, float] = {}

            async def reader() -> None:
                incoming = await ca.accept_incoming(name="bench")
                count = 0
                async for chunk in incoming:
                    count += len(chunk)
                stream_result["bytes"] = count

            start = time.perf_counter()
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                out = await cb.open_stream(name="bench")
                block = b"\x3c" * CHUNK
                for _ in range(size // CHUNK):
                    await out.send_all(block)
                await out.finish()
            stream_rate = stream_result["bytes"] / (time.perf_counter() - start) / MB
            del got
        nursery.cancel_scope.cancel()
    return file_rate, stream_rate


async def main(size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="quelay-bench-") as tmp:
        root = Path(tmp)
        bare_rate = await bare(size, root)
        print(f"bare trio+aioquic  {bare_rate:7.1f} MB/s")
        file_rate, stream_rate = await full_path(size, root)
        print(f"full path, file    {file_rate:7.1f} MB/s  ratio {file_rate / bare_rate:.2f}")
        print(f"full path, stream  {stream_rate:7.1f} MB/s  ratio {stream_rate / bare_rate:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="200MiB")
    args = parser.parse_args()
    trio.run(main, parse_size(args.size))
