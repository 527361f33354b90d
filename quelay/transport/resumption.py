"""TLS session tickets between two agents, and whose identity each one carries.

A resumed TLS 1.3 handshake (PSK with a fresh ECDHE share, never 0-RTT) skips the
certificates, so it saves their bytes and the work of signing and checking them. But
the agents pin identities, and a resumed handshake carries none. So every ticket is
stored with the identity that was *proven* on the connection that earned it (the
certificate and chain the peer showed, already checked against the pins):

* before the handshake, the ticket's identity is checked against the pins of *now*
  (a pin removed since the ticket was issued refuses the resumption);
* after it, both agents sign the connection's TLS binding with their identity key in
  their ``Hello`` (:func:`quelay.identity.sign_binding`), so a ticket alone -- copied,
  or kept by an agent whose pin was withdrawn -- does not admit anyone.

Tickets live in memory only: an agent restart costs one full handshake. Both stores are
bounded; tickets are reused until replaced (safe without early data, RFC 8446 §8), so a
dial attempt lost in an outage does not use up the next one's resumption.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from aioquic.tls import SessionTicket

MAX_ISSUED = 32  # tickets a listener remembers (one peer needs one at a time)
MAX_HELD = 8  # tickets a dialler holds, one per peer key


@dataclass(frozen=True)
class ProvenIdentity:
    """A peer's certificate (DER) and chain (DER each), as proven in a full handshake."""

    certificate: bytes
    chain: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Ticket:
    ticket: SessionTicket
    identity: ProvenIdentity


class TicketStore:
    """Tickets this agent issued (as a listener) and holds (as a dialler)."""

    def __init__(self) -> None:
        self._issued: OrderedDict[bytes, Ticket] = OrderedDict()
        self._held: OrderedDict[str, Ticket] = OrderedDict()
        self.issued_count = 0  # tickets handed to peers, ever
        self.held_count = 0  # tickets received from peers, ever

    # -- listener side -----------------------------------------------------------------

    def issued(self, ticket: SessionTicket, identity: ProvenIdentity) -> None:
        """We gave ``ticket`` to the peer that proved ``identity``."""
        self._issued[ticket.ticket] = Ticket(ticket, identity)
        self._issued.move_to_end(ticket.ticket)
        while len(self._issued) > MAX_ISSUED:
            self._issued.popitem(last=False)
        self.issued_count += 1

    def redeem(self, label: bytes) -> Ticket | None:
        """The ticket a client presents, if we issued it and it has not expired."""
        entry = self._issued.get(label)
        if entry is None:
            return None
        if not _valid(entry.ticket):
            del self._issued[label]
            return None
        return entry

    # -- dialler side ------------------------------------------------------------------

    def hold(self, key: str, ticket: SessionTicket, identity: ProvenIdentity) -> None:
        """The peer at ``key`` gave us ``ticket``; the newest replaces the one before."""
        self._held[key] = Ticket(ticket, identity)
        self._held.move_to_end(key)
        while len(self._held) > MAX_HELD:
            self._held.popitem(last=False)
        self.held_count += 1

    def held(self, key: str) -> Ticket | None:
        """A ticket to resume with at ``key`` (kept: a failed attempt may need it again)."""
        entry = self._held.get(key)
        if entry is not None and not _valid(entry.ticket):
            del self._held[key]
            return None
        return entry

    def forget(self, key: str) -> None:
        """Drop the ticket for ``key`` (its identity is no longer trusted)."""
        self._held.pop(key, None)

    def clear(self) -> None:
        """Our identity changed: tickets name the old one on both sides."""
        self._issued.clear()
        self._held.clear()

    def __len__(self) -> int:
        return len(self._issued) + len(self._held)


def _valid(ticket: SessionTicket) -> bool:
    return bool(ticket.is_valid)
