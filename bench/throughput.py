"""Throughput benchmark: the full relay path versus bare Trio+aioquic, all in separate processes.

    flock /tmp/quelay-cpu.lock python bench/throughput.py [--size 100MB] [--datagram 1350]
                                  [--only bare,file,stream] [--profile DIR] [--json FILE]

Three measurements in the same run, with the same datagram size:

* **bare** — a minimal Trio driver of plain aioquic (``QuicConnection``, no
  quelay subclass, cubic), sender and receiver in two processes on loopback:
  quelay's :class:`~quelay.transport.udp.UdpSocket` for the socket (GSO/GRO,
  4 MiB buffers, batched receive: ``wait_readable`` then drain), one task per
  side that receives a batch, handles timers, tops the stream up to a 2 MiB
  high-water mark of unsent+unacked bytes and transmits one batch. Windows as
  the agent's defaults (2 MiB stream, 8 MiB connection); the one change to
  aioquic is quelay's ``CoarsePacer`` (bursts of 64 datagrams instead of
  waking the driver every 2), without which no driver passes ~25 MB/s. Timed at the
  receiver, first stream byte to FIN.
* **file** — two ``quelay run`` processes (A listens, B dials, default
  settings: no cap), ``send_file`` at B then ``wait`` until A verified the
  SHA-256 and published the file: timed from the request to ``done``.
* **stream** — the same pair, a stream written by this process into B through
  the client library and read from A by this process; timed from
  ``open_stream`` to the reader's EOF.

Reported: MB/s (10^6 bytes), the ratio of each full-path case to bare, and
the CPU seconds per 100 MB of each side's process (utime + stime from
``/proc/PID/stat`` before and after; for bare, read by each process at its
end, from the handshake or first byte on), and of this process during each
full-path case (``client cpu``: the stream's writer and reader, a third
process on the same cores that bare does not have). Target (issue 12): file and
stream ≥ 0.8 × bare. ``--profile DIR`` attaches ``py-spy record`` (raw
collapsed stacks) to both agents during each full-path case; ``--cprofile
DIR`` runs the agents under cProfile instead (call counts; the figures are
then slower); ``--agent-arg`` passes a setting to both agents (e.g.
``--agent-arg=--congestion=cubic``). Not a test: the figures vary with the
machine's load; run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.client import AgentUnavailable, open_client  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402
from quelay.transport.quic_ext import CoarsePacer  # noqa: E402
from quelay.transport.udp import UdpSocket  # noqa: E402
from quelay.units import parse_size  # noqa: E402

MB = 1e6
MiB = 1024 * 1024
CHUNK = 64 * 1024
HIGH_WATER = 2 * MiB
STREAM_WINDOW = 2 * MiB
CONNECTION_WINDOW = 8 * MiB
TARGET = 0.8
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds (fields 14, 15 of stat(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- bare: one process per side ----------------------------------------------------------


def _bare_conf(state: Path, is_client: bool, datagram: int) -> QuicConfiguration:
    conf = QuicConfiguration(is_client=is_client, alpn_protocols=["bench"],
                             max_datagram_size=datagram, verify_mode=ssl.CERT_NONE,
                             congestion_control_algorithm="cubic",
                             max_data=CONNECTION_WINDOW, max_stream_data=STREAM_WINDOW)
    if not is_client:
        ident = load_or_create_identity(state)
        conf.certificate = ident.certificate
        conf.private_key = ident.private_key
    return conf


def _coarse(quic: QuicConnection) -> QuicConnection:
    # aioquic's own pacer wakes the driver every 2 datagrams; a burst of 64 (one GSO
    # send) is what DESIGN.md's 50-70 MB/s needs. Plain aioquic otherwise.
    quic._loss._pacer = CoarsePacer(max_datagram_size=quic._max_datagram_size)
    return quic


def _buffered(quic: QuicConnection, sid: int) -> int:
    stream = quic._streams.get(sid)  # bench only: aioquic has no public accessor
    if stream is None:
        return 0
    return int(stream.sender._buffer_stop - stream.sender._buffer_start)


async def bare_side(role: str, port: int, size: int, datagram: int, state: Path) -> dict[str, Any]:
    """One side of the bare transfer; returns its figures (printed as JSON by the child)."""
    sock = UdpSocket(("127.0.0.1", port if role == "receiver" else 0))
    peer = ("127.0.0.1", port)
    quic: QuicConnection | None = None
    if role == "sender":
        quic = _coarse(QuicConnection(configuration=_bare_conf(state, True, datagram)))
        quic.connect(peer, now=trio.current_time())
    sid: int | None = None
    queued = got = 0
    first = last = cpu0 = 0.0
    done = fin_sent = False
    block = os.urandom(CHUNK)
    while True:
        timer = quic.get_timer() if quic is not None else None
        with trio.move_on_at(timer if timer is not None else math.inf):
            await sock.wait_readable()
        now = trio.current_time()
        for data, addr in sock.recv_batch():
            if quic is None:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                quic = _coarse(QuicConnection(
                    configuration=_bare_conf(state, False, datagram),
                    original_destination_connection_id=header.destination_cid))
                peer = addr
            quic.receive_datagram(data, addr, now)
        if quic is None:
            continue
        if timer is not None and now >= timer:
            quic.handle_timer(now)
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted) and role == "sender":
                sid = quic.get_next_available_stream_id(is_unidirectional=True)
                cpu0 = cpu_seconds(os.getpid())
            elif isinstance(event, events.StreamDataReceived):
                if not got:
                    first = time.perf_counter()
                    cpu0 = cpu_seconds(os.getpid())
                got += len(event.data)
                if event.end_stream:
                    last = time.perf_counter()
                    done = True
            elif isinstance(event, events.ConnectionTerminated):
                done = True
        if sid is not None and not fin_sent:
            while queued < size and _buffered(quic, sid) < HIGH_WATER:
                n = min(CHUNK, size - queued)
                quic.send_stream_data(sid, block[:n])
                queued += n
            if queued >= size:
                quic.send_stream_data(sid, b"", end_stream=True)
                fin_sent = True
        if fin_sent and _buffered(quic, sid) == 0 and not done:  # type: ignore[arg-type]
            quic.close(reason_phrase="done")
            done = True
        await sock.send_batch(quic.datagrams_to_send(now))
        if done:
            break
    if role == "receiver":
        # Let the final ACK and the sender's close arrive (at most a second).
        with trio.move_on_after(1.0):
            while True:
                await sock.wait_readable()
                now = trio.current_time()
                for data, addr in sock.recv_batch():
                    quic.receive_datagram(data, addr, now)
                await sock.send_batch(quic.datagrams_to_send(now))
                if any(isinstance(e, events.ConnectionTerminated)
                       for e in iter(quic.next_event, None)):
                    break
    sock.close()
    return {"role": role, "bytes": got, "seconds": last - first,
            "cpu": cpu_seconds(os.getpid()) - cpu0}


def run_bare(size: int, datagram: int, root: Path) -> dict[str, Any]:
    port = free_udp_port()
    me = [sys.executable, str(Path(__file__).resolve()), "--datagram", str(datagram),
          "--size", str(size), "--port", str(port), "--state", str(root / "bare")]
    receiver = subprocess.Popen([*me, "--bare-role", "receiver"], stdout=subprocess.PIPE)
    time.sleep(0.5)  # let it bind
    sender = subprocess.Popen([*me, "--bare-role", "sender"], stdout=subprocess.PIPE)
    out_s, _ = sender.communicate(timeout=600)
    out_r, _ = receiver.communicate(timeout=60)
    if sender.returncode or receiver.returncode:
        raise RuntimeError(f"bare sides exited with {sender.returncode}, {receiver.returncode}")
    rx, tx = json.loads(out_r), json.loads(out_s)
    if rx["bytes"] != size:
        raise RuntimeError(f"bare receiver got {rx['bytes']} of {size} bytes")
    return {"mbps": size / rx["seconds"] / MB, "seconds": rx["seconds"],
            "cpu_sender": tx["cpu"], "cpu_receiver": rx["cpu"]}


# -- the full path: two `quelay run` processes -------------------------------------------


async def _link_up(control: Path, timeout: float) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                async with open_client(control) as client:
                    while (await client.status())["link"]["state"] != "up":
                        await trio.sleep(0.1)
                    return
            except (OSError, AgentUnavailable):
                await trio.sleep(0.1)


class Pair:
    """A listens (receiver), B dials (sender); both pinned to each other."""

    def __init__(self, root: Path, datagram: int, cprofile: Path | None = None,
                 extra: list[str] | None = None) -> None:
        self.root = root
        fps = {side: load_or_create_identity(root / side).fingerprint for side in "ab"}
        port = free_udp_port()
        opts = ["run", "--max-datagram-size", str(datagram), "--log-level", "warning",
                *(extra or [])]

        def base(side: str) -> list[str]:
            if cprofile is None:
                return [sys.executable, "-c", "from quelay.cli import main; main()", *opts]
            cprofile.mkdir(parents=True, exist_ok=True)  # dumped when the agent stops
            return [sys.executable, "-m", "cProfile", "-o", str(cprofile / f"{side}.prof"),
                    "-m", "quelay.cli", *opts]

        cmds = {
            "a": [*base("a"), "--state-dir", str(root / "a"), "--listen", f"127.0.0.1:{port}",
                  "--trust", fps["b"], "--name", "a"],
            "b": [*base("b"), "--state-dir", str(root / "b"), "--peer", f"127.0.0.1:{port}",
                  "--trust", fps["a"], "--name", "b"],
        }
        self.logs = {side: (root / f"{side}.log").open("wb") for side in cmds}
        self.procs = {side: subprocess.Popen(cmd, stdout=self.logs[side], stderr=subprocess.STDOUT)
                      for side, cmd in cmds.items()}
        self.control = {side: root / side / "control.sock" for side in "ab"}

    def up(self) -> None:
        for side in "ab":
            trio.run(_link_up, self.control[side], 30.0)

    def cpu(self) -> dict[str, float]:
        return {side: cpu_seconds(p.pid) for side, p in self.procs.items()}

    def tails(self) -> str:
        out = []
        for side, f in self.logs.items():
            f.flush()
            tail = (self.root / f"{side}.log").read_text(errors="replace")[-2000:]
            out.append(f"--- agent {side} log (tail) ---\n{tail}")
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self.logs.values():
            f.close()


async def _send_file(pair: Pair, src: Path) -> dict[str, Any]:
    async with open_client(pair.control["b"]) as cb:
        info = await cb.send_file(src)
        final = await cb.wait(info["id"])
    if final["state"] != "done":
        raise RuntimeError(f"file transfer ended {final['state']}: {final.get('error')}")
    return final


async def _send_stream(pair: Pair, size: int) -> int:
    got = 0
    block = os.urandom(CHUNK)
    async with open_client(pair.control["a"]) as ca, open_client(pair.control["b"]) as cb:

        async def reader() -> None:
            nonlocal got
            incoming = await ca.accept_incoming(name="bench")
            async for chunk in incoming:
                got += len(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            out = await cb.open_stream(name="bench")
            sent = 0
            while sent < size:
                n = min(CHUNK, size - sent)
                await out.send_all(block[:n])
                sent += n
            await out.finish()
    return got


class Profiler:
    """``py-spy record`` attached to both agents for one case (raw collapsed stacks)."""

    def __init__(self, directory: Path | None, pair: Pair, case: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        for side, p in pair.procs.items():
            role = "receiver" if side == "a" else "sender"
            out = directory / f"{case}-{role}.txt"
            self.procs.append(subprocess.Popen(
                ["py-spy", "record", "--pid", str(p.pid), "--format", "raw", "--rate", "500",
                 "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # py-spy takes a moment to attach

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            p.wait(timeout=30)


def _own_cpu() -> float:
    """CPU seconds of this process (the stream case's writer and reader run here)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_full(size: int, datagram: int, root: Path, cases: list[str],
             profile: Path | None, cprofile: Path | None = None,
             extra: list[str] | None = None) -> dict[str, dict[str, Any]]:
    src = root / "src.bin"
    if "file" in cases:
        with open(src, "wb") as f:
            block = os.urandom(MiB)
            left = size
            while left:
                f.write(block[:min(MiB, left)])
                left -= min(MiB, left)
    pair = Pair(root, datagram, cprofile, extra)
    results: dict[str, dict[str, Any]] = {}
    try:
        pair.up()
        for case in cases:
            prof = Profiler(profile, pair, case)
            before = pair.cpu()
            client0 = _own_cpu()
            start = time.perf_counter()
            if case == "file":
                final = trio.run(_send_file, pair, src)
                moved = int(final["bytes"])
            else:
                moved = trio.run(_send_stream, pair, size)
            seconds = time.perf_counter() - start
            after = pair.cpu()
            client = _own_cpu() - client0
            prof.stop()
            if moved != size:
                raise RuntimeError(f"{case}: moved {moved} of {size} bytes")
            results[case] = {"mbps": size / seconds / MB, "seconds": seconds,
                             "cpu_sender": after["b"] - before["b"],
                             "cpu_receiver": after["a"] - before["a"],
                             "cpu_client": client}
    except BaseException:
        print(pair.tails(), file=sys.stderr)
        raise
    finally:
        pair.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="100MB", help="bytes per case (units: 100MB, 200MiB)")
    parser.add_argument("--datagram", type=int, default=1350, help="UDP payload size")
    parser.add_argument("--only", default="bare,file,stream", help="cases to run, comma-separated")
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of both agents here")
    parser.add_argument("--cprofile", type=Path,
                        help="run both agents under cProfile (the Trio thread); "
                             "a.prof (receiver) and b.prof (sender) land here")
    parser.add_argument("--agent-arg", action="append", default=[],
                        help="an extra `quelay run` argument for both agents (repeatable)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--bare-role", choices=["sender", "receiver"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = int(args.size) if str(args.size).isdigit() else parse_size(args.size)
    if args.bare_role:
        res = trio.run(bare_side, args.bare_role, args.port, size, args.datagram, args.state)
        print(json.dumps(res))
        return
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="quelay-bench-") as tmp:
        root = Path(tmp)
        if "bare" in cases:
            results["bare"] = run_bare(size, args.datagram, root)
        full = [c for c in cases if c in ("file", "stream")]
        if full:
            results.update(run_full(size, args.datagram, root, full, args.profile,
                                    args.cprofile, args.agent_arg))
    bare = results.get("bare", {}).get("mbps")
    per = 100 * MB / size
    print(f"size {size} bytes, datagram {args.datagram} bytes")
    print(f"{'case':<8} {'MB/s':>7} {'ratio':>6} {'tx cpu s/100MB':>15} {'rx cpu s/100MB':>15}"
          f" {'client cpu':>11}")
    for case, r in results.items():
        r["ratio"] = r["mbps"] / bare if bare else None
        r["cpu_sender_per_100MB"] = r["cpu_sender"] * per
        r["cpu_receiver_per_100MB"] = r["cpu_receiver"] * per
        client = f"{r['cpu_client'] * per:>11.2f}" if "cpu_client" in r else f"{'-':>11}"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        miss = "" if case == "bare" or r["ratio"] is None or r["ratio"] >= TARGET else "  MISS"
        print(f"{case:<8} {r['mbps']:>7.1f} {ratio:>6} {r['cpu_sender_per_100MB']:>15.2f}"
              f" {r['cpu_receiver_per_100MB']:>15.2f} {client}{miss}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"size": size, "datagram": args.datagram,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
