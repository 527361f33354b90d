"""A lean copy of aioquic's 1-RTT packet loop for a connection with nothing rare to send.

aioquic's ``_write_application`` asks, for every packet it builds, whether a
PATH_CHALLENGE, HANDSHAKE_DONE, PATH_RESPONSE, NEW_CONNECTION_ID (a loop over
every connection ID we issued), RETIRE_CONNECTION_ID (a list copy),
STREAMS_BLOCKED, PING, CRYPTO or DATAGRAM frame is due. Once the handshake is
over none of them is, nearly always, and no frame written while building
packets can make one due. :func:`write_bulk` checks them once per call and, if
none is pending, runs the same loop without them: ACK, connection and stream
limits, then the streams in aioquic's service order, exactly as aioquic would.
Otherwise it returns ``False`` having done nothing, and aioquic's own loop runs.
(Best-effort datagrams are handed to QUIC before a build, so a build with
datagrams to send is one of those.) Each non-empty packet is ended by
:func:`seal`: aioquic's end of a 1-RTT packet without its four copies of it.
:func:`write_bare_probe` builds the one packet of a probe into a long silence
(a PING, no stream bytes).

Like :mod:`.fast_receive`, it reads aioquic's private attributes (pinned to one
minor version in pyproject.toml).
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic.quic.connection import QuicPacketType, stream_is_client_initiated
from aioquic.quic.packet import PACKET_FIXED_BIT, PACKET_NUMBER_MAX_SIZE
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE

_ONE_RTT = tls.Epoch.ONE_RTT
_ONE_RTT_PACKET = QuicPacketType.ONE_RTT
_SAMPLE = 16  # header-protection sample


def write_bulk(conn: Any, builder: Any, network_path: Any, now: float) -> bool:
    """Build 1-RTT packets as aioquic's ``_write_application`` would, when no rare
    frame is due; ``False`` (nothing built) otherwise."""
    crypto = conn._cryptos[_ONE_RTT]
    if not (crypto.send.is_valid() and conn._handshake_complete) \
            or conn._quic_logger is not None:
        return False
    if (conn._handshake_done_pending or conn._ping_pending or conn._probe_pending
            or conn._datagrams_pending or conn._retire_connection_ids
            or conn._streams_blocked_pending or network_path.remote_challenges
            or not (network_path.is_validated or network_path.local_challenge_sent)
            or not conn._crypto_streams[_ONE_RTT].sender.buffer_is_empty):
        return False
    for connection_id in conn._host_cids:
        if not connection_id.was_sent:
            return False
    space = conn._spaces[_ONE_RTT]
    pacer = conn._loss._pacer
    streams = conn._streams
    write_ack = conn._write_ack_frame
    write_connection_limits = conn._write_connection_limits
    write_stream_limits = conn._write_stream_limits
    write_stream_frame = conn._write_stream_frame
    while True:
        # apply pacing, except if we have ACKs to send
        if space.ack_at is None or space.ack_at >= now:
            conn._pacing_at = pacer.next_send_time(now=now)
            if conn._pacing_at is not None:
                break
        builder.start_packet(_ONE_RTT_PACKET, crypto)
        if space.ack_at is not None and space.ack_at <= now:
            write_ack(builder=builder, space=space, now=now)
        write_connection_limits(builder=builder, space=space)
        for stream in streams.values():
            write_stream_limits(builder=builder, space=space, stream=stream)

        sent: set[Any] = set()
        discarded: set[Any] = set()
        try:
            for stream in conn._streams_queue:
                if stream.is_finished:
                    conn._logger.debug("Stream %d discarded", stream.stream_id)
                    streams.pop(stream.stream_id)
                    if stream_is_client_initiated(stream.stream_id) != conn._is_client:
                        conn._stream_limit(stream.stream_id).value += 1
                    discarded.add(stream)
                    continue
                if stream.receiver.stop_pending:
                    conn._write_stop_sending_frame(builder=builder, stream=stream)
                if stream.sender.reset_pending:
                    conn._write_reset_stream_frame(builder=builder, stream=stream)
                elif not stream.is_blocked and not stream.sender.buffer_is_empty:
                    used = write_stream_frame(
                        builder=builder, space=space, stream=stream,
                        max_offset=min(
                            stream.sender.highest_offset + conn._remote_max_data
                            - conn._remote_max_data_used,
                            stream.max_stream_data_remote))
                    conn._remote_max_data_used += used
                    if used > 0:
                        sent.add(stream)
        finally:
            # aioquic's new service order: served streams last, discarded ones gone
            if sent or discarded:
                conn._streams_queue = [s for s in conn._streams_queue
                                       if not (s in discarded or s in sent)]
                conn._streams_queue.extend(sent)

        if builder.packet_is_empty:
            if not discarded:
                break
        else:
            # aioquic ends a packet when the next one starts or the datagrams are
            # flushed; nothing in between reads it, so it is sealed here, leaner.
            seal(builder, crypto)
            pacer.update_after_send(now=now)
    return True


def write_bare_probe(conn: Any, builder: Any, now: float) -> None:
    """A probe into a long silence: one packet with a PING (and an ACK if one is due),
    no stream bytes — aioquic fills a probe's datagram with new data, which the outage
    eats and the return must send again. The first steps are :func:`write_bulk`'s for
    one packet; the next build is aioquic's (or :func:`write_bulk`'s) again."""
    space = conn._spaces[_ONE_RTT]
    if space.ack_at is None or space.ack_at >= now:
        conn._pacing_at = conn._loss._pacer.next_send_time(now=now)
        if conn._pacing_at is not None:
            return  # the probe stays pending
    crypto = conn._cryptos[_ONE_RTT]
    builder.start_packet(_ONE_RTT_PACKET, crypto)
    if space.ack_at is not None and space.ack_at <= now:
        conn._write_ack_frame(builder=builder, space=space, now=now)
    conn._write_ping_frame(builder, comment="probe")
    conn._probe_pending = False
    seal(builder, crypto)
    conn._loss._pacer.update_after_send(now=now)


def seal(builder: Any, crypto: Any) -> None:
    """aioquic's ``QuicPacketBuilder._end_packet`` for a non-empty 1-RTT packet, with
    the header written once and protected in place (aioquic writes it, copies the
    whole packet out, and copies it three more times to protect the header)."""
    if crypto._update_key_requested:
        builder._end_packet()  # the key update happens as this packet is encrypted
        return
    buf = builder._buffer
    start = builder._packet_start
    header_size = builder._header_size
    packet = builder._packet
    packet_size = buf.tell() - start
    # padding, so the header-protection sample is there (RFC 9001 §5.4.2)
    padding_size = PACKET_NUMBER_MAX_SIZE - PACKET_NUMBER_SEND_SIZE + header_size - packet_size
    if builder._datagram_needs_padding:
        if builder.remaining_flight_space > padding_size:
            padding_size = builder.remaining_flight_space
        builder._datagram_needs_padding = False
    if padding_size > 0:
        buf.push_bytes(bytes(padding_size))
        packet_size += padding_size
        packet.in_flight = True
    number = builder._packet_number
    first = (PACKET_FIXED_BIT | (builder._spin_bit << 5) | (crypto.key_phase << 2)
             | (PACKET_NUMBER_SEND_SIZE - 1))
    peer_cid = builder._peer_cid
    truncated = number & 0xFFFF
    header = bytes((first,)) + peer_cid + truncated.to_bytes(PACKET_NUMBER_SEND_SIZE, "big")
    send = crypto.send
    sealed = send.aead.encrypt(buf.data_slice(start + header_size, start + packet_size),
                               header, number)
    # header protection (RFC 9001 §5.4.1): the sample starts 4 bytes after the
    # packet number's first byte, i.e. 2 bytes into the sealed payload
    offset = PACKET_NUMBER_MAX_SIZE - PACKET_NUMBER_SEND_SIZE
    mask = send.hp._mask(sealed[offset:offset + _SAMPLE])
    buf.seek(start)
    buf.push_uint8(first ^ (mask[0] & 0x1F))
    buf.push_bytes(peer_cid)
    buf.push_uint16(truncated ^ int.from_bytes(mask[1:1 + PACKET_NUMBER_SEND_SIZE], "big"))
    buf.push_bytes(sealed)
    packet.sent_bytes = buf.tell() - start
    builder._packets.append(packet)
    if packet.in_flight:
        builder._datagram_flight_bytes += packet.sent_bytes
    builder._flush_current_datagram()  # a short-header packet ends its datagram
    builder._packet_number = number + 1
    builder._packet = None
    builder.quic_logger_frames = None
