"""A hub's command line: named peers in settings, --to/--from, ``quelay rate`` and the views.

Settings are checked through :func:`quelay.cli.config.load` (as test_config does);
client commands against a fake control server that records every request and
answers as docs/control-protocol.md says a hub does.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner, Result

from quelay.agent import Agent
from quelay.agent.peerspec import PeerSpec
from quelay.cli import app, config
from quelay.cli.app import RateArgs, health_report, ls_lines, rate_args, status_lines
from quelay.cli.config import ConfigError
from quelay.cli.watch import WatchState, render_watch
from quelay.client import BlockingClient, ClientError, ClientUsageError, open_client
from quelay.framing import FrameDecoder, encode_frame
from quelay.identity import load_or_create_identity

from .conftest import make_file, sha256_file, site_config, wait_for

FP_A = "sha256:" + "ab" * 32
FP_B = "sha256:" + "cd" * 32
FP_C = "sha256:" + "ef" * 32


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load(file: Path | None = None, env: dict[str, str] | None = None,
         **flags: Any) -> config.Settings:
    return config.load(file, env=env or {}, flags=flags)


def error(file: Path | None = None, env: dict[str, str] | None = None,
          **flags: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(file, env, **flags)
    assert "\n" not in str(info.value)
    return info.value


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """A hub's file: site-a dials us, site-b is dialled; a default cap and a total."""
    return write(tmp_path / "hub.toml", f"""
listen = "127.0.0.1:4433"
state_dir = "state"
rate = "1Mbps"
rate_total = "10Mbps"

[[peers]]
name = "site-a"
trust = "{FP_A}"
rate = "2Mbps"

[[peers]]
name = "site-b"
trust = ["{FP_B}"]
address = "10.0.0.2:4433"
""")


# -- settings: named peers ---------------------------------------------------------------


def test_peers_table_and_total(hub: Path) -> None:
    s = load(hub)
    assert s.agent.peers == [PeerSpec("site-a", [FP_A], None, 2_000_000),
                             PeerSpec("site-b", [FP_B], ("10.0.0.2", 4433), None)]
    assert (s.agent.rate, s.agent.rate_total, s.agent.trust) == (1_000_000, 10_000_000, [])
    assert s.sources["peers"] == str(hub) and s.warnings == []
    assert load(hub, {"QUELAY_RATE_TOTAL": "20Mbps"}).agent.rate_total == 20_000_000
    assert load(hub, rate_total="5Mbps").sources["rate_total"] == "--rate-total"


def test_named_flags_in_order_of_first_mention(tmp_path: Path) -> None:
    s = load(None, listen="127.0.0.1:1", state_dir=str(tmp_path / "s"),
             trust=[f"b={FP_B}", f"a={FP_A}", f"b={FP_C}", f"c={FP_C}"],
             peer=["a=10.0.0.1:1", "c=[::1]:9"], rate=["3Mbps", "b=500kbps"])
    assert [p.name for p in s.agent.peers] == ["b", "a", "c"]
    b, a, c = s.agent.peers
    assert b.trust == [FP_B, FP_C] and b.rate == 500_000 and b.address is None
    assert a.trust == [FP_A] and a.address == ("10.0.0.1", 1) and a.rate is None
    assert c.address == ("::1", 9) and s.agent.rate == 3_000_000


def test_a_higher_layer_replaces_one_field_of_one_peer(hub: Path) -> None:
    s = load(hub, {"QUELAY_PEER": "site-a=10.0.0.1:4433"}, trust=[f"site-a={FP_C}"],
             rate=["site-b=4Mbps"])
    a, b = s.agent.peers
    assert (a.trust, a.address, a.rate) == ([FP_C], ("10.0.0.1", 4433), 2_000_000)
    assert (b.trust, b.address, b.rate) == ([FP_B], ("10.0.0.2", 4433), 4_000_000)
    assert s.agent.rate == 1_000_000  # only named rates given: the file's default stays
    assert s.peer_sources == {"site-a": f"{hub}, QUELAY_PEER, --trust",
                              "site-b": f"{hub}, --rate"}


def test_cert_paths_in_a_table_are_relative_to_the_file(tmp_path: Path) -> None:
    from quelay.identity import load_or_create_identity

    ident = load_or_create_identity(tmp_path / "peer-state")
    f = write(tmp_path / "q.toml", f"""
listen = ":1"
state_dir = "s"
[[peers]]
name = "a"
trust = ["{ident.cert_path.relative_to(tmp_path)}"]
""")
    assert load(f).agent.peers[0].trust == [str(ident.cert_path)]


