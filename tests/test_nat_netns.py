"""NAT traversal in network namespaces: two sites behind nftables masquerade, relay outside.

Topology (one set of namespaces per test, removed afterwards even on failure)::

    site-a 10.1.0.2 ── nat-a [masquerade] 100.64.1.2 ──┐
                                                       inet (router; relay on 198.51.100.1)
    site-b 10.2.0.2 ── nat-b [masquerade] 100.64.2.2 ──┘

Each NAT drops every unsolicited inbound datagram (input policy drop; forward
only established/related inbound), like a home or carrier NAT. Plain
``masquerade`` keeps the source port when it can (endpoint-independent
mapping); ``masquerade fully-random`` picks a new port for every destination
(a symmetric NAT). The agents and the relay are real ``quelay`` processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.client import AgentUnavailable, open_client
from quelay.identity import load_or_create_identity

from .conftest import make_file, sha256_file
from .test_transfers_e2e import send_and_wait

RELAY_IP = "198.51.100.1"
RELAY_PORT = 7300
FILES = (("a", "b", 1024 * 1024 + 3), ("b", "a", 500_001))  # sender, receiver, size
MOVED = sum(size for _, _, size in FILES)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip netns)"
    if shutil.which("nft") is None:
        return "needs nftables (apt-get install -y nftables)"
    probe = f"qprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def sh(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def nft_rules(symmetric: bool) -> str:
    masq = "masquerade fully-random" if symmetric else "masquerade"
    return f"""
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority 100; oifname "wan" {masq}; }}
}}
table inet filter {{
  chain input {{ type filter hook input priority 0; policy drop; }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" accept
  }}
}}
"""


@contextmanager
def namespaces(symmetric_b: bool) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    ns = {k: f"q{k}-{tag}" for k in ("inet", "nata", "sitea", "natb", "siteb")}
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", ns["inet"], "addr", "add", f"{RELAY_IP}/32", "dev", "lo")
        sh("ip", "netns", "exec", ns["inet"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for side, n, symmetric in (("a", 1, False), ("b", 2, symmetric_b)):
            nat, site = ns[f"nat{side}"], ns[f"site{side}"]
            # inet <-> nat (the NAT's WAN), nat <-> site (its LAN)
            sh("ip", "link", "add", f"w{side}{tag}", "netns", ns["inet"], "type", "veth",
               "peer", "name", "wan", "netns", nat)
            sh("ip", "link", "add", "lan", "netns", nat, "type", "veth",
               "peer", "name", "eth0", "netns", site)
            sh("ip", "-n", ns["inet"], "addr", "add", f"100.64.{n}.1/24", "dev", f"w{side}{tag}")
            sh("ip", "-n", ns["inet"], "link", "set", f"w{side}{tag}", "up")
            sh("ip", "-n", nat, "addr", "add", f"100.64.{n}.2/24", "dev", "wan")
            sh("ip", "-n", nat, "addr", "add", f"10.{n}.0.1/24", "dev", "lan")
            sh("ip", "-n", nat, "link", "set", "wan", "up")
            sh("ip", "-n", nat, "link", "set", "lan", "up")
            sh("ip", "-n", nat, "route", "add", "default", "via", f"100.64.{n}.1")
            sh("ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "-n", site, "addr", "add", f"10.{n}.0.2/24", "dev", "eth0")
            sh("ip", "-n", site, "link", "set", "eth0", "up")
            sh("ip", "-n", site, "route", "add", "default", "via", f"10.{n}.0.1")
            rules = subprocess.run(["ip", "netns", "exec", nat, "nft", "-f", "-"],
                                   input=nft_rules(symmetric), capture_output=True, text=True)
            if rules.returncode != 0:
                raise RuntimeError(f"nft: {rules.stderr.strip()}")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def spawn(procs: list[subprocess.Popen[bytes]], ns: str, log: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                                       "quelay.cli", *args], stdout=out, stderr=out, env=env))


async def status(control: Path) -> dict[str, Any]:
    try:
        async with open_client(control) as client:
            result: dict[str, Any] = await client.status()
            return result
    except (OSError, AgentUnavailable):
        return {}  # not up yet


async def run_sites(tmp_path: Path, symmetric_b: bool) -> tuple[dict[str, Any], ...]:
    secret = tmp_path / "secret"
    secret.write_text("netns-test-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    roots = {s: tmp_path / s for s in ("a", "b")}
    fps = {s: load_or_create_identity(r / "state").fingerprint for s, r in roots.items()}
    with namespaces(symmetric_b) as ns, processes() as procs:
        spawn(procs, ns["inet"], tmp_path / "relay.log", "rendezvous", "--listen",
              f"{RELAY_IP}:{RELAY_PORT}", "--secret-file", str(secret),
              "--control", str(tmp_path / "relay.sock"), "--stats-interval", "0")
        for side, other in (("a", "b"), ("b", "a")):
            root = roots[side]
            spawn(procs, ns[f"site{side}"], tmp_path / f"{side}.log", "run",
                  "--rendezvous", f"{RELAY_IP}:{RELAY_PORT}", "--session", "nat-test",
                  "--rendezvous-secret-file", str(secret), "--trust", fps[other],
                  "--state-dir", str(root / "state"), "--inbox", str(root / "inbox"),
                  "--control", str(root / "control.sock"), "--name", side,
                  "--reconnect-interval", "0.2")
        controls = {s: roots[s] / "control.sock" for s in roots}
        latest: dict[str, dict[str, Any]] = {}

        async def settled() -> bool:
            for s in roots:
                latest[s] = await status(controls[s])
            if any(p.poll() is not None for p in procs):
                logs = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("*.log")}
                raise AssertionError(f"a process exited: {logs}")
            infos = [latest[s] for s in roots]
            if not all(i and i["link"]["state"] == "up" for i in infos):
                return False
            rv = [i["rendezvous"] for i in infos]
            if symmetric_b:  # both agents finished a punch attempt that failed
                return all(r["punch_failures"] >= 1 for r in rv)
            return all(i["path"] == "direct" for i in infos)

        with trio.fail_after(60):
            while not await settled():
                await trio.sleep(0.1)
        # Files both ways, byte-exact, over whichever path the NATs allowed.
        for sender, receiver, size in FILES:
            src = make_file(tmp_path / f"from-{sender}.bin", size, seed=size)
            final = await send_and_wait(controls[sender], src)
            assert final["state"] == "done", final
            assert sha256_file(roots[receiver] / "inbox" / src.name) == sha256_file(src)
        after = {s: await status(controls[s]) for s in roots}
        relay_status = subprocess.run(
            [sys.executable, "-m", "quelay.cli", "rendezvous-status", "--control",
             str(tmp_path / "relay.sock"), "--json"], capture_output=True, text=True)
        assert relay_status.returncode == 0, relay_status.stderr
        import json

        return after["a"], after["b"], json.loads(relay_status.stdout)


async def test_endpoint_independent_nats_go_direct(tmp_path: Path) -> None:
    a, b, relay = await run_sites(tmp_path, symmetric_b=False)
    assert a["path"] == "direct" and b["path"] == "direct"
    for info in (a, b):
        rv = info["rendezvous"]
        assert rv["punch_successes"] >= 1
        assert rv["observed"][0].startswith("100.64.")  # the NAT's address, not 10.x
    # 1.5 MB moved, almost none of it through the relay (registrations: a few kB).
    assert relay["relayed_bytes"] < 64 * 1024
    assert relay["paired"] == 1


async def test_symmetric_nat_on_one_side_stays_relayed(tmp_path: Path) -> None:
    a, b, relay = await run_sites(tmp_path, symmetric_b=True)
    assert a["path"] == "relayed" and b["path"] == "relayed"
    for info in (a, b):
        assert info["rendezvous"]["punch_successes"] == 0
        assert info["rendezvous"]["punch_failures"] >= 1
    assert relay["relayed_bytes"] > MOVED  # the files went through the relay
