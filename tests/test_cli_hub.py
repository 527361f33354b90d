"""A hub's command line: named peers in settings, --to/--from, ``quelay rate`` and the views.

Settings are checked through :func:`quelay.cli.config.load` (as test_config does);
client commands against a fake control server that records every request and
answers as docs/control-protocol.md says a hub does.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from quelay.agent.peerspec import PeerSpec
from quelay.cli import app, config
from quelay.cli.config import ConfigError

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
