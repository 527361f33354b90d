"""Settings: file < QUELAY_* env < flags, every AgentConfig field reachable, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from quelay.agent import AgentConfig
from quelay.cli import app, config
from quelay.cli.config import ConfigError

FP_A = "sha256:" + "ab" * 32
FP_B = "sha256:" + "cd" * 32


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A minimal valid file: a listener with a pinned peer, state under tmp_path."""
    return write(tmp_path / "quelay.toml", f"""
listen = "127.0.0.1:4433"
state_dir = "state"
trust = ["{FP_A}"]
""")


def load(file: Path | None = None, env: dict[str, str] | None = None,
         **flags: Any) -> config.Settings:
    return config.load(file, env=env or {}, flags=flags)


def error(file: Path | None = None, env: dict[str, str] | None = None,
          **flags: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(file, env, **flags)
    message = str(info.value)
    assert "\n" not in message
    return info.value


# -- precedence ---------------------------------------------------------------------------


def test_defaults_derive_from_state_dir(base: Path) -> None:
    s = load(base)
    state = base.parent / "state"  # relative to the file's directory
    assert s.agent.state_dir == state
    assert s.agent.inbox == state / "inbox"
    assert s.agent.control == state / "control.sock"
    assert s.agent.listen == ("127.0.0.1", 4433)
    assert s.agent.rate == 0 and s.agent.spool_size == 1024 * 1024
    assert s.sources["rate"] == "default" and s.sources["listen"] == str(base)


def test_file_then_env_then_flags(base: Path) -> None:
    base.write_text(base.read_text() + 'rate = "1Mbps"\nspool_size = "2MiB"\nname = "file"\n')
    s = load(base)
    assert (s.agent.rate, s.agent.spool_size, s.agent.name) == (1_000_000, 2 * 1024**2, "file")

    env = {"QUELAY_RATE": "2Mbps", "QUELAY_NAME": "env"}
    s = load(base, env)
    assert (s.agent.rate, s.agent.name) == (2_000_000, "env")
    assert s.sources["rate"] == "QUELAY_RATE" and s.agent.spool_size == 2 * 1024**2

    s = load(base, env, rate="3Mbps", spool="4MiB")  # "spool" is the historic flag name
    assert (s.agent.rate, s.agent.name, s.agent.spool_size) == (3_000_000, "env", 4 * 1024**2)
    assert s.sources["rate"] == "--rate" and s.sources["spool_size"].startswith("--spool-size")


def test_flags_replace_the_trust_list_and_env_splits_it(base: Path) -> None:
    assert load(base).agent.trust == [FP_A]
    assert load(base, {"QUELAY_TRUST": f"{FP_A}, {FP_B}"}).agent.trust == [FP_A, FP_B]
    assert load(base, trust=[FP_B]).agent.trust == [FP_B]


def test_unrelated_quelay_variables_are_ignored(base: Path) -> None:
    load(base, {"QUELAY_PURE_PYTHON": "1", "QUELAY_LINKSIM_PROFILE": "x"})


def test_dashes_and_units_in_the_file(tmp_path: Path) -> None:
    f = write(tmp_path / "q.toml", f"""
peer = "[::1]:4433"
state-dir = "{tmp_path / 's'}"
stream-window = "4MiB"
keepalive = "250ms"
idle_timeout = 45
rate = 2000000
congestion = "Reno"
log-format = "json"
""")
    s = load(f)
    assert s.agent.peer == ("::1", 4433) and s.agent.stream_window == 4 * 1024**2
    assert s.agent.keepalive == 0.25 and s.agent.idle_timeout == 45.0
    assert s.agent.rate == 2_000_000 and s.agent.congestion == "reno"
    assert s.log_format == "json"


# Values that every kind of setting accepts, as a file would write them.
SAMPLES: dict[str, tuple[Any, Any]] = {
    "path": ("somewhere", None),
    "address": ("127.0.0.1:5000", ("127.0.0.1", 5000)),
    "trust": ([FP_B], [FP_B]),
    "str": ("x", "x"),
    "size": ("64KiB", 65536),
    "rate": ("5Mbps", 5_000_000),
    "count": (7, 7),
    "seconds": ("1.5s", 1.5),
    "fraction": ("0.5", 0.5),
    "bool": (True, True),
}


# listen / peer: exactly one may be set, so the precedence tests above cover them.
# peers: a list of tables, set by [[peers]] and by NAME=VALUE entries (the test below).
@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(AgentConfig)
                                   if f.name not in ("listen", "peer", "peers")])
