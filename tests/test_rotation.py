"""Identity rotation without downtime: rotate (overlap), peers pinned to either identity
connect, retire (only the new one)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quelay.agent import Agent
from quelay.client import open_client
from quelay.identity import (
    CERT_FILE,
    ENDORSEMENT_FILE,
    NEXT_CERT_FILE,
    NEXT_KEY_FILE,
    PREVIOUS_CERT_FILE,
    PREVIOUS_KEY_FILE,
    IdentityError,
    TrustStore,
    fingerprint_of,
    load_or_create_identity,
    retire_identity,
    rotate_identity,
)

from .conftest import make_file, sha256_file, site_config, wait_for


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_rotate_keeps_the_previous_identity_until_retired(tmp_path: Path) -> None:
    state = tmp_path / "s"
    old = load_or_create_identity(state)
    new = rotate_identity(state)
    assert new.fingerprint != old.fingerprint
    assert new.previous_fingerprint == old.fingerprint
    assert [fingerprint_of(c) for c in new.chain][1] == old.fingerprint
    again = load_or_create_identity(state)  # stable across loads
    assert again.fingerprint == new.fingerprint and again.previous_fingerprint == old.fingerprint
    assert (state / PREVIOUS_KEY_FILE).stat().st_mode & 0o077 == 0
    with pytest.raises(IdentityError, match="retire it first"):
        rotate_identity(state)

    pinned_old, pinned_new = TrustStore([old.fingerprint]), TrustStore([new.fingerprint])
    stranger = TrustStore([load_or_create_identity(tmp_path / "x").fingerprint])
    assert pinned_old.trusts_chain(der(new.certificate), new.chain) == old.fingerprint
    assert pinned_new.trusts_chain(der(new.certificate), new.chain) == new.fingerprint
    assert pinned_new.trusts_chain(der(new.certificate), []) == new.fingerprint
    assert pinned_old.trusts_chain(der(new.certificate), []) is None  # no endorsement
    assert stranger.trusts_chain(der(new.certificate), new.chain) is None

    assert retire_identity(state) == old.fingerprint
    retired = load_or_create_identity(state)
    assert retired.fingerprint == new.fingerprint and retired.chain == []
    assert not (state / PREVIOUS_KEY_FILE).exists() and not (state / ENDORSEMENT_FILE).exists()
    with pytest.raises(IdentityError, match="no previous identity"):
        retire_identity(state)
    rotate_identity(state)  # a later rotation is allowed again


def test_a_forged_endorsement_is_refused(tmp_path: Path) -> None:
    """Someone who copies the previous certificate (public) cannot vouch for their key."""
    old = load_or_create_identity(tmp_path / "victim")
    attacker = load_or_create_identity(tmp_path / "attacker")
    forger = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    forged = (x509.CertificateBuilder().subject_name(attacker.certificate.subject)
              .issuer_name(old.certificate.subject)  # claims the victim as issuer
              .public_key(attacker.private_key.public_key())
              .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(1))
              .sign(forger, hashes.SHA256()))
    store = TrustStore([old.fingerprint])
    assert store.trusts_chain(der(attacker.certificate), [forged, old.certificate]) is None
    # An endorsement for another key (a real one, replayed) does not carry over either.
    real = rotate_identity(tmp_path / "victim")
    assert store.trusts_chain(der(attacker.certificate), real.chain) is None


def test_an_interrupted_rotation_is_finished_or_undone(tmp_path: Path) -> None:
    state = tmp_path / "s"
    old = load_or_create_identity(state)
    new = rotate_identity(state)
    retire_identity(state)
    # Crash after the next pair was written and the key renamed, before the certificate:
    second = rotate_identity(tmp_path / "donor")  # borrow a consistent next pair + overlap
    (state / NEXT_CERT_FILE).write_bytes((tmp_path / "donor" / CERT_FILE).read_bytes())
    (state / "identity.key").write_bytes((tmp_path / "donor" / "identity.key").read_bytes())
    assert load_or_create_identity(state).fingerprint == second.fingerprint
    # Crash before the next certificate: the half-made overlap is dropped.
    current = load_or_create_identity(state).certificate
    (state / PREVIOUS_CERT_FILE).write_bytes(current.public_bytes(serialization.Encoding.PEM))
    (state / NEXT_KEY_FILE).write_bytes(b"partial")
    (state / ENDORSEMENT_FILE).write_bytes(b"partial")
    loaded = load_or_create_identity(state)
    assert loaded.fingerprint == second.fingerprint and loaded.previous is None
    assert not (state / NEXT_KEY_FILE).exists() and not (state / ENDORSEMENT_FILE).exists()
    assert old.fingerprint != new.fingerprint != second.fingerprint


async def test_peers_pinned_to_either_identity_connect_during_the_overlap(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    roots = {n: tmp_path / n for n in ("b", "old1", "new1", "old2", "new2")}
    fps = {n: load_or_create_identity(r / "state").fingerprint for n, r in roots.items()}
    b = Agent(site_config(roots["b"], listen=("127.0.0.1", 0),
                          trust=[fp for n, fp in fps.items() if n != "b"]))
    await nursery.start(b.run)
    old_fp = fps["b"]

    async def dialer(name: str, pin: str) -> Agent:
        agent = Agent(site_config(roots[name], peer=b.udp_address, trust=[pin]))
        await nursery.start(agent.run)
        return agent

    a = await dialer("old1", old_fp)
    await wait_for(lambda: a.link_state == "up")

    # Rotate while the session runs; the running agent reloads; the session stays.
    new_fp = rotate_identity(roots["b"] / "state").fingerprint
    async with open_client(b.config.control) as client:
        reply = await client.request("reload_identity")
    assert reply == {"fingerprint": new_fp, "previous": old_fp}
    assert a.link_ups == 1 and a.link_state == "up"

    # The next connection presents the new identity; the old pin still admits it.
    assert b.session is not None
    b.session.conn.close("reconnect after rotation")
    await wait_for(lambda: a.link_ups == 2 and a.link_state == "up")
    assert a.peer_fingerprint == new_fp
    src = make_file(tmp_path / "r.bin", 100_000, seed=3)
    async with open_client(a.config.control) as client:
        info = await client.send_file(src)
        assert (await client.wait(info["id"]))["state"] == "done"
    assert sha256_file(b.config.inbox / "r.bin") == sha256_file(src)
    await a.shutdown()

    fresh = await dialer("new1", new_fp)  # pinned only to the new identity
    await wait_for(lambda: fresh.link_state == "up")
    await fresh.shutdown()

    # Retire: only the new pin works from now on.
    retire_identity(roots["b"] / "state")
    assert b.reload_identity() == {"fingerprint": new_fp, "previous": None}
    stale = await dialer("old2", old_fp)
    await wait_for(lambda: stale.book.stats.peer_rejected["untrusted_identity"] >= 1)
    assert stale.link_ups == 0
    await stale.shutdown()
    current = await dialer("new2", new_fp)
    await wait_for(lambda: current.link_state == "up")
    await current.shutdown()


async def test_cli_rotate_and_retire_reload_the_running_agent(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    from .test_cli import cli

    state = tmp_path / "s" / "state"
    old_fp = load_or_create_identity(state).fingerprint
    agent = Agent(site_config(tmp_path / "s", listen=("127.0.0.1", 0), trust=[old_fp]))
    await nursery.start(agent.run)
    rotated = await cli("identity", "rotate", "--state-dir", str(state), "--control",
                        str(agent.config.control), "--json")
    out = json.loads(rotated.stdout)
    assert out["previous"] == old_fp and "presents it" in out["agent"]
    assert agent.fingerprint == out["fingerprint"] != old_fp
    shown = json.loads((await cli("identity", "--state-dir", str(state), "--json")).stdout)
    assert shown["previous"] == old_fp
    retired = await cli("identity", "retire", "--state-dir", str(state), "--control",
                        str(agent.config.control), "--json")
    assert json.loads(retired.stdout)["retired"] == old_fp
    assert agent.identity.chain == []