@pytest.mark.parametrize("flags, key, words", [
    ({"trust": [FP_A, f"a={FP_B}"]}, "config", "cannot be mixed"),
    ({"trust": [f"a={FP_A}"], "peer": ["10.0.0.1:1"], "listen": None}, "config",
     "cannot be mixed"),
    ({"trust": [FP_A], "rate": ["a=2Mbps"]}, "rate", "no peer named 'a' is configured"),
    ({"trust": [f"a={FP_A}"], "peer": ["h:1", "h:2"]}, "peer", "2 unnamed values"),
    ({"trust": [f"a={FP_A}"], "rate": ["1Mbps", "2Mbps"]}, "rate", "2 unnamed values"),
    ({"trust": [f"a={FP_A}"], "peer": ["a=nohost"]}, "peer", "peer a: 'nohost'"),
    ({"trust": [f"a={FP_A}"], "peer": ["a=h:1", "a=h:2"]}, "peer", "address given twice"),
    ({"trust": [f"a={FP_A}"], "rate": ["a=10"]}, "rate", "did you mean 10Mbps"),
    ({"trust": ["a=sha256:12"]}, "trust", "peer a: trust entry"),
    ({"trust": [f"a={FP_A}"], "listen": None, "peer": None}, "config",
     "must dial us: give --listen"),
])
def test_named_flag_errors(tmp_path: Path, flags: dict[str, Any], key: str,
                           words: str) -> None:
    basics: dict[str, Any] = {"listen": "127.0.0.1:1", "state_dir": str(tmp_path / "s")}
    err = error(None, None, **{**basics, **flags})
    assert err.key == key and words in str(err), str(err)


@pytest.mark.parametrize("table, words", [
    ('[[peers]]\nname = "a"\ntrust = "{FP}"\nadress = "h:1"\n', "did you mean 'address'"),
    ('[[peers]]\nname = "a b"\ntrust = "{FP}"\n', "is not a peer name"),
    ('[[peers]]\ntrust = "{FP}"\n', "entry 1: name must be a string"),
    ('[[peers]]\nname = "a"\ntrust = "{FP}"\n[[peers]]\nname = "a"\ntrust = "{FP}"\n',
     "peer a has two [[peers]] tables"),
    ('[[peers]]\nname = "a"\ntrust = "{FP}"\nrate = "fast"\n', "peer a: rate: 'fast'"),
    ('[peers]\nname = "a"\n', "two brackets"),
    ('peers = ["a"]\n', "expected a table"),
])
def test_peers_table_errors_name_the_entry(tmp_path: Path, table: str, words: str) -> None:
    f = write(tmp_path / "q.toml", 'listen = ":1"\nstate_dir = "s"\n'
              + table.replace("{FP}", FP_A))
    err = error(f)
    assert words in str(err) and str(f) in str(err), str(err)


def test_a_peer_without_a_pin(tmp_path: Path) -> None:
    f = write(tmp_path / "q.toml", 'listen = ":1"\n[[peers]]\nname = "a"\n')
    assert "peer a has no pin: give --trust a=PIN" in str(error(f, state_dir=str(tmp_path)))


