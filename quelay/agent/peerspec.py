"""Who an agent talks to: one named, pinned peer per link (a hub has several).

A single-peer agent (``--trust PIN`` / ``--peer HOST:PORT``) has one unnamed
link, whose name is ``""``; a hub names every peer (``--trust NAME=PIN``,
``--peer NAME=HOST:PORT``, ``--rate NAME=RATE`` or ``[[peers]]`` in the
config) and clients address them by name (``to`` / ``from``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..transport.udp import Address

#: A peer name: what operators type after ``--to``; also a label in logs and metrics.
PEER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def peer_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid peer name (``None`` if it is)."""
    if not isinstance(name, str):
        return "must be a string"
    if not PEER_NAME_RE.fullmatch(name):
        return (f"{name!r} is not a peer name: 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit")
    return None


def split_named(value: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` → (NAME, VALUE); anything else → (None, value).

    Only a valid peer name counts as a name, so a certificate path holding ``=``
    (``./certs/a=b.pem``) or a fingerprint stays whole.
    """
    name, sep, rest = value.partition("=")
    if sep and peer_name_problem(name) is None and not name.lower().startswith("sha256"):
        return name, rest
    return None, value


@dataclass
class PeerSpec:
    """One configured peer: its name, its pins, where to dial it (if we dial), its cap."""

    name: str
    trust: list[str] = field(default_factory=list)  # sha256:<hex> or certificate files
    address: Address | None = None  # dial it here; None: it dials us (needs --listen)
    rate: int | None = None  # this link's cap in bit/s; None: the agent's --rate; 0: none

    def __post_init__(self) -> None:
        problem = peer_name_problem(self.name)
        if problem is not None:
            raise ValueError(f"peer name {problem}")
        if self.rate is not None and self.rate < 0:
            raise ValueError(f"peer {self.name}: rate must be >= 0 bit/s (0 = uncapped)")
