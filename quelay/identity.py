"""Persistent agent identity (key + self-signed certificate) and fingerprint pinning.

Agents authenticate each other by *pinning*: each operator tells its agent the
SHA-256 fingerprint of the peer's certificate (``--trust sha256:...`` or a path
to the peer's certificate file). There is no CA, so the certificate is only a
container for the public key; what matters is that the key stays the same
across restarts, which is why it lives in the state directory and is created
exactly once, atomically.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import QuelayError

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
CERT_FILE = "identity.crt"
LOCK_FILE = ".identity.lock"
VALIDITY = dt.timedelta(days=36525)  # ~100 years: pinning replaces expiry
CLOCK_SKEW = dt.timedelta(hours=1)  # so a peer whose clock is behind still accepts us
FINGERPRINT_PREFIX = "sha256:"
# Curves that TLS 1.3 (and so aioquic) can sign with.
TLS13_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
# 32 hex byte pairs, optionally separated by single colons (as openssl prints them).
_HEX_PAIRS_RE = re.compile(r"[0-9a-f]{2}(?::?[0-9a-f]{2}){31}")
_BARE_HEX_RE = re.compile(r"[0-9a-fA-F:]{64,95}")


class IdentityError(QuelayError):
    """Our own identity or trust configuration is unusable: the operator's to fix."""

    code = "identity_error"


@dataclass(frozen=True)
class Identity:
    """This agent's key pair and the certificate that carries its public half."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    fingerprint: str  # "sha256:<64 lowercase hex>" of the certificate's DER
    cert_path: Path
    key_path: Path


# -- fingerprints -----------------------------------------------------------------


def fingerprint_of_der(der: bytes) -> str:
    """Fingerprint of a DER certificate as received from the peer (no parsing needed)."""
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_of(cert: x509.Certificate) -> str:
    """Fingerprint of a parsed certificate; equal to :func:`fingerprint_of_der` of its DER."""
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


def parse_trust(spec: str) -> str:
    """Turn one ``--trust`` value into a normalised fingerprint.

    ``sha256:<hex>`` (any case, optional ``:`` between byte pairs) is taken as a
    fingerprint; anything else must name a PEM or DER certificate file. A file
    whose name starts with ``sha256:`` can be given as ``./sha256:...``.
    """
    text = spec.strip()
    if not text:
        raise IdentityError(
            "empty trust entry: give 'sha256:<64 hex digits>' or a certificate file"
        )
    if text.lower().startswith(FINGERPRINT_PREFIX):
        return _parse_fingerprint(text)
    return _fingerprint_of_file(text)


def _parse_fingerprint(text: str) -> str:
    digits = text[len(FINGERPRINT_PREFIX):].lower()
    if not _HEX_PAIRS_RE.fullmatch(digits):
        count = sum(c in "0123456789abcdef" for c in digits)
        raise IdentityError(
            f"trust entry {text!r} is not a SHA-256 fingerprint: expected 64 hex digits "
            f"(optionally as ':'-separated byte pairs), found {count} hex digits in {digits!r}"
        )
    return FINGERPRINT_PREFIX + digits.replace(":", "")


def _fingerprint_of_file(text: str) -> str:
    path = Path(text).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = ""
        if _BARE_HEX_RE.fullmatch(text):
            hint = f"; did you mean 'sha256:{text}'?"
        raise IdentityError(
            f"trust entry {text!r} is neither 'sha256:<hex>' nor a readable certificate "
            f"file ({exc.strerror or exc}){hint}"
        ) from exc
    return fingerprint_of(_load_certificate(data, path))


def _load_certificate(data: bytes, path: Path) -> x509.Certificate:
    """Parse PEM (first certificate in the file) or DER; IdentityError names the file."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM or DER X.509 certificate ({exc})") from exc


