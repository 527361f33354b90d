"""compose/: what can be checked without a Docker engine.

* docker-compose.yml parses and has the promised shape (two agents on separate
  networks joined only through the link simulator, healthchecks, the exchange
  volume, the profile from an environment variable);
* every ``quelay`` command and option used by the compose file, the
  Dockerfile, the entry script and README's compose section exists in the CLI;
* every ``QUELAY_*`` variable it sets is a setting (or the entry script's own);
* the shared settings file and each site's environment validate;
* the entry script really exchanges identities: two agents started through it
  (outside containers) pin each other and bring the link up.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import typer.main

from quelay.cli import app, config
from quelay.client import AgentUnavailable, open_client
from quelay.linksim.profiles import parse_profile

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
ENTRY = COMPOSE / "entrypoint.sh"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return doc


def substitute(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# -- shape -----------------------------------------------------------------------------


def test_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"site-a", "site-b", "linksim", "prometheus"}
    nets = {name: set(svc["networks"]) for name, svc in services.items()}
    assert nets["site-a"].isdisjoint(nets["site-b"])  # only the simulator joins them
    assert nets["linksim"] >= nets["site-a"] | nets["site-b"]
    for site in ("site-a", "site-b"):
        svc = services[site]
        assert svc["healthcheck"]["test"][:3] == ["CMD", "quelay", "health"]
        assert any(v.startswith("exchange:") for v in svc["volumes"])
        assert svc["build"]["dockerfile"] == "compose/Dockerfile"
    env_a, env_b = services["site-a"]["environment"], services["site-b"]["environment"]
    assert "QUELAY_LISTEN" in env_a and "QUELAY_PEER" not in env_a
    port = env_a["QUELAY_LISTEN"].rsplit(":", 1)[1]
    assert env_b["QUELAY_PEER"] == f"linksim:{port}"  # B dials the simulator, not A
    command = services["linksim"]["command"]
    assert command[command.index("--upstream") + 1] == f"site-a:{port}"
    assert command[command.index("--listen") + 1].endswith(f":{port}")
    profile = services["linksim"]["environment"]["QUELAY_LINKSIM_PROFILE"]
    assert profile.startswith("${LINK_PROFILE:-")
    parse_profile(substitute(profile))  # the default profile exists


def test_prometheus_scrapes_both_agents(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prom = services["prometheus"]
    assert any(v.startswith("./prometheus.yml:") for v in prom["volumes"])
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    for site in ("site-a", "site-b"):
        metrics = services[site]["environment"]["QUELAY_METRICS"]
        host, port = config.parse_address(metrics)
        assert f"{site}:{port}" in targets
        # Prometheus can reach the site: they share a network.
        assert set(prom["networks"]) & set(services[site]["networks"])


# -- every quelay command and option exists ---------------------------------------------


def quelay_invocations(compose: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(where, argv after 'quelay') for every quelay call in the deployment files."""
    found: list[tuple[str, list[str]]] = []
    for name, svc in compose["services"].items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        if "quelay" in test:
            found.append((f"{name} healthcheck", test[test.index("quelay") + 1:]))
        if svc.get("entrypoint") == ["quelay"]:
            found.append((f"{name} command", [str(a) for a in svc["command"]]))
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    for m in re.finditer(r"CMD (\[.*\])", dockerfile):
        argv = json.loads(m.group(1))
        if argv[0] == "quelay":
            found.append(("Dockerfile", argv[1:]))
    texts = {"entrypoint.sh": ENTRY.read_text()}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying with compose", 1)[1].split("\n## ", 1)[0]
    texts["README compose section"] = section
    for where, text in texts.items():
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for m in re.finditer(r"(?:^|[\s(|;])quelay\s+([^)|;&>#\n]*)", line):
                argv = shlex.split(m.group(1))
                if argv and not argv[0].startswith(("$", "-")):  # not `exec quelay "$@"`
                    found.append((where, argv))
    return found


def test_every_quelay_command_and_option_exists(compose: dict[str, Any]) -> None:
    group = typer.main.get_command(app)
    calls = quelay_invocations(compose)
    used = {argv[0] for _, argv in calls}
    assert {"health", "linksim", "identity", "run", "send", "stream", "recv", "watch",
            "rate"} <= used, used
    for where, argv in calls:
        command = group.commands.get(argv[0])  # type: ignore[attr-defined]
        assert command is not None, f"{where}: no command quelay {argv[0]}"
        options = {opt for p in command.params for opt in p.opts}
        for token in argv[1:]:
            if token.startswith("--"):
                assert token.split("=")[0] in options, f"{where}: quelay {argv[0]} {token}"


