"""The rendezvous tokens and pairing table, sans-IO: every refusal is counted and explicit."""

from __future__ import annotations

import pytest

from quelay.errors import ProtocolError
from quelay.rendezvous.protocol import (
    FLAG_PUNCH,
    AgentTokens,
    Kind,
    Punched,
    Refusal,
    Refused,
    Registered,
    RelayLimits,
    RelayTable,
    decode_untrusted,
    encode,
    is_rendezvous,
    verify_untrusted,
)

SECRET = b"s3cret-shared-by-both-sites"
WALL = 1_800_000_000.0
A, B, C = ("10.0.0.1", 4000), ("10.0.0.2", 5000), ("10.0.0.3", 6000)
FP_A, FP_B, FP_C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


def agent(fp: str, secret: bytes = SECRET, session: str = "site-pair") -> AgentTokens:
    return AgentTokens(secret, session, fp)


def refusal_of(table: RelayTable, out: list[tuple[bytes, tuple[str, int]]]) -> Refusal:
    assert len(out) == 1
    dgram = verify_untrusted(table.secret, out[0][0])
    assert dgram.kind is Kind.REFUSED
    return Refusal(dgram.body[0])


def paired() -> tuple[RelayTable, AgentTokens, AgentTokens]:
    table = RelayTable(SECRET)
    ta, tb = agent(FP_A), agent(FP_B)
    out = table.handle_untrusted(ta.register(WALL), A, 0.0, WALL)
    assert [dst for _, dst in out] == [A]
    out = table.handle_untrusted(tb.register(WALL), B, 0.1, WALL)
    # B hears A's address; A is told about B unsolicited, with "punch now".
    assert sorted(dst for _, dst in out) == [A, B]
    return table, ta, tb


def test_rendezvous_datagrams_have_the_quic_fixed_bit_clear() -> None:
    data = agent(FP_A).register(WALL)
    assert not data[0] & 0x40
    assert is_rendezvous(data)
    assert not is_rendezvous(bytes([0xC0, 0, 0, 0, 1]))  # QUIC long header
    assert not is_rendezvous(bytes([0x41, 1, 2]))  # QUIC short header


def test_pairing_tells_each_agent_the_others_observed_address() -> None:
    table = RelayTable(SECRET)
    ta, tb = agent(FP_A), agent(FP_B)
    [(reply, dst)] = table.handle_untrusted(ta.register(WALL), A, 0.0, WALL)
    ev = ta.receive_untrusted(reply, ("192.0.2.1", 7000), WALL)
    assert isinstance(ev, Registered) and ev.info.observed == A
    assert ev.info.peer_address is None and not ev.punch
    out = dict((dst, data) for data, dst in table.handle_untrusted(tb.register(WALL), B, 0, WALL))
    ev_b = tb.receive_untrusted(out[B], ("192.0.2.1", 7000), WALL)
    ev_a = ta.receive_untrusted(out[A], ("192.0.2.1", 7000), WALL)
    assert isinstance(ev_b, Registered) and ev_b.info.peer_address == A
    assert ev_b.info.peer_fingerprint == FP_A and ev_b.info.observed == B and ev_b.punch
    assert isinstance(ev_a, Registered) and ev_a.info.peer_address == B and ev_a.punch
    assert table.snapshot()["paired"] == 1


def test_relays_only_between_the_two_registered_addresses() -> None:
    table, _, _ = paired()
    assert table.relay(b"\xc0quic", A, 1.0, WALL) == (b"\xc0quic", B)
    assert table.relay(b"\x41quic", B, 1.0, WALL) == (b"\x41quic", A)
    assert table.counters.relayed_datagrams == 2 and table.counters.relayed_bytes == 10
    # An unknown source gets nothing relayed, only an "unregistered" refusal (rate-limited).
    quic = b"\x41" + bytes(99)
    data, dst = table.relay(quic, C, 1.0, WALL) or (b"", C)
    assert dst == C and refusal_of(table, [(data, dst)]) is Refusal.UNREGISTERED
    assert table.relay(quic, C, 1.5, WALL) is None  # once a second per address
    assert table.relay(b"\x41x", ("10.0.0.9", 1), 3.0, WALL) is None  # smaller than an answer
    assert table.counters.dropped_datagrams == 3


