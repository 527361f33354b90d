"""A short path through aioquic's ``receive_datagram`` for a bulk transfer's packets.

aioquic's ``receive_datagram`` handles every packet shape (Initial, Retry,
version negotiation, migration, coalesced datagrams) and pays for that on
each of the ~75 000 packets of 100 MB: the header parsed into an object, a
copy of the packet for decryption and two more inside header-protection
removal, enum-keyed lookups, and a branch for each case that cannot happen
once the handshake is confirmed. On loopback that was a quarter of the
receiving agent's CPU (docs/performance.md, "Full path vs bare aioquic").

:func:`receive_one_rtt` takes only the common case — a 1-RTT short-header
datagram, on a connection whose handshake is confirmed, from the primary
path's address, to our current connection ID, in the current key phase —
and does for it exactly what aioquic does, in the same order, without the
rest. Anything else (including every error it would have to report) it
leaves untouched for aioquic, by returning ``False`` before changing any
state. Like :mod:`quelay.transport.quic_ext`, it reads aioquic's private
attributes, which is why the dependency is pinned to one minor version.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic._crypto import CryptoError
from aioquic.quic.connection import (
    END_STATES,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicErrorCode,
    QuicFrameType,
    QuicReceiveContext,
)
from aioquic.quic.packet import decode_packet_number
from aioquic.quic.recovery import MAX_ACK_RANGES

_ONE_RTT = tls.Epoch.ONE_RTT
_CONNECTED = QuicConnectionState.CONNECTED
_SAMPLE = 16  # header-protection sample (RFC 9001 §5.4.2)
_PN_MAX = 4  # the sample starts 4 bytes after the packet number's offset


class OneRttState:
    """What the short path needs from a confirmed connection, looked up once
    (the 1-RTT crypto pair and packet space live as long as the connection)."""

    __slots__ = ("crypto", "space", "zero_rtt")

    def __init__(self, conn: QuicConnection) -> None:
        self.crypto = conn._cryptos[_ONE_RTT]
        self.space = conn._spaces[_ONE_RTT]
        self.zero_rtt = conn._cryptos[tls.Epoch.ZERO_RTT].recv


def receive_one_rtt(conn: Any, state: OneRttState, data: bytes, addr: Any,
                    now: float) -> bool:
    """Handle ``data`` as aioquic would if it is an ordinary 1-RTT datagram and
    return ``True``; otherwise change nothing and return ``False``."""
    # -- checks: nothing below may change state before they all pass ------------------
    if (conn._state is not _CONNECTED or conn._close_pending
            or conn._quic_logger is not None or conn._close_at is None):
        return False
    first = data[0] if data else 0
    if first & 0xC0 != 0x40:  # a long header, or the fixed bit clear
        return False
    path = conn._network_paths[0]
    if path.addr != addr or not path.is_validated:
        return False
    host_cid = conn.host_cid
    pn_offset = 1 + len(host_cid)
    if data[1:pn_offset] != host_cid:
        return False
    if not conn._is_client and state.zero_rtt.is_valid():
        return False  # aioquic tears down the 0-RTT keys on the first 1-RTT packet
    recv = state.crypto.recv
    aead: Any = recv.aead  # aioquic's AEAD wrapper (it takes any buffer)
    hp: Any = recv.hp
    if aead is None or pn_offset + _PN_MAX + _SAMPLE > len(data):
        return False
    # Header protection (RFC 9001 §5.4): unmask the first byte and packet number.
    mask = hp._mask(data[pn_offset + _PN_MAX:pn_offset + _PN_MAX + _SAMPLE])
    first ^= mask[0] & 0x1F
    if (first & 4) >> 2 != recv.key_phase:
        return False  # a key update: aioquic's path derives the next keys
    pn_length = (first & 0x03) + 1
    header_end = pn_offset + pn_length
    truncated = (int.from_bytes(data[pn_offset:header_end], "big")
                 ^ int.from_bytes(mask[1:1 + pn_length], "big"))
    space = state.space
    packet_number = decode_packet_number(truncated, pn_length * 8,
                                         space.expected_packet_number)
    plain_header = (bytes((first,)) + data[1:pn_offset]
                    + truncated.to_bytes(pn_length, "big"))

    # -- from here on, aioquic's steps for a 1-RTT packet, in its order ---------------
    try:
        payload = aead.decrypt(memoryview(data)[header_end:], plain_header, packet_number)
    except CryptoError as exc:
        conn._logger.debug(exc)
        return True  # dropped, as aioquic drops it
    if packet_number in space.received_packets:
        return True  # a duplicate (RFC 9000 §12.3)
    if first & 0x18:
        conn.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                   frame_type=QuicFrameType.PADDING,
                   reason_phrase="Reserved bits must be zero")
        return True
    if packet_number > space.expected_packet_number:
        space.expected_packet_number = packet_number + 1
    if packet_number > conn._spin_highest_pn:
        spin = bool(first & 0x20)
        conn._spin_bit = not spin if conn._is_client else spin
        conn._spin_highest_pn = packet_number
    context = QuicReceiveContext(epoch=_ONE_RTT, host_cid=host_cid, network_path=path,
                                 quic_logger_frames=None, time=now, version=None)
    try:
        is_ack_eliciting, is_probing = conn._payload_received(
            context, payload, crypto_frame_required=False)
    except QuicConnectionError as exc:
        conn._logger.warning(exc)
        conn.close(error_code=exc.error_code, frame_type=exc.frame_type,
                   reason_phrase=exc.reason_phrase)
    if conn._state in END_STATES or conn._close_pending:
        return True
    conn._close_at = now + conn._idle_timeout()
    conn._ack_eliciting_sent_since_receipt = False
    paths = conn._network_paths
    if host_cid != conn.host_cid or not paths or paths[0] is not path:
        # A frame of this packet changed our connection ID or the paths: aioquic's
        # migration steps for it, which the checks above ruled out before the frames.
        _after_path_change(conn, context, path, space, is_probing, packet_number)
    if not space.discarded:
        if packet_number > space.largest_received_packet:
            space.largest_received_packet = packet_number
            space.largest_received_time = now
        space.ack_queue.add(packet_number)
        space.received_packets.add(packet_number)
        if len(space.ack_queue) > MAX_ACK_RANGES:
            space.ack_queue.shift()
        if is_ack_eliciting and space.ack_at is None:
            space.ack_at = now + conn._ack_delay
    return True


def _after_path_change(conn: Any, context: QuicReceiveContext, path: Any, space: Any,
                       is_probing: bool, packet_number: int) -> None:
    """aioquic's connection-ID and path steps after a packet's frames, for the rare
    packet whose frames changed them (same rules, same order)."""
    if not conn._is_client and not is_probing and context.host_cid != conn.host_cid:
        conn.host_cid = context.host_cid
        if path.peer_cid is None:
            conn.change_connection_id()
    if path not in conn._network_paths:
        conn._add_network_path(path)
    idx = conn._network_paths.index(path)
    if (not conn._is_client and idx and not is_probing
            and packet_number > space.largest_received_packet):
        conn._network_paths.pop(idx)
        conn._network_paths.insert(0, path)
        if path.peer_cid is not None:
            conn._use_reserved_peer_cid(path)
        if not path.is_validated:
            path.local_challenge_sent = False
            path.validation_deadline = None