def test_every_agent_field_is_settable_from_file_env_and_flag(
    tmp_path: Path, field: str
) -> None:
    setting = config.settings()[field]
    raw, expected = SAMPLES.get(setting.kind, (None, None))
    if setting.kind == "choice":
        raw = expected = setting.choices[-1]
    if setting.kind == "size" and field in config.LIMITS:
        raw = expected = int(config.LIMITS[field][0]) + 1
    if setting.kind == "count" and field in config.LIMITS:
        raw = expected = int(config.LIMITS[field][0]) + 1
    if setting.kind == "list" and field == "export":
        raw = expected = [f"data={tmp_path}"]
    if raw is None and setting.kind != "path":
        pytest.skip(f"no sample for kind {setting.kind}")
    if setting.kind == "path":
        raw, expected = str(tmp_path / "p"), tmp_path / "p"
    basics = {"listen": "127.0.0.1:1", "state_dir": str(tmp_path / "s")}
    if field == "rendezvous":  # replaces listen/peer; needs a session and a secret file
        basics = {"session": "s", "rendezvous_secret_file": "secret",
                  "state_dir": str(tmp_path / "s")}
    basics.pop(field, None)
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**basics, field: raw}.items()]
    f = write(tmp_path / "q.toml", "\n".join(lines) + "\n")
    assert getattr(load(f).agent, field) == expected
    if isinstance(raw, list):
        env_raw = ",".join(raw)
    elif isinstance(raw, bool):
        env_raw = str(raw).lower()
    else:
        env_raw = str(raw)
    s = load(None, {setting.env: env_raw}, **basics)
    assert getattr(s.agent, field) == expected
    s = load(None, {}, **basics, **{field: raw if isinstance(raw, list) else env_raw})
    assert getattr(s.agent, field) == expected


def test_peers_are_settable_from_the_file_env_and_named_flags(tmp_path: Path) -> None:
    f = write(tmp_path / "q.toml", f"""
listen = "127.0.0.1:1"
state_dir = "s"
[[peers]]
name = "site-a"
trust = "{FP_A}"
address = "10.0.0.1:4433"
rate = "2Mbps"
""")
    (spec,) = load(f).agent.peers
    assert (spec.name, spec.trust, spec.address, spec.rate) == (
        "site-a", [FP_A], ("10.0.0.1", 4433), 2_000_000)
    basics = {"listen": "127.0.0.1:1", "state_dir": str(tmp_path / "s")}
    env = {"QUELAY_TRUST": f"site-a={FP_A}", "QUELAY_PEER": "site-a=10.0.0.1:4433",
           "QUELAY_RATE": "site-a=2Mbps"}
    assert load(None, env, **basics).agent.peers == [spec]
    flags = {"trust": [f"site-a={FP_A}"], "peer": ["site-a=10.0.0.1:4433"],
             "rate": ["site-a=2Mbps"]}
    s = load(None, {}, **basics, **flags)
    assert s.agent.peers == [spec] and s.sources["peers"] == "--trust, --peer, --rate"


def test_run_has_a_flag_for_every_setting() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    flags = {opt for p in command.params for opt in p.opts}
    for s in config.settings().values():
        assert set(s.flags) <= flags, s.key
    # The historic flags are all still there.
    assert {"--listen", "--peer", "--control", "--state-dir", "--inbox", "--trust", "--name",
            "--spool", "--config", "--log-level"} <= flags


# -- validation: one clear line naming the key ---------------------------------------------


def test_unknown_key_in_file(base: Path) -> None:
    base.write_text(base.read_text() + "spool_sise = 5\n")
    err = error(base)
    assert err.key == "spool_sise" and str(base) in str(err)
    assert "did you mean 'spool_size'" in str(err)


def test_rate_without_unit_is_refused_everywhere(base: Path) -> None:
    for err in (error(base, rate="10"), error(base, {"QUELAY_RATE": "10"})):
        assert err.key == "rate" and "10Mbps" in str(err)
    assert "bytes" in str(error(base, rate="2MB/s"))
    base.write_text(base.read_text() + "rate = 10\n")
    assert error(base).key == "rate"


