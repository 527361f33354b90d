"""Persistent agent identity (key + self-signed certificate) and fingerprint pinning.

Agents authenticate each other by *pinning*: each operator tells its agent the
SHA-256 fingerprint of the peer's certificate (``--trust sha256:...`` or a path
to the peer's certificate file). There is no CA, so the certificate is only a
container for the public key; what matters is that the key stays the same
across restarts, which is why it lives in the state directory and is created
exactly once, atomically.

Rotation without downtime (``quelay identity rotate`` / ``retire``): a new key
and self-signed certificate become the agent's identity, and the previous pair
is kept beside it with an *endorsement*: a certificate for the new public key
issued and signed by the previous key. During the overlap the agent presents
the new certificate followed by the endorsement and the previous certificate
(the TLS certificate chain). A peer trusts the connection if the new
fingerprint is pinned, or if the previous fingerprint is pinned and the
endorsement proves that its holder vouched for the new key
(:meth:`TrustStore.trusts_chain`). ``retire`` deletes the previous pair and the
endorsement: from then on only the new pin works.
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
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import QuelayError

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
CERT_FILE = "identity.crt"
LOCK_FILE = ".identity.lock"
PREVIOUS_KEY_FILE = "identity.previous.key"
PREVIOUS_CERT_FILE = "identity.previous.crt"
ENDORSEMENT_FILE = "identity.endorsement.crt"  # the new key, signed by the previous one
NEXT_KEY_FILE = "identity.next.key"  # a rotation in progress (rolled forward on load)
NEXT_CERT_FILE = "identity.next.crt"
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
    # During a rotation's overlap: the previous certificate and the endorsement of
    # the current key by the previous one (None otherwise).
    previous: x509.Certificate | None = None
    endorsement: x509.Certificate | None = None

    @property
    def previous_fingerprint(self) -> str | None:
        return fingerprint_of(self.previous) if self.previous is not None else None

    @property
    def chain(self) -> list[x509.Certificate]:
        """What follows our certificate in TLS: the endorsement, then the previous one."""
        if self.previous is None or self.endorsement is None:
            return []
        return [self.endorsement, self.previous]


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

    def trusts_chain(self, leaf_der: bytes | None,
                     chain: Iterable[x509.Certificate]) -> str | None:
        """The pinned fingerprint that admits this peer, or ``None``.

        The peer's own certificate (``leaf_der``, whose key the TLS handshake
        proved) admits it if pinned. Otherwise, during the peer's rotation, its
        chain may hold a pinned *previous* certificate and an endorsement: a
        certificate for the same public key as the leaf, issued by the previous
        certificate's subject and signed by its key.
        """
        if leaf_der is None:
            return None
        fp = fingerprint_of_der(leaf_der)
        if fp in self.fingerprints:
            return fp
        certs = list(chain)[:4]  # ours carry two; a longer chain is not worth parsing
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
        except ValueError:
            return None
        leaf_key = _spki(leaf)
        for previous in certs:
            previous_fp = fingerprint_of(previous)
            if previous_fp not in self.fingerprints:
                continue
            for endorsement in certs:
                if endorsement is previous or _spki(endorsement) != leaf_key:
                    continue
                if endorsement.issuer == previous.subject and _signed_by(endorsement, previous):
                    return previous_fp
        return None

    def __len__(self) -> int:
        return len(self.fingerprints)

    def __repr__(self) -> str:
        return f"TrustStore({sorted(self.fingerprints)!r})"


# -- identity proof on a resumed connection ------------------------------------------

_PROOF_CONTEXT = b"quelay resumed hello v1\0"


def _proof_message(binding: bytes, signer_is_client: bool) -> bytes:
    # The role is signed too: a listener cannot reflect a dialler's proof back at it.
    return _PROOF_CONTEXT + (b"client\0" if signer_is_client else b"server\0") + binding


def sign_binding(identity: Identity, binding: bytes, *, signer_is_client: bool) -> bytes:
    """Our identity key's signature over this connection's TLS binding."""
    return identity.private_key.sign(_proof_message(binding, signer_is_client),
                                     ec.ECDSA(hashes.SHA256()))


def verify_binding(certificate: bytes, proof: bytes, binding: bytes, *,
                   signer_is_client: bool) -> str | None:
    """``None`` if ``proof`` is the key of ``certificate`` (DER) signing ``binding``
    in the given role, else why not (the peer's fault)."""
    try:
        cert = x509.load_der_x509_certificate(certificate)
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        return f"identity proof: unreadable certificate ({exc})"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "identity proof: the certificate's key is not an elliptic-curve key"
    try:
        key.verify(proof, _proof_message(binding, signer_is_client), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "identity proof: the signature does not match this connection"
    return None


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes,
                   ec.ECDSA(cert.signature_hash_algorithm))
    except InvalidSignature:
        return False
    return True


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
        _finish_rotation(state_dir)
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
        previous, endorsement = _load_overlap(state_dir, cert)
    _check_pair(key, key_path, cert, cert_path)
    _warn_if_exposed(key_path)
    return Identity(cert, key, fingerprint_of(cert), cert_path, key_path, previous, endorsement)


def _load_overlap(state_dir: Path, cert: x509.Certificate
                  ) -> tuple[x509.Certificate | None, x509.Certificate | None]:
    """The previous certificate and the endorsement, if a rotation is not retired yet."""
    prev_path, end_path = state_dir / PREVIOUS_CERT_FILE, state_dir / ENDORSEMENT_FILE
    if not prev_path.exists() or not end_path.exists():
        return None, None
    previous = _load_certificate(_read(prev_path), prev_path)
    endorsement = _load_certificate(_read(end_path), end_path)
    if _spki(endorsement) != _spki(cert) or not _signed_by(endorsement, previous):
        raise IdentityError(f"{end_path}: does not endorse the current key with the previous "
                            f"one; run 'quelay identity retire' to end the overlap")
    return previous, endorsement


def rotate_identity(state_dir: Path, *, common_name: str = "quelay-agent") -> Identity:
    """Make a new key and certificate the identity, keeping the previous ones (overlap).

    Every file is written whole (temp, fsync, rename) before the current pair is
    replaced, and a rotation interrupted half way is finished at the next load.
    Refused while a previous rotation is not retired.
    """
    state_dir = Path(state_dir)
    current = load_or_create_identity(state_dir, common_name=common_name)
    with _locked(state_dir / LOCK_FILE):
        if (state_dir / PREVIOUS_CERT_FILE).exists() or (state_dir / PREVIOUS_KEY_FILE).exists():
            raise IdentityError(
                f"{state_dir}: a rotation is in its overlap already (previous identity "
                f"{current.previous_fingerprint}); retire it first: quelay identity retire")
        new_key_pem = _new_key_pem()
        new_key = serialization.load_pem_private_key(new_key_pem, password=None)
        assert isinstance(new_key, ec.EllipticCurvePrivateKey)
        new_cert_pem = _new_cert_pem(new_key, common_name)
        endorsement = _endorse(new_key, current)
        _write_private(state_dir / PREVIOUS_KEY_FILE, _read(current.key_path), mode=0o600)
        _write_private(state_dir / PREVIOUS_CERT_FILE, _read(current.cert_path), mode=0o600)
        _write_private(state_dir / ENDORSEMENT_FILE, endorsement, mode=0o600)
        _write_private(state_dir / NEXT_KEY_FILE, new_key_pem, mode=0o600)
        _write_private(state_dir / NEXT_CERT_FILE, new_cert_pem, mode=0o600)
        _finish_rotation(state_dir)
    rotated = load_or_create_identity(state_dir, common_name=common_name)
    log.info("identity rotated: %s -> %s (overlap until retired)", current.fingerprint,
             rotated.fingerprint, extra={"event": "identity.rotated",
                                         "previous": current.fingerprint,
                                         "fingerprint": rotated.fingerprint})
    return rotated


def retire_identity(state_dir: Path) -> str:
    """End the overlap: delete the previous key, certificate and endorsement.

    Returns the retired fingerprint. The endorsement goes first, so an agent
    (re)loading meanwhile stops presenting the previous identity.
    """
    state_dir = Path(state_dir)
    current = load_or_create_identity(state_dir)
    retired = current.previous_fingerprint
    if retired is None:
        raise IdentityError(f"{state_dir}: no previous identity to retire (no rotation)")
    with _locked(state_dir / LOCK_FILE):
        for name in (ENDORSEMENT_FILE, PREVIOUS_CERT_FILE, PREVIOUS_KEY_FILE):
            (state_dir / name).unlink(missing_ok=True)
        _fsync_dir(state_dir)
    log.info("identity %s retired; %s remains", retired, current.fingerprint,
             extra={"event": "identity.retired", "previous": retired,
                    "fingerprint": current.fingerprint})
    return retired


def _endorse(new_key: ec.EllipticCurvePrivateKey, current: Identity) -> bytes:
    """A certificate for ``new_key``'s public half, issued and signed by ``current``."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    "quelay identity endorsement")]))
        .issuer_name(current.certificate.subject)
        .public_key(new_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(current.private_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _finish_rotation(state_dir: Path) -> None:
    """Roll a rotation forward: the next pair replaces the current one (key, then cert)."""
    next_key, next_cert = state_dir / NEXT_KEY_FILE, state_dir / NEXT_CERT_FILE
    if not next_cert.exists():
        next_key.unlink(missing_ok=True)  # a crash before the certificate was written
        previous, current = state_dir / PREVIOUS_CERT_FILE, state_dir / CERT_FILE
        if previous.exists() and current.exists() and _read(previous) == _read(current):
            # ... so the rotation never happened: drop its half-made overlap files.
            for name in (ENDORSEMENT_FILE, PREVIOUS_CERT_FILE, PREVIOUS_KEY_FILE):
                (state_dir / name).unlink(missing_ok=True)
            _fsync_dir(state_dir)
        return
    if next_key.exists():
        os.replace(next_key, state_dir / KEY_FILE)
    os.replace(next_cert, state_dir / CERT_FILE)
    _fsync_dir(state_dir)


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
