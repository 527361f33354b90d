"""The per-packet paths of quic_ext (issue 12, item 4): a stream sender that keeps the
bytes it was given instead of copying them into one growing buffer, data events of one
stream handed out joined, and stream marks kept only while packets are built over a view."""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

from aioquic.quic import events
from aioquic.quic.packet_builder import QuicDeliveryState

from quelay.transport import quic_ext
from quelay.transport.quic_ext import MERGE_EVENT_BYTES, RobustStreamSender

from .test_recovery_sansio import CLIENT, SERVER, Link, Pair


def _frames(sender: RobustStreamSender, rng: random.Random, stream: bytes,
            sent: list[tuple[int, int, bool]]) -> None:
    """Take frames of random sizes until the sender has none; check each one's bytes."""
    while True:
        frame = sender.get_frame(rng.randint(1, 3000))
        if frame is None:
            return
        start, stop = frame.offset, frame.offset + len(frame.data)
        assert frame.data == stream[start:stop]
        assert isinstance(frame.data, bytes)
        sent.append((start, stop, frame.fin))


def test_sender_frames_are_the_written_bytes_through_losses_and_acks() -> None:
    rng = random.Random(7)
    for _round in range(20):
        sender = RobustStreamSender(stream_id=2, writable=True)
        stream = bytearray()
        sent: list[tuple[int, int, bool]] = []
        for _ in range(rng.randint(1, 40)):
            data = rng.randbytes(rng.choice([1, 5, 1300, 4000, 70_000]))
            kind = rng.choice([bytes, bytearray, memoryview])
            sender.write(kind(data))  # type: ignore[arg-type]
            stream += data
            _frames(sender, rng, bytes(stream), sent)
            # deliver some of what is in flight: acked, lost (sent again) or both
            rng.shuffle(sent)
            for start, stop, fin in sent[: rng.randint(0, len(sent))]:
                state = rng.choice([QuicDeliveryState.ACKED, QuicDeliveryState.LOST])
                sender.on_data_delivery(state, start, stop, fin)
                if state is QuicDeliveryState.ACKED:
                    sent.remove((start, stop, fin))
            _frames(sender, rng, bytes(stream), sent)
        sender.write(b"", end_stream=True)
        while True:  # everything in flight is acknowledged, the losses sent again
            _frames(sender, rng, bytes(stream), sent)
            if not sent:
                break
            start, stop, fin = sent.pop()
            sender.on_data_delivery(QuicDeliveryState.ACKED, start, stop, fin)
        assert sender.is_finished
        assert sender._buffer_start == len(stream)
        assert sender._chunks == []  # every chunk dropped once acknowledged


def test_sender_keeps_written_bytes_without_copying_them() -> None:
    sender = RobustStreamSender(stream_id=2, writable=True)
    block = b"q" * 65536
    sender.write(block)
    sender.write(block)
    assert sender._chunks is not None
    assert sender._chunks[0] is block and sender._chunks[1] is block
    frame = sender.get_frame(70_000)  # spans both chunks
    assert frame is not None and frame.data == block + block[:70_000 - 65536]
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 65536, False)
    # the first one is dropped (all of it acknowledged; the list is compacted later)
    assert sender._chunks[sender._head:] == [block] and sender._chunks[0] == b""
    sender.reset(5)
    assert sender._chunks == []  # a reset stream's bytes are never sent again


def test_sender_marks_a_stream_only_while_packets_are_built_over_a_view() -> None:
    activity = quic_ext.StreamActivity({})
    stream = object()
    activity._streams[4] = stream  # type: ignore[assignment]
    activity.mark_id(4)
    assert activity.busy == {}
    activity.viewing = True
    activity.mark_id(4)
    assert activity.busy == {4: stream}


def _batched(tmp: Path) -> tuple[Pair, list[int], dict[int, bytes]]:
    """A connected pair; the client sends two streams, the server takes its events only
    after whole batches of datagrams. Returns the pair, the data events' sizes and what
    each stream received."""
    pair = Pair(tmp, Link(rtt=0.01))
    pair.run(lambda: pair.server.handshake_done is not None
             and pair.client.handshake_done is not None, 10)
    client, server = pair.client.quic, pair.server.quic
    assert client is not None and server is not None
    rng = random.Random(3)
    payloads = {}
    offsets = {}
    for _ in range(2):
        sid = client.get_next_available_stream_id(is_unidirectional=True)
        payloads[sid] = rng.randbytes(300_000)
        client.send_stream_data(sid, payloads[sid][:1000])  # (the id is taken by a write)
        offsets[sid] = 1000
    sizes: list[int] = []
    got: dict[int, bytes] = {sid: b"" for sid in payloads}
    ended: set[int] = set()
    now = pair.now
    for _ in range(2000):
        now += 0.001
        for sid, payload in payloads.items():  # interleaved writes
            if offsets[sid] < len(payload):
                chunk = payload[offsets[sid]:offsets[sid] + 20_000]
                offsets[sid] += len(chunk)
                client.send_stream_data(sid, chunk, end_stream=offsets[sid] == len(payload))
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, CLIENT, now)
        while (event := server.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                sizes.append(len(event.data))
                assert event.stream_id not in ended
                got[event.stream_id] += event.data
                server.consume(event.stream_id, len(event.data))
                if event.end_stream:
                    ended.add(event.stream_id)
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER, now)
        if ended == set(payloads):
            break
    assert ended == set(payloads)
    return pair, sizes, {sid: got[sid] for sid in payloads} | {-1: b"".join(payloads.values())}