@pytest.mark.parametrize("key, value", [
    ("spool_size", "-1MiB"), ("stream_window", -5), ("connection_window", "-8MiB"),
    ("max_datagram_size", 100), ("max_datagram_size", 20000), ("spool_size", 10),
    ("keepalive", -1), ("idle_timeout", 0), ("handshake_timeout", "soon"),
    ("max_streams", -1), ("max_streams", 0), ("congestion", "bbr"), ("log_level", "loud"),
    ("log_format", "xml"), ("name", 5), ("listen", "nohost"), ("listen", "h:99999"),
])
def test_bad_values_name_their_key(base: Path, key: str, value: Any) -> None:
    lines = [line for line in base.read_text().splitlines() if not line.startswith(key)]
    base.write_text("\n".join(lines) + f"\n{key} = {json.dumps(value)}\n")
    err = error(base)
    assert err.key == key and str(err).startswith(f"{key}: ") and str(base) in str(err)


def test_bad_trust_entry(base: Path, tmp_path: Path) -> None:
    err = error(base, trust=["sha256:1234"])
    assert err.key == "trust" and "64 hex digits" in str(err)
    err = error(base, trust=[str(tmp_path / "missing.pem")])
    assert err.key == "trust" and "certificate" in str(err)


def test_listen_and_peer(tmp_path: Path) -> None:
    err = error(None, state_dir=str(tmp_path))
    assert err.key == "listen/peer"
    err = error(None, state_dir=str(tmp_path), listen=":1", peer="h:1")
    assert err.key == "listen/peer" and "--listen" in str(err) and "--peer" in str(err)


def test_unusable_inbox(base: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    err = error(base, inbox=str(tmp_path / "a-file"))
    assert err.key == "inbox" and "not a directory" in str(err)
    err = error(base, inbox=str(tmp_path / "a-file" / "inbox"))
    assert err.key == "inbox" and "cannot be created" in str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_inbox(base: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = error(base, inbox=str(locked))
    assert err.key == "inbox" and "writable" in str(err)


def test_control_path_that_is_not_a_socket(base: Path, tmp_path: Path) -> None:
    (tmp_path / "ctl").write_text("x")
    assert error(base, control=str(tmp_path / "ctl")).key == "control"


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    err = error(write(tmp_path / "bad.toml", "listen = \n"))
    assert err.key == "config" and "TOML" in str(err)
    assert error(tmp_path / "nope.toml").key == "config"
    err = error(write(tmp_path / "t.toml", "[section]\nlisten = ':1'\n"))
    assert err.key == "section"


def test_new_agent_fields_appear_automatically(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kinds come from the field's type and name, so a new field needs no code here."""
    assert config._kind_of("max_concurrent", int) == "count"
    assert config._kind_of("chunk_size", int) == "size"
    assert config._kind_of("probe_rate", int) == "rate"
    assert config._kind_of("linger", float) == "seconds"
    assert config._kind_of("journal", Path) == "path"
    assert config._kind_of("fsync", bool) == "bool"


# -- the command line ----------------------------------------------------------------------


def test_config_check_prints_effective_settings_that_load_back(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUELAY_RATE", "2Mbps")
    result = CliRunner().invoke(app, ["config", "check", str(base)])
    assert result.exit_code == 0, result.output
    assert "rate = 2000000  # 2.00 Mbit/s, QUELAY_RATE" in result.stdout
    effective = tomllib.loads(result.stdout)
    assert effective["rate"] == 2_000_000 and effective["listen"] == "127.0.0.1:4433"
    again = config.load(write(base.parent / "again.toml", result.stdout), env={})
    assert again.agent == config.load(base, env={"QUELAY_RATE": "2Mbps"}).agent

    result = CliRunner().invoke(app, ["config", "check", "--no-env", "--json", str(base)])
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["settings"]["rate"] == {"value": 0, "source": "default"}


def test_config_check_fails_with_one_line(base: Path) -> None:
    base.write_text(base.read_text() + 'rate = "10"\n')
    result = CliRunner().invoke(app, ["config", "check", str(base)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quelay: config error: rate: ")
    result = CliRunner().invoke(app, ["config", "check", "--json", str(base)])
    assert json.loads(result.stdout)["error"]["key"] == "rate"


def test_run_fails_at_start_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--listen", "127.0.0.1:0", "--state-dir",
                                      str(tmp_path), "--rate", "10"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "quelay: config error: rate: '10': rate 10 bit/s is below the minimum 1 kbit/s; "
        "did you mean 10Mbps or 10kbps? (from --rate)"]


def test_config_keys_lists_every_setting() -> None:
    result = CliRunner().invoke(app, ["config", "keys", "--json"])
    keys = {row["key"] for row in json.loads(result.stdout)}
    assert keys == set(config.settings())
    assert {f.name for f in dataclasses.fields(AgentConfig)} <= keys