def test_config_check_prints_peers_that_load_back(hub: Path) -> None:
    result = CliRunner().invoke(app, ["config", "check", "--no-env", str(hub)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("[[peers]]") == 2 and "rate_total = 10000000  # 10.0 Mbit/s" in out
    assert tomllib.loads(out)["peers"][0] == {"name": "site-a", "trust": [FP_A],
                                              "rate": 2_000_000}
    again = load(write(hub.parent / "again.toml", out))
    assert again.agent == load(hub).agent


def test_run_refuses_a_bad_named_rate_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--listen", "127.0.0.1:0", "--state-dir",
                                      str(tmp_path), "--trust", f"a={FP_A}", "--rate", "a=10"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("quelay: config error: rate: peer a: '10': ")
    assert line.endswith("(from --rate)")


# -- client commands against a fake hub ----------------------------------------------------


PEERS = ("site-a", "site-b")


class FakeHub:
    """A control socket that records each request and answers as the contract says a hub
    with two named peers does (docs/control-protocol.md): enough for the CLI's requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.caps = {"site-a": 2_000_000, "site-b": 0}
        self.rate_total = 10_000_000
        self.streamed = b""  # what a writer attached in mode "write" sent

    def ops(self) -> list[str]:
        return [op for op, _ in self.requests]

    def args_of(self, op: str) -> dict[str, Any]:
        return [args for name, args in self.requests if name == op][-1]

    def _peer(self, args: dict[str, Any], key: str, required: bool = True) -> str | None:
        name = args.get(key)
        if name is None:
            if not required:
                return None
            raise Refused("peer_required", f"this agent has 2 peers (site-a, site-b): say "
                          f"which with '{key}'")
        if name not in PEERS:
            raise Refused("unknown_peer", f"no peer named {name!r} (peers: site-a, site-b)")
        return str(name)

    def info(self, peer: str | None, **kw: Any) -> dict[str, Any]:
        return {"id": "0" * 36, "direction": "out", "kind": "file", "name": "f",
                "size": 5, "priority": 4, "state": "done", "bytes": 5, "peer": peer or "",
                "created": 1.0, "finished": 2.0, "error": None, **kw}

    def rates(self) -> dict[str, Any]:
        share = {"site-a": 2_000_000, "site-b": 8_000_000}
        return {"rate": self.rate_total, "rate_total": self.rate_total,
                "peers": {n: {"rate": self.caps[n], "effective": share[n]} for n in PEERS}}

    def answer(self, op: str, args: dict[str, Any]) -> Any:
        if op in ("send_file", "open_stream", "fetch", "datagram_send"):
            peer = self._peer(args, "to")
            if op == "datagram_send":
                return {"accepted": True, "reason": None, "message": None, "sent_at": 1.0,
                        "max_payload": 1000}
            return self.info(peer, state="active")
        if op == "ls_remote":
            self._peer(args, "to")
            return {"files": [{"export": "data", "name": "x.bin", "size": 3, "mtime": 0}]}
        if op == "accept_incoming":
            return self.info(self._peer(args, "from", required=False), direction="in",
                             kind="stream", state="active")
        if op == "datagram_recv":
            self._peer(args, "from", required=False)
            return {"messages": [{"name": args["name"], "data": b"pos", "sent_at": 1.0,
                                  "received_at": 1.5}]}
        if op == "ls":
            rows = [self.info(p, id=f"{i}" * 36, name=f"to-{p}") for i, p in enumerate(PEERS)]
            rows = [r for r in rows if args.get("peer") in (None, r["peer"])]
            return {"transfers": rows, "total": len(rows), "next": None}
        if op in ("wait", "get", "cancel"):
            return self.info("site-a", kind="stream")
        if op == "get_rate":
            return self.rates()
        if op == "set_rate":
            if args.get("total"):
                self.rate_total = args["rate"]
            else:
                peer = self._peer(args, "peer")
                assert peer is not None
                self.caps[peer] = args["rate"]
            return self.rates()
        if op == "status":
            return hub_status()
        raise Refused("unknown_op", op)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(self.path))
        listener.listen(16)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(self._connection, trio.SocketStream(sock))

    async def _connection(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        async with stream:
            while True:
                frame = decoder.next_frame_untrusted()
                if frame is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.feed(data)
                    continue
                op, args = frame["op"], frame.get("args") or {}
                self.requests.append((op, args))
                if op == "attach":
                    await self._attach(stream, frame["id"], args, decoder.take_rest())
                    return
                try:
                    reply = {"id": frame["id"], "ok": True, "result": self.answer(op, args)}
                except Refused as exc:
                    reply = {"id": frame["id"], "ok": False,
                             "error": {"code": exc.code, "message": exc.message}}
                await stream.send_all(encode_frame(reply))

    async def _attach(self, stream: trio.SocketStream, rid: Any, args: dict[str, Any],
                      rest: bytes) -> None:
        info = self.info("site-a", kind="stream")
        await stream.send_all(encode_frame({"id": rid, "ok": True, "result": info}))
        if args["mode"] == "read":
            await stream.send_all(b"hello from site-a")
            return
        data = bytearray(rest)
        while chunk := await stream.receive_some(65536):
            data += chunk
        self.streamed = bytes(data)
        await stream.send_all(encode_frame({"event": "stream.eof",
                                            "data": {"id": info["id"], "bytes": len(data)}}))
        await stream.send_all(encode_frame({"event": "transfer.done", "data": info}))


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def hub_status() -> dict[str, Any]:
    def link(state: str, **kw: Any) -> dict[str, Any]:
        return {"state": state, "reason": kw.pop("reason", ""), "peer": kw.pop("peer", None),
                **kw}

    def wire(sent: int, rate: int) -> dict[str, Any]:  # one link's gate
        return {"rate": rate, "payload_rate": rate, "wire_bytes_sent": sent + sent // 10,
                "payload_bytes_sent": sent, "datagrams_sent": sent // 1000,
                "held_datagrams": 0, "header_bytes": 28}

    up = link("up", peer=FP_A, rtt=0.0123, cwnd=50_000)
    socket = {"rate": 1_900_000, "payload_rate": 1_800_000, "bytes_sent": 4_000_000,
              "wire_bytes_sent": 4_400_000, "bytes_received": 1000,
              "wire_bytes_received": 1100}  # the agent's socket: every link
    return {"agent": FP_C, "name": "hub", "epoch": 1, "role": "listen",
            "udp": ["127.0.0.1", 4433], "rate": 2_000_000, "rate_total": 10_000_000,
            "link": up, "wire": socket, "transfers": {"active": 1, "done": 2},
            "peers": [
                {"name": "site-a", "link": up, "rate": 2_000_000, "effective_rate": 2_000_000,
                 "address": None, "wire": wire(1_000_000, 1_900_000),
                 "transfers": {"active": 1, "done": 1}},
                {"name": "site-b", "link": link("down", reason="idle timeout"), "rate": 0,
                 "effective_rate": 8_000_000, "address": "10.0.0.2:4433",
                 "wire": wire(3_000_000, 0), "transfers": {"done": 1}},
            ]}


@pytest.fixture
async def fake(nursery: trio.Nursery, tmp_path: Path) -> FakeHub:
    hub = FakeHub(tmp_path / "control.sock")
    await nursery.start(hub.serve)
    return hub


async def cli(*args: str, input: str | bytes | None = None) -> Result:
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(app, list(args), input=input))


async def test_to_and_from_reach_the_agent_as_the_contract_names_them(
    fake: FakeHub, tmp_path: Path
) -> None:
    ctl = ["--control", str(fake.path)]
    src = write(tmp_path / "f.bin", "hello")
    sent = await cli("send", str(src), "--to", "site-a", *ctl, "--json")
    assert sent.exit_code == 0, sent.output
    assert fake.args_of("send_file")["to"] == "site-a"
    assert json.loads(sent.stdout)["peer"] == "site-a"

    assert (await cli("fetch", "data/x.bin", "--from", "site-b", *ctl)).exit_code == 0
    assert fake.args_of("fetch") == {"name": "data/x.bin", "export": "", "priority": 4,
                                     "to": "site-b"}
    listing = await cli("ls", "--remote", "--from", "site-b", *ctl)
    assert listing.stdout.startswith("data/x.bin") and fake.args_of("ls_remote") == {
        "to": "site-b"}

    streamed = await cli("stream", "--to", "site-b", "--name", "tm", "-q", *ctl, input="abc")
    assert streamed.exit_code == 0, streamed.output
    assert fake.args_of("open_stream")["to"] == "site-b" and fake.streamed == b"abc"

    got = await trio.run_process([sys.executable, "-m", "quelay.cli", "recv", "--from",
                                  "site-a", *ctl], capture_stdout=True, capture_stderr=True,
                                 check=False)  # writes to its real stdout: a process
    assert got.returncode == 0 and got.stdout == b"hello from site-a", got.stderr
    assert fake.args_of("accept_incoming") == {"from": "site-a"}

    assert (await cli("datagram", "send", "--name", "pos", "--to", "site-b", "x",
                      *ctl)).exit_code == 0
    assert fake.args_of("datagram_send")["to"] == "site-b"
    dg = await cli("datagram", "recv", "--name", "pos", "--from", "site-a", "--count", "1",
                   *ctl)
    assert dg.stdout == "pos\n" and fake.args_of("datagram_recv")["from"] == "site-a"


async def test_addressing_errors_are_one_clear_line(fake: FakeHub, tmp_path: Path) -> None:
    ctl = ["--control", str(fake.path)]
    src = write(tmp_path / "f.bin", "hello")
    result = await cli("send", str(src), *ctl)
    assert result.exit_code == 1 and "to" not in fake.args_of("send_file")
    assert result.stderr.strip() == ("quelay: peer_required: this agent has 2 peers "
                                     "(site-a, site-b): say which with 'to'")
    result = await cli("send", str(src), "--to", "site-x", *ctl, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["error"] == {
        "code": "unknown_peer", "message": "no peer named 'site-x' (peers: site-a, site-b)"}


async def test_ls_filters_by_peer_and_shows_a_peer_column(fake: FakeHub) -> None:
    ctl = ["--control", str(fake.path)]
    everything = (await cli("ls", *ctl)).stdout.splitlines()
    assert [line.split()[1] for line in everything] == ["site-a", "site-b"]
    assert "peer" not in fake.args_of("ls")
    only = await cli("ls", "--peer", "site-b", *ctl)
    assert fake.args_of("ls")["peer"] == "site-b"
    assert [line.split()[1] for line in only.stdout.splitlines()] == ["site-b"]
    assert ls_lines([fake.info("", name="x")])[0].split()[1] == "out"  # no PEER column


@pytest.mark.parametrize("words, total, plan", [
    ([], False, RateArgs(None, None, False)),
    (["2Mbps"], False, RateArgs(None, 2_000_000, False)),
    (["site-a"], False, RateArgs("site-a", None, False)),
    (["site-a", "0"], False, RateArgs("site-a", 0, False)),
    (["site-x", "1Mbps"], False, RateArgs("site-x", 1_000_000, False)),  # the agent decides
    ([], True, RateArgs(None, None, True)),
    (["10Mbps"], True, RateArgs(None, 10_000_000, True)),
])
def test_rate_arguments(words: list[str], total: bool, plan: RateArgs) -> None:
    assert rate_args(words, total, PEERS) == plan


@pytest.mark.parametrize("words, total, peers, message", [
    (["site-a", "1Mbps", "x"], False, PEERS, "give at most NAME and RATE"),
    (["site-a", "1Mbps"], True, PEERS, "--total takes a RATE only"),
    (["site-x"], False, PEERS, "'site-x' is neither a peer (site-a, site-b) nor a rate"),
    (["10"], False, PEERS, "'10' is neither a peer (site-a, site-b) nor a rate: rate 10 bit/s"),
    (["10"], False, [""], "rate: rate 10 bit/s is below the minimum"),
    (["a b", "1Mbps"], False, PEERS, "NAME: 'a b' is not a peer name"),
    (["site-a", "fast"], False, PEERS, "rate: "),
])
def test_rate_argument_errors(words: list[str], total: bool, peers: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        rate_args(words, total, peers)
    assert str(info.value).startswith(message), str(info.value)


async def test_rate_command_on_a_hub(fake: FakeHub) -> None:
    ctl = ["--control", str(fake.path)]
    shown = await cli("rate", *ctl)
    assert shown.stdout.splitlines() == [
        "total   10.0 Mbit/s",
        "site-a  2.00 Mbit/s  (effective 2.00 Mbit/s)",
        "site-b  uncapped     (effective 8.00 Mbit/s)"]
    assert json.loads((await cli("rate", *ctl, "--json")).stdout) == fake.rates()
    one = await cli("rate", "site-b", *ctl)
    assert one.stdout.strip() == "uncapped (effective 8.00 Mbit/s)"
    assert "set_rate" not in fake.ops()

    changed = await cli("rate", "site-b", "3Mbps", *ctl, "--json")
    assert fake.args_of("set_rate") == {"rate": 3_000_000, "peer": "site-b"}
    assert json.loads(changed.stdout) == {"peer": "site-b", "rate": 3_000_000,
                                          "effective": 8_000_000}
    total = await cli("rate", "--total", "20Mbps", *ctl)
    assert fake.args_of("set_rate") == {"rate": 20_000_000, "total": True}
    assert total.stdout.strip() == "20.0 Mbit/s" and fake.rate_total == 20_000_000

    bare = await cli("rate", "1Mbps", *ctl)
    assert bare.exit_code == 1 and "peer_required" in bare.stderr
    assert fake.args_of("set_rate") == {"rate": 1_000_000}
    typo = await cli("rate", "site-c", *ctl)
    assert typo.exit_code == 1 and "'site-c' is neither a peer" in typo.stderr
    assert (await cli("rate", "a", "b", "c", *ctl)).exit_code == 2


async def test_client_rate_calls_keep_their_single_link_shape(fake: FakeHub) -> None:
    async with open_client(fake.path) as client:
        assert await client.get_rate() == 10_000_000  # several links: the total
        assert await client.get_rate("site-a") == 2_000_000
        assert await client.set_rate("4Mbps", "site-a") == 4_000_000
        assert await client.set_rate(0, total=True) == 0
        assert (await client.rates())["peers"]["site-a"] == {"rate": 4_000_000,
                                                             "effective": 2_000_000}
        with pytest.raises(ClientError) as info:
            await client.get_rate("site-x")
        assert info.value.code == "unknown_peer"
        with pytest.raises(ClientUsageError):
            await client.set_rate(1, "site-a", total=True)
    assert fake.ops().count("set_rate") == 2


async def test_blocking_client_passes_the_peer(fake: FakeHub, tmp_path: Path) -> None:
    src = write(tmp_path / "f.bin", "hello")

    def calls() -> None:
        c = BlockingClient(fake.path)
        assert c.send_file(src, peer="site-b")["peer"] == "site-b"
        assert c.fetch("x.bin", peer="site-a")["peer"] == "site-a"
        assert c.ls_remote(peer="site-b")[0]["name"] == "x.bin"
        assert [t["peer"] for t in c.ls(peer="site-a")] == ["site-a"]
        assert c.datagram_send("pos", b"1", peer="site-a")["accepted"]
        assert c.datagram_recv("pos", peer="site-b")[0]["data"] == b"pos"
        assert c.set_rate("1Mbps", "site-b") == 1_000_000 == c.get_rate("site-b")
        assert c.set_rate("5Mbps", total=True) == 5_000_000 == c.rates()["rate_total"]

    await trio.to_thread.run_sync(calls)
    wanted = [("send_file", "to", "site-b"), ("fetch", "to", "site-a"),
              ("ls_remote", "to", "site-b"), ("ls", "peer", "site-a"),
              ("datagram_send", "to", "site-a"), ("datagram_recv", "from", "site-b")]
    for op, key, name in wanted:
        assert fake.args_of(op)[key] == name, op


def test_status_lines_show_every_peer() -> None:
    lines = status_lines(hub_status())
    assert lines[1] == ("total   cap 10.0 Mbit/s, wire now 1.90 Mbit/s; sent 4.2 MiB "
                        "(payload 3.8 MiB), received 1000 B")
    assert lines[2] == "peer    site-a  up  rtt 12.3 ms"
    assert lines[3] == (f"        cap 2.00 Mbit/s, effective 2.00 Mbit/s, wire now "
                        f"1.90 Mbit/s; {FP_A}")
    assert lines[4] == ("        sent 1.0 MiB (payload 976.6 KiB); "
                        "transfers active 1, done 1")
    assert lines[5] == "peer    site-b  down: idle timeout"
    assert lines[-1] == "transfers active 1, done 2"
    single = {**hub_status(), "peers": [{**hub_status()["peers"][0], "name": ""}]}
    assert status_lines(single)[1:3] == ["link    up", f"peer    {FP_A}"]


@pytest.mark.parametrize("name, link, reason", [
    (None, "down", "site-b down: idle timeout"),
    ("site-a", "up", None),
    ("site-b", "down", "idle timeout"),
    ("site-x", None, "no peer named 'site-x' (peers: site-a, site-b)"),
])
def test_health_of_a_hub(name: str | None, link: str | None, reason: str | None) -> None:
    report = health_report(hub_status(), name)
    assert (report["link"], report["reason"]) == (link, reason)
    assert report["links"]["site-b"] == {"state": "down", "reason": "idle timeout"}


async def test_health_command_on_a_hub(fake: FakeHub) -> None:
    ctl = ["--control", str(fake.path)]
    assert (await cli("health", *ctl)).stdout.strip() == (
        "ok: agent answers, links site-a up, site-b down")
    every = await cli("health", "--link", *ctl)
    assert every.exit_code == 1 and every.stderr.strip() == (
        "unhealthy: agent answers, link down: site-b down: idle timeout")
    one = await cli("health", "--link", "site-a", *ctl)
    assert one.exit_code == 0 and one.stdout.strip() == "ok: agent answers, link site-a up"
    assert (await cli("health", "site-b", *ctl)).exit_code == 1
    doc = json.loads((await cli("health", "site-x", *ctl, "--json")).stdout)
    assert doc["ok"] is False and doc["link"] is None and "site-x" in doc["reason"]


def test_watch_shows_every_link_and_a_peer_column() -> None:
    status = hub_status()
    transfers = [{"id": "a" * 36, "name": "plan.bin", "state": "active", "bytes": 50,
                  "size": 100, "direction": "out", "kind": "file", "priority": 4,
                  "created": 1.0, "peer": "site-a"}]
    state = WatchState()
    rates = state.observe(status, transfers, now=0.0, wall=0.0)
    assert rates["peer/site-a"] == 1_900_000 and rates["sent"] == 1_800_000
    later = json.loads(json.dumps(status))
    later["peers"][1]["wire"]["wire_bytes_sent"] += 125_000
    later["wire"]["wire_bytes_sent"] += 125_000
    rates = state.observe(later, transfers, now=1.0, wall=1.0)
    assert rates["peer/site-b"] == 1_000_000 and rates["peer/site-a"] == 0
    assert rates["wire_sent"] == 1_000_000  # the agent's socket: every link
    lines = render_watch(later, transfers, rates, width=120, height=20, wall=0.0)
    assert lines[1].startswith("total     cap 10.0 Mbit/s   wire out 1.00 Mbit/s")
    assert lines[2].split() == ["PEER", "LINK", "RTT", "CAP", "EFFECTIVE", "WIRE", "OUT",
                                "TRANSFERS"]
    assert lines[3].split()[:4] == ["site-a", "UP", "12.3", "ms"]
    assert lines[4].rstrip().endswith("done 1  (idle timeout)")
    assert lines[4].split()[:2] == ["site-b", "DOWN"]
    assert lines[5].startswith("transfers active 1, done 2")
    assert lines[7].split()[:3] == ["ID", "PEER", "NAME"]
    assert lines[8].split()[:3] == ["aaaaaaaa", "site-a", "plan.bin"]


# -- end to end: a hub agent and two sites on loopback -------------------------------------


async def test_a_hub_and_two_sites_from_the_command_line(nursery: trio.Nursery,
                                                         tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in ("hub", "site-a", "site-b")}
    fps = {name: load_or_create_identity(root / "state").fingerprint
           for name, root in roots.items()}
    # The hub's settings as `quelay run` parses them: named pins, a named rate, a total.
    settings = config.load(None, env={}, flags={
        "listen": "127.0.0.1:0", "state_dir": str(roots["hub"] / "state"),
        "inbox": str(roots["hub"] / "inbox"), "control": str(roots["hub"] / "control.sock"),
        "trust": [f"site-a={fps['site-a']}", f"site-b={fps['site-b']}"],
        "rate": ["site-b=1Mbps"], "rate_total": "20Mbps", "reconnect_interval": "0.2"})
    hub = Agent(settings.agent)
    await nursery.start(hub.run)
    sites = {}
    for name in ("site-a", "site-b"):
        sites[name] = Agent(site_config(roots[name], peer=hub.udp_address,
                                        trust=[fps["hub"]]))
        await nursery.start(sites[name].run)
    await wait_for(lambda: [p["link"]["state"] for p in hub.status()["peers"]] == ["up"] * 2)
    ctl = ["--control", str(hub.config.control)]

    src = make_file(tmp_path / "plan.bin", 100_000, seed=17)
    sent = await cli("send", str(src), "--to", "site-a", "--wait", "-q", *ctl, "--json")
    assert sent.exit_code == 0, sent.output
    final = json.loads(sent.stdout)
    assert final["state"] == "done" and final["peer"] == "site-a"
    assert sha256_file(roots["site-a"] / "inbox" / "plan.bin") == final["sha256"]
    assert not (roots["site-b"] / "inbox" / "plan.bin").exists()

    received: dict[str, Any] = {}

    async def reader() -> None:
        async with open_client(sites["site-b"].config.control) as client:
            incoming = await client.accept_incoming(name="tm")
            received["data"] = await incoming.read_all()

    async with trio.open_nursery() as inner:
        inner.start_soon(reader)
        streamed = await cli("stream", "--to", "site-b", "--name", "tm", "-q", *ctl,
                             input=b"telemetry " * 100)
    assert streamed.exit_code == 0, streamed.output
    assert received["data"] == b"telemetry " * 100

    bare = await cli("send", str(src), *ctl)
    assert bare.exit_code == 1 and bare.stderr.strip() == (
        "quelay: peer_required: this agent has 2 peers (site-a, site-b): say which with 'to'")
    typo = await cli("send", str(src), "--to", "site-x", *ctl)
    assert typo.exit_code == 1 and typo.stderr.strip() == (
        "quelay: unknown_peer: no peer named 'site-x' (peers: site-a, site-b)")

    changed = await cli("rate", "site-a", "2Mbps", *ctl)
    assert changed.exit_code == 0 and changed.stdout.startswith("2.00 Mbit/s (effective ")
    assert hub.rates()["peers"]["site-a"]["rate"] == 2_000_000
    caps = json.loads((await cli("rate", *ctl, "--json")).stdout)
    assert caps["rate_total"] == 20_000_000
    assert {n: p["rate"] for n, p in caps["peers"].items()} == {"site-a": 2_000_000,
                                                               "site-b": 1_000_000}
    which = await cli("rate", "1Mbps", *ctl)
    assert which.exit_code == 1 and which.stderr.strip() == (
        "quelay: peer_required: this agent has 2 peers (site-a, site-b): say which with "
        "'peer' (quelay rate NAME RATE: one link's cap; quelay rate --total RATE: the total)")

    shown = (await cli("status", *ctl)).stdout.splitlines()
    assert "total   cap 20.0 Mbit/s" in shown[1]
    peers = [line.split()[1:3] for line in shown if line.startswith("peer    ")]
    assert peers == [["site-a", "up"], ["site-b", "up"]]
    doc = json.loads((await cli("status", *ctl, "--json")).stdout)
    assert [p["name"] for p in doc["peers"]] == ["site-a", "site-b"]
    assert [p["transfers"] for p in doc["peers"]] == [{"done": 1}, {"done": 1}]
    fake_peer = hub_status()["peers"][0]  # the fake hub answers with the real keys
    assert set(fake_peer) <= set(doc["peers"][0])
    assert set(fake_peer["wire"]) <= set(doc["peers"][0]["wire"])
    assert set(hub_status()["wire"]) <= set(doc["wire"])
    assert set(FakeHub(tmp_path).rates()) == set(caps)
    listed = (await cli("ls", "--peer", "site-a", *ctl)).stdout.splitlines()
    assert [line.split()[1] for line in listed] == ["site-a"]
    healthy = await cli("health", "--link", *ctl)
    assert healthy.exit_code == 0 and healthy.stdout.strip() == (
        "ok: agent answers, links site-a up, site-b up")


async def test_quelay_run_with_named_flags(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A real `quelay run` process: named pins and rates from flags, a site dials in."""
    hub_root, site_root = tmp_path / "hub", tmp_path / "site-a"
    fp_hub = load_or_create_identity(hub_root / "state").fingerprint
    fp_site = load_or_create_identity(site_root / "state").fingerprint
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "quelay.cli", "run", "--listen", "127.0.0.1:0", "--state-dir",
         str(hub_root / "state"), "--trust", f"site-a={fp_site}", "--trust", f"site-b={FP_B}",
         "--rate", "site-b=1Mbps", "--rate-total", "20Mbps", "--log-format", "json"],
        stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = b""
    try:
        while b"agent ready" not in log:
            chunk = await proc.stderr.receive_some(65536)
            assert chunk, log
            log += chunk
        ready = next(json.loads(line)["message"] for line in log.decode().splitlines()
                     if "agent ready" in line)
        assert ready.endswith("2 peers (site-a, site-b), total cap 20.0 Mbit/s"), ready
        port = int(ready.split("udp 127.0.0.1:")[1].split(",")[0])
        site = Agent(site_config(site_root, peer=("127.0.0.1", port), trust=[fp_hub]))
        await nursery.start(site.run)
        await wait_for(lambda: site.link_state == "up")
        ctl = ["--control", str(hub_root / "state" / "control.sock")]
        caps = json.loads((await cli("rate", *ctl, "--json")).stdout)
        assert caps == {"rate": 20_000_000, "rate_total": 20_000_000, "peers": {
            "site-a": {"rate": 0, "effective": caps["peers"]["site-a"]["effective"]},
            "site-b": {"rate": 1_000_000, "effective": caps["peers"]["site-b"]["effective"]}}}
        one = await cli("health", "--link", "site-a", *ctl)
        assert one.exit_code == 0, one.output
        every = await cli("health", "--link", *ctl)  # site-b never dialled in
        assert every.exit_code == 1 and "site-b connecting" in every.stderr
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