def test_data_events_of_a_batch_come_joined_in_order(tmp_path: Path) -> None:
    _pair, sizes, got = _batched(tmp_path)
    whole = got.pop(-1)
    assert b"".join(got.values()) == whole  # byte-exact, each stream in order
    packets = sum(len(d) for d in got.values()) / 1300
    assert len(sizes) < packets / 4  # joined: far fewer events than packets
    assert max(sizes) <= MERGE_EVENT_BYTES + 1350


def test_regroup_joins_each_streams_data_and_keeps_what_must_come_after_it() -> None:
    def data(sid: int, payload: bytes, end: bool = False) -> events.StreamDataReceived:
        return events.StreamDataReceived(data=payload, end_stream=end, stream_id=sid)

    queue: deque[events.QuicEvent] = deque([
        data(2, b"a"), data(6, b"x"), data(2, b"b"), events.PingAcknowledged(uid=1),
        data(2, b"c"), events.StreamReset(error_code=1, stream_id=6), data(6, b"late"),
        data(10, b"1"), data(10, b"2", end=True), data(10, b"never joined after the end"),
    ])
    quic_ext._regroup(queue)
    assert list(queue) == [
        data(2, b"abc"), data(6, b"x"), events.PingAcknowledged(uid=1),
        events.StreamReset(error_code=1, stream_id=6), data(6, b"late"),
        data(10, b"12", end=True), data(10, b"never joined after the end"),
    ]
    big = deque([data(2, b"z" * 40_000) for _ in range(4)])
    quic_ext._regroup(big)
    assert [len(e.data) for e in big] == [80_000, 80_000]  # type: ignore[attr-defined]


def test_sender_finishes_when_the_data_is_acknowledged_after_its_fin() -> None:
    sender = RobustStreamSender(stream_id=2, writable=True)
    sender.write(b"d" * 2000, end_stream=True)
    first, last = sender.get_frame(1000), sender.get_frame(1000)
    assert first is not None and last is not None and last.fin
    sender.on_data_delivery(QuicDeliveryState.ACKED, 1000, 2000, True)
    assert not sender.is_finished
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 1000, False)  # in order now
    assert sender.is_finished and sender._buffer_start == 2000


def test_unsent_total_is_the_sum_over_the_streams_through_writes_frames_and_resets(
        tmp_path: Path) -> None:
    pair = Pair(tmp_path, Link(rtt=0.01))
    pair.run(lambda: pair.server.handshake_done is not None
             and pair.client.handshake_done is not None, 10)
    quic = pair.client.quic
    assert quic is not None
    rng = random.Random(11)

    def by_stream(excluded: set[int]) -> int:
        return sum(quic_ext._unsent(s) for sid, s in quic._streams.items()
                   if sid not in excluded and s.sender._reset_error_code is None)

    sids: list[int] = []
    now = pair.now
    for step in range(300):
        now += 0.001
        if len(sids) < 40 and rng.random() < 0.3:
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, rng.randbytes(rng.randint(1, 9000)))
            sids.append(sid)
        elif sids and rng.random() < 0.5:
            sid = rng.choice(sids)
            stream = quic._streams.get(sid)
            if stream is not None and stream.sender._reset_error_code is None \
                    and stream.sender._buffer_fin is None:
                if rng.random() < 0.1:
                    quic.reset_stream(sid, 1)
                else:
                    quic.send_stream_data(sid, rng.randbytes(rng.randint(0, 5000)),
                                          end_stream=rng.random() < 0.2)
        if step % 3 == 0:
            quic.datagrams_to_send(now)  # frames some of it (the peer never hears it)
        excluded = set(sids[:2])
        assert quic.unsent_except(excluded) == by_stream(excluded)
    assert quic.unsent_except(set()) > 0


def test_tail_copies_below_the_acknowledged_offset_are_forgotten() -> None:
    # A control stream: small messages, each copied once at the tail, then acknowledged.
    sender = RobustStreamSender(stream_id=0, writable=True)
    offset = 0
    for _ in range(500):
        sender.write(b"m" * 40)
        frame = sender.get_frame(1200)
        assert frame is not None
        assert sender.requeue(offset, offset + 40, False) == 40  # the tail copy
        copy = sender.get_frame(1200)
        assert copy is not None and copy.data == frame.data
        sender.on_data_delivery(QuicDeliveryState.ACKED, offset, offset + 40, False)
        sender.on_data_delivery(QuicDeliveryState.ACKED, offset, offset + 40, False)
        offset += 40
        assert sender._copied is not None and len(sender._copied) == 0
    assert len(sender.uncopied(0, offset)) == 0  # all acknowledged