def test_unregistered_answers_have_a_global_budget() -> None:
    table = RelayTable(SECRET, RelayLimits(unsolicited_per_second=10.0))
    answers = sum(table.relay(b"\x41" + bytes(99), ("10.9.0.1", port), 0.0, WALL) is not None
                  for port in range(1, 101))
    assert answers == 10 and table.counters.dropped_datagrams == 100


def test_forged_token_is_refused_and_the_session_is_untouched() -> None:
    table, _, _ = paired()
    forged = agent(FP_A, secret=b"guessed").register(WALL)
    out = table.handle_untrusted(forged, C, 1.0, WALL)
    assert refusal_of(table, out) is Refusal.BAD_TOKEN
    # A tampered byte in a genuine token fails the same way.
    genuine = bytearray(agent(FP_A).register(WALL))
    genuine[5] ^= 1
    assert refusal_of(table, table.handle_untrusted(bytes(genuine), C, 1, WALL)) \
        is Refusal.BAD_TOKEN
    assert table.relay(b"\x41q", A, 1.0, WALL) == (b"\x41q", B)
    assert table.counters.refusals["bad_token"] == 2 and table.counters.moves == 0
    # The forger learns why, but cannot authenticate the answer.
    ev = agent(FP_A, secret=b"guessed").receive_untrusted(out[0][0], C, WALL)
    assert isinstance(ev, Refused) and ev.code is Refusal.BAD_TOKEN and not ev.authentic


def test_replayed_token_from_a_new_port_is_refused_and_does_not_move_the_session() -> None:
    table = RelayTable(SECRET)
    ta, tb = agent(FP_A), agent(FP_B)
    token = ta.register(WALL)
    table.handle_untrusted(token, A, 0.0, WALL)
    table.handle_untrusted(tb.register(WALL), B, 0.0, WALL)
    thief = ("10.0.0.1", 4999)  # same NAT, another port: the attack the issue names
    out = table.handle_untrusted(token, thief, 1.0, WALL + 1)
    assert refusal_of(table, out) is Refusal.REPLAYED
    assert table.relay(b"\x41q", B, 1.0, WALL) == (b"\x41q", A)  # still to A
    assert table.relay(b"\x41" + bytes(99), thief, 1.0, WALL)[1] == thief  # type: ignore[index]
    assert table.counters.moves == 0


def test_a_new_port_without_any_token_is_not_followed() -> None:
    table, _, _ = paired()
    new_port = ("10.0.0.1", 4001)
    reply = table.relay(b"\x41" + bytes(99), new_port, 1.0, WALL)
    assert reply is not None and reply[1] == new_port  # "unregistered", nothing relayed
    assert table.relay(b"\x41q", B, 1.0, WALL) == (b"\x41q", A)
    assert table.counters.relayed_datagrams == 1


def test_stale_and_future_tokens_are_refused() -> None:
    table, _, _ = paired()
    for skew in (-31.0, 31.0):
        token = agent(FP_A).register(WALL + skew)
        assert refusal_of(table, table.handle_untrusted(token, C, 1, WALL)) is Refusal.STALE
    assert table.counters.refusals["stale"] == 2


def test_a_third_agent_is_refused() -> None:
    table, _, _ = paired()
    out = table.handle_untrusted(agent(FP_C).register(WALL), C, 1.0, WALL)
    assert refusal_of(table, out) is Refusal.SESSION_FULL
    assert table.relay(b"\x41q", A, 1.0, WALL) == (b"\x41q", B)
    assert len(table.sessions["site-pair"].members) == 2


def test_a_valid_re_registration_moves_the_session() -> None:
    table, ta, _ = paired()
    moved = ("10.0.0.1", 4242)  # A's NAT mapping changed
    out = table.handle_untrusted(ta.register(WALL + 2), moved, 2.0, WALL + 2)
    assert sorted(dst for _, dst in out) == sorted([B, moved])  # B learns A's new address
    assert table.relay(b"\x41q", B, 2.0, WALL) == (b"\x41q", moved)
    assert table.relay(b"\x41q", moved, 2.0, WALL) == (b"\x41q", B)
    assert A not in table.by_address and table.counters.moves == 1


