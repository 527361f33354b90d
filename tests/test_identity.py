"""Persistent identity: created once, reloaded unchanged, refused loudly when damaged."""

from __future__ import annotations

import re
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quelay.identity import (
    CERT_FILE,
    KEY_FILE,
    IdentityError,
    TrustStore,
    fingerprint_of,
    fingerprint_of_der,
    load_or_create_identity,
    parse_trust,
)

FP_RE = re.compile(r"sha256:[0-9a-f]{64}")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def der(ident_cert: x509.Certificate) -> bytes:
    return ident_cert.public_bytes(serialization.Encoding.DER)


# -- creation and reload ----------------------------------------------------------


def test_create_then_reload_keeps_fingerprint(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_identity(state)
    second = load_or_create_identity(state)
    assert FP_RE.fullmatch(first.fingerprint)
    assert first.fingerprint == second.fingerprint == fingerprint_of(second.certificate)
    assert first.key_path == state / KEY_FILE and first.cert_path == state / CERT_FILE


def test_two_agents_get_different_identities(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a")
    b = load_or_create_identity(tmp_path / "b")
    assert a.fingerprint != b.fingerprint


def test_permissions(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    ident = load_or_create_identity(state)
    assert mode(state) == 0o700
    assert mode(ident.key_path) == 0o600


def test_certificate_shape(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path, common_name="site-a")
    cert = ident.certificate
    assert isinstance(ident.private_key.curve, ec.SECP256R1)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str) and re.fullmatch(r"site-a-[0-9a-f]{8}", cn)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days > 99 * 365
    assert b"BEGIN PRIVATE KEY" in ident.key_path.read_bytes()  # PKCS8, unencrypted


def test_key_survives_when_crash_lost_the_certificate(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    key_pem = ident.key_path.read_bytes()
    ident.cert_path.unlink()
    again = load_or_create_identity(tmp_path)
    assert again.key_path.read_bytes() == key_pem
    assert again.certificate.public_key() == ident.certificate.public_key()


def test_concurrent_creation_agrees_on_one_identity(tmp_path: Path) -> None:
    results: list[str] = []

    def create() -> None:
        results.append(load_or_create_identity(tmp_path / "state").fingerprint)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert not list((tmp_path / "state").glob("*.tmp"))


# -- damaged state ----------------------------------------------------------------


def test_corrupt_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    ident.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match=re.escape(str(ident.key_path))):
        load_or_create_identity(tmp_path)


def test_corrupt_certificate_is_refused_naming_the_file(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    ident.cert_path.write_bytes(b"not a certificate")
    with pytest.raises(IdentityError, match=re.escape(str(ident.cert_path))):
        load_or_create_identity(tmp_path)


def test_mismatched_key_and_certificate(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a")
    b = load_or_create_identity(tmp_path / "b")
    a.cert_path.write_bytes(b.cert_path.read_bytes())
    with pytest.raises(IdentityError, match="does not match"):
        load_or_create_identity(tmp_path / "a")


def test_certificate_without_key_is_not_silently_replaced(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    ident.key_path.unlink()
    with pytest.raises(IdentityError, match=KEY_FILE):
        load_or_create_identity(tmp_path)


def test_non_ec_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / KEY_FILE).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(IdentityError, match="ECDSA"):
        load_or_create_identity(tmp_path)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("oops")
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path / "state")


# -- fingerprints and trust -------------------------------------------------------


@pytest.fixture
def ident_fp(tmp_path: Path) -> tuple[Path, str]:
    ident = load_or_create_identity(tmp_path / "peer")
    return ident.cert_path, ident.fingerprint


def test_fingerprint_of_der_matches_certificate(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    assert fingerprint_of_der(der(ident.certificate)) == ident.fingerprint


def test_parse_trust_variants(ident_fp: tuple[Path, str]) -> None:
    cert_path, fp = ident_fp
    hexdigits = fp.removeprefix("sha256:")
    colons = ":".join(hexdigits[i:i + 2] for i in range(0, 64, 2))
    assert parse_trust(fp) == fp
    assert parse_trust("SHA256:" + hexdigits.upper()) == fp
    assert parse_trust("sha256:" + colons.upper()) == fp
    assert parse_trust(f"  {fp}\n") == fp
    assert parse_trust(str(cert_path)) == fp


def test_parse_trust_der_file(ident_fp: tuple[Path, str], tmp_path: Path) -> None:
    cert_path, fp = ident_fp
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der_path = tmp_path / "peer.der"
    der_path.write_bytes(der(cert))
    assert parse_trust(str(der_path)) == fp


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sha256:" + "ab" * 31, "64 hex digits"),
        ("sha256:" + "ab" * 33, "64 hex digits"),
        ("sha256:" + "zz" * 32, "64 hex digits"),
        ("sha256:" + "a:b" + "ab" * 31, "64 hex digits"),  # colon inside a byte pair
        ("sha256:", "64 hex digits"),
        ("", "empty"),
        ("/nonexistent/peer.crt", "neither"),
        ("ab" * 32, "did you mean 'sha256:"),
    ],
)
def test_parse_trust_rejects(spec: str, message: str) -> None:
    with pytest.raises(IdentityError, match=re.escape(message)):
        parse_trust(spec)


def test_parse_trust_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError, match="junk.pem"):
        parse_trust(str(junk))


def test_trust_store(tmp_path: Path) -> None:
    trusted = load_or_create_identity(tmp_path / "a")
    stranger = load_or_create_identity(tmp_path / "b")
    store = TrustStore.from_specs([trusted.fingerprint.upper().replace("SHA256", "sha256")])
    assert len(store) == 1 and store.fingerprints == {trusted.fingerprint}
    assert store.is_trusted_der(der(trusted.certificate))
    assert store.is_trusted(trusted.certificate)
    assert not store.is_trusted_der(der(stranger.certificate))
    assert not store.is_trusted(stranger.certificate)
    assert not store.is_trusted_der(None)
    assert not store.is_trusted(None)


def test_empty_trust_store_refuses_everyone(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    store = TrustStore([])
    assert len(store) == 0
    assert not store.is_trusted_der(der(ident.certificate))


def test_trust_store_rejects_unnormalised_fingerprints() -> None:
    with pytest.raises(IdentityError, match="normalised"):
        TrustStore(["SHA256:" + "AB" * 32])