class TrustStore:
    """The set of peer fingerprints this agent accepts; everything else is refused."""

    def __init__(self, fingerprints: Iterable[str]) -> None:
        fps = frozenset(fingerprints)
        bad = sorted(fp for fp in fps if not _FINGERPRINT_RE.fullmatch(fp))
        if bad:
            # Un-normalised entries would silently never match; refuse them loudly.
            raise IdentityError(f"not normalised fingerprints (use parse_trust): {bad}")
        self.fingerprints: frozenset[str] = fps

    @classmethod
    def from_specs(cls, specs: Iterable[str]) -> TrustStore:
        """Build from operator-supplied ``--trust`` values (see :func:`parse_trust`)."""
        return cls(parse_trust(spec) for spec in specs)

    def is_trusted_der(self, der: bytes | None) -> bool:
        """True only if the peer presented a certificate and it is pinned."""
        return der is not None and fingerprint_of_der(der) in self.fingerprints

    def is_trusted(self, cert: x509.Certificate | None) -> bool:
        return cert is not None and fingerprint_of(cert) in self.fingerprints

    def __len__(self) -> int:
        return len(self.fingerprints)

    def __repr__(self) -> str:
        return f"TrustStore({sorted(self.fingerprints)!r})"


# -- persistent identity ----------------------------------------------------------


def load_or_create_identity(state_dir: Path, *, common_name: str = "quelay-agent") -> Identity:
    """Load the identity in ``state_dir``, creating it on first use.

    Creation happens under a lock file and each file is published by an atomic
    rename, so concurrent starts agree on one key and a crash never leaves a
    half-written key behind. If a crash left a key without a certificate, a new
    certificate is issued for the existing key (nobody can have pinned it yet).
    """
    state_dir = Path(state_dir)
    _ensure_state_dir(state_dir)
    key_path, cert_path = state_dir / KEY_FILE, state_dir / CERT_FILE
    with _locked(state_dir / LOCK_FILE):
        _remove_stale_temps(state_dir)
        if not key_path.exists():
            if cert_path.exists():
                raise IdentityError(
                    f"{key_path}: missing, but {cert_path} exists; restore the key, or remove "
                    "the certificate to create a new identity (peers must then re-pin it)"
                )
            _write_private(key_path, _new_key_pem(), mode=0o600)
        key = _load_key(key_path)
        if not cert_path.exists():
            _write_private(cert_path, _new_cert_pem(key, common_name), mode=0o600)
        cert = _load_certificate(_read(cert_path), cert_path)
    _check_pair(key, key_path, cert, cert_path)
    _warn_if_exposed(key_path)
    return Identity(cert, key, fingerprint_of(cert), cert_path, key_path)


def _ensure_state_dir(state_dir: Path) -> None:
    if state_dir.is_dir():
        return
    try:
        state_dir.mkdir(parents=True, mode=0o700)
        os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        if not state_dir.is_dir():
            raise IdentityError(f"{state_dir}: exists and is not a directory") from None
    except OSError as exc:
        raise IdentityError(f"{state_dir}: cannot create state directory ({exc})") from exc


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise identity creation between processes sharing a state directory."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open lock file ({exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale_temps(state_dir: Path) -> None:
    """Delete temp files a crash left behind (we hold the lock, so none are live)."""
    for tmp in state_dir.glob(".identity.*.tmp"):
        tmp.unlink(missing_ok=True)


def _new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_cert_pem(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A self-signed leaf certificate; its fingerprint is the agent's identity."""
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name}-{secrets.token_hex(4)}")]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes, *, mode: int) -> None:
    """Write temp, fsync, rename, fsync the directory: the file is whole or absent."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IdentityError(f"{path}: cannot write ({exc})") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read ({exc})") from exc


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(
            f"{path}: not an unencrypted PEM private key ({exc}); restore it from a backup, "
            "or delete it and its certificate to create a new identity (peers must re-pin)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, TLS13_CURVES):
        raise IdentityError(f"{path}: need an ECDSA P-256/P-384/P-521 key for TLS 1.3")
    return key


def _check_pair(
    key: ec.EllipticCurvePrivateKey, key_path: Path, cert: x509.Certificate, cert_path: Path
) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise IdentityError(f"{cert_path}: certificate does not match the key in {key_path}")


def _warn_if_exposed(key_path: Path) -> None:
    mode = key_path.stat().st_mode
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); chmod 600 it", key_path, mode & 0o777)