def test_idle_members_expire_and_the_table_is_bounded() -> None:
    table = RelayTable(SECRET, RelayLimits(max_sessions=2, session_timeout=10.0))
    for i, name in enumerate(("s1", "s2")):
        token = agent(FP_A, session=name).register(WALL)
        assert table.handle_untrusted(token, ("10.1.0.1", 100 + i), 0.0, WALL)
    out = table.handle_untrusted(agent(FP_A, session="s3").register(WALL), C, 1.0, WALL)
    assert refusal_of(table, out) is Refusal.TABLE_FULL
    assert table.expire(11.0) == 2 and not table.sessions
    out = table.handle_untrusted(agent(FP_A, session="s3").register(WALL), C, 12.0, WALL)
    assert verify_untrusted(SECRET, out[0][0]).kind is Kind.REGISTERED


def test_registrations_per_source_are_rate_limited() -> None:
    table = RelayTable(SECRET, RelayLimits(rate=1.0, burst=3.0))
    replies = [table.handle_untrusted(agent(FP_A).register(WALL), A, 0.0, WALL)
               for _ in range(5)]
    kinds = [verify_untrusted(SECRET, r[0][0]).kind for r in replies if r]
    # Told once that it is limited; the next refusal in the same second is silent.
    assert kinds == [Kind.REGISTERED] * 3 + [Kind.REFUSED] and replies[4] == []
    assert table.counters.refusals["rate_limited"] == 2
    # Another source is not affected; the limited one recovers with time.
    assert verify_untrusted(SECRET, table.handle_untrusted(
        agent(FP_B).register(WALL), B, 0.0, WALL)[0][0]).kind is Kind.REGISTERED
    assert verify_untrusted(SECRET, table.handle_untrusted(
        agent(FP_A).register(WALL), A, 1.5, WALL)[0][0]).kind is Kind.REGISTERED


def test_punch_request_makes_the_relay_tell_both() -> None:
    table, ta, _ = paired()
    out = table.handle_untrusted(ta.register(WALL, punch=True), A, 5.0, WALL)
    assert sorted(dst for _, dst in out) == [A, B]
    assert all(verify_untrusted(SECRET, d).flags & FLAG_PUNCH for d, _ in out)


def test_punches_are_authenticated() -> None:
    ta, tb = agent(FP_A), agent(FP_B)
    ev = tb.receive_untrusted(ta.punch(WALL, heard=True), A, WALL)
    assert ev == Punched(FP_A, A, True)
    assert tb.receive_untrusted(agent(FP_C, secret=b"x").punch(WALL, heard=True), C,
                                WALL) is None
    assert tb.receive_untrusted(agent(FP_A, session="other").punch(WALL, heard=False), A,
                                WALL) is None
    assert ta.receive_untrusted(ta.punch(WALL, heard=False), A, WALL) is None  # own echo


def test_relay_answers_must_be_authentic_and_for_us() -> None:
    table = RelayTable(b"another relay")
    ta = agent(FP_A)
    [(reply, _)] = table.handle_untrusted(
        encode(b"another relay", Kind.REGISTER, session="site-pair", fingerprint=FP_A,
               wall=WALL), A, 0.0, WALL)
    assert ta.receive_untrusted(reply, A, WALL) is None  # not signed with our secret


@pytest.mark.parametrize("junk", [b"", b"\x1d", b"\x1d\x01\x01\x00\x05ab", b"\x1d\x09" * 40,
                                  b"\x1d\x01\x02" + b"\x00" * 80])
def test_malformed_datagrams_raise_only_protocol_errors(junk: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_untrusted(junk)
    table = RelayTable(SECRET)
    if junk:
        out = table.handle_untrusted(junk, C, 0.0, WALL)
        assert refusal_of(table, out) in (Refusal.MALFORMED, Refusal.BAD_TOKEN)
    assert agent(FP_A).receive_untrusted(junk, C, WALL) is None
