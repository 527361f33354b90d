"""The rendezvous relay on UDP loopback: registration, relaying, refusals, counters."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from quelay.rendezvous.protocol import AgentTokens, Refusal, Refused, Registered
from quelay.rendezvous.server import RendezvousServer, read_status

SECRET = b"0123456789abcdef-test-secret"
FP_A, FP_B, FP_C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


async def udp() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def recv(sock: trio.socket.SocketType) -> bytes:
    with trio.fail_after(5):
        data, _ = await sock.recvfrom(65536)
    return data


async def test_relay_pairs_relays_refuses_and_counts(tmp_path: Path) -> None:
    control = tmp_path / "relay.sock"
    server = RendezvousServer(("127.0.0.1", 0), SECRET, control=control)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        relay = server.address
        sa, sb, sc = await udp(), await udp(), await udp()
        ta, tb = AgentTokens(SECRET, "s", FP_A), AgentTokens(SECRET, "s", FP_B)
        await sa.sendto(ta.register(time.time()), relay)
        ev = ta.receive_untrusted(await recv(sa), relay, time.time())
        assert isinstance(ev, Registered) and ev.info.observed == sa.getsockname()
        await sb.sendto(tb.register(time.time()), relay)
        ev_b = tb.receive_untrusted(await recv(sb), relay, time.time())
        ev_a = ta.receive_untrusted(await recv(sa), relay, time.time())
        assert isinstance(ev_b, Registered) and ev_b.info.peer_address == sa.getsockname()
        assert isinstance(ev_a, Registered) and ev_a.info.peer_address == sb.getsockname()
        assert ev_a.punch and ev_b.punch

        # QUIC-looking datagrams go through unchanged, both ways.
        await sa.sendto(b"\xc0" + b"x" * 1199, relay)
        assert await recv(sb) == b"\xc0" + b"x" * 1199
        await sb.sendto(b"\x41hello", relay)
        assert await recv(sa) == b"\x41hello"

        # A third agent with a valid token: refused; the pair keeps relaying.
        tc = AgentTokens(SECRET, "s", FP_C)
        await sc.sendto(tc.register(time.time()), relay)
        ev_c = tc.receive_untrusted(await recv(sc), relay, time.time())
        assert isinstance(ev_c, Refused) and ev_c.code is Refusal.SESSION_FULL and ev_c.authentic
        # ... and its datagrams are not relayed anywhere.
        await sc.sendto(b"\x41intruder" + bytes(64), relay)
        ev_c = tc.receive_untrusted(await recv(sc), relay, time.time())
        assert isinstance(ev_c, Refused) and ev_c.code is Refusal.UNREGISTERED
        await sa.sendto(b"\x41still", relay)
        assert await recv(sb) == b"\x41still"

        status = await read_status(control)
        assert status["paired"] == 1 and status["relayed_datagrams"] == 3
        assert status["relayed_bytes"] == 1200 + 6 + 6
        assert status["refusals"]["session_full"] == 1
        assert status["refusals"]["unregistered"] == 1
        nursery.cancel_scope.cancel()
    assert not control.exists()


def test_rendezvous_command_refuses_a_bad_secret_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quelay.cli.app import app

    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    short = tmp_path / "short.secret"
    short.write_text("tooshort\n")
    runner = CliRunner()
    for path, why in ((empty, "is empty"), (short, "shorter than 16 bytes"),
                      (tmp_path / "missing", "No such file")):
        result = runner.invoke(app, ["rendezvous", "--listen", "127.0.0.1:0",
                                     "--secret-file", str(path)])
        assert result.exit_code == 1, result.output
        assert "cannot start" in result.output and why in result.output


async def test_rendezvous_status_without_a_relay_says_so(tmp_path: Path) -> None:
    import sys

    done = await trio.run_process(
        [sys.executable, "-m", "quelay.cli", "rendezvous-status", "--control",
         str(tmp_path / "nobody.sock")], capture_stderr=True, check=False)
    assert done.returncode == 2
    assert b"no rendezvous relay answers" in done.stderr