def test_environment_names_are_settings(compose: dict[str, Any]) -> None:
    settings_env = {s.env for s in config.settings().values()}
    linksim = typer.main.get_command(app).commands["linksim"]  # type: ignore[attr-defined]
    linksim_env = {p.envvar for p in linksim.params if p.envvar}
    entry_header = ENTRY.read_text().split("set -eu", 1)[0]
    for name, svc in compose["services"].items():
        for var in svc.get("environment", {}):
            if not var.startswith("QUELAY_"):
                continue
            known = (var in settings_env or var == config.CONFIG_ENV or var in linksim_env
                     or var in entry_header)
            assert known, f"{name}: {var} is neither a setting nor documented in the entry script"


def test_settings_file_and_site_environments_validate(compose: dict[str, Any],
                                                      tmp_path: Path) -> None:
    toml_file = COMPOSE / "quelay.toml"
    for site in ("site-a", "site-b"):
        env = {k: substitute(str(v)) for k, v in compose["services"][site]["environment"].items()}
        env["QUELAY_STATE_DIR"] = str(tmp_path / site)  # the image sets it (ENV)
        env["QUELAY_TRUST"] = "sha256:" + "00" * 32  # the entry script's --trust
        settings = config.load(toml_file, env=env)
        assert settings.log_format == "json" and settings.agent.rate == 0


def test_dockerfile_copies_what_exists() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    for m in re.finditer(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile, re.MULTILINE):
        for source in m.group(1).split():
            assert (ROOT / source).exists(), source
    assert "HEALTHCHECK" in dockerfile and "USER quelay" in dockerfile


def test_entry_script_syntax() -> None:
    subprocess.run(["sh", "-n", str(ENTRY)], check=True)


# -- the identity exchange, for real ----------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _read_until(stream: trio.abc.ReceiveStream, buf: bytearray, needle: bytes) -> None:
    while needle not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"ended before {needle!r}: {bytes(buf)!r}")
        buf += chunk


async def test_entry_script_exchanges_identities(tmp_path: Path) -> None:
    shim = tmp_path / "bin" / "quelay"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m quelay.cli "$@"\n')
    shim.chmod(0o755)
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    port = free_udp_port()
    base = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}",
            "QUELAY_EXCHANGE": str(exchange), "QUELAY_LOG_FORMAT": "json"}
    sites = {
        "site-a": {"QUELAY_PEER_SITE": "site-b", "QUELAY_LISTEN": f"127.0.0.1:{port}"},
        "site-b": {"QUELAY_PEER_SITE": "site-a", "QUELAY_PEER": f"127.0.0.1:{port}",
                   "QUELAY_RECONNECT_INTERVAL": "0.2"},
    }
    procs: dict[str, trio.Process] = {}
    logs: dict[str, bytearray] = {}
    try:
        for site, extra in sites.items():
            env = {**base, **extra, "QUELAY_SITE": site,
                   "QUELAY_STATE_DIR": str(tmp_path / site)}
            procs[site] = await trio.lowlevel.open_process(["sh", str(ENTRY)], env=env,
                                                           stderr=subprocess.PIPE)
            logs[site] = bytearray()
        for site, proc in procs.items():
            assert proc.stderr is not None
            with trio.fail_after(30):
                await _read_until(proc.stderr, logs[site], b"agent ready")
        fingerprints = {site: (exchange / f"{site}.fingerprint").read_text().strip()
                        for site in sites}
        assert (exchange / "site-a.crt").is_file() and fingerprints["site-a"].startswith("sha256:")
        for site in sites:
            assert f"trusting {'site-b' if site == 'site-a' else 'site-a'}".encode() in logs[site]

        async def link_up(control: Path) -> bool:
            try:
                async with open_client(control) as client:
                    return bool((await client.status())["link"]["state"] == "up")
            except AgentUnavailable:
                return False

        with trio.fail_after(30):
            while not await link_up(tmp_path / "site-b" / "control.sock"):
                await trio.sleep(0.05)
        async with open_client(tmp_path / "site-a" / "control.sock") as client:
            status = await client.status()
        assert status["name"] == "site-a" and status["link"]["peer"] == fingerprints["site-b"]
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()
        with trio.move_on_after(20):
            for proc in procs.values():
                await proc.wait()
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert all(proc.returncode == 0 for proc in procs.values())
