"""Fault isolation through real agents: a fault costs its transfer, never the link or a byte.

Each test asserts counted facts (link-ups, final states, SHA-256, queued
bytes), never elapsed time.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.agent import Agent
from quelay.agent.agent import StateDirLocked
from quelay.client import ClientError, open_client
from quelay.control import server as control_server
from quelay.core import messages as wire
from quelay.core.transfer import State, Transfer
from quelay.framing import FrameDecoder, encode_frame
from quelay.transport.memory import MemoryNetwork

from .conftest import make_file, sha256_file, site_config, start_memory_pair, start_pair, wait_for

MiB = 1024 * 1024


async def _read_all(client: Any, name: str, into: dict[str, Any]) -> None:
    incoming = await client.accept_incoming(name=name)
    into["data"] = await incoming.read_all()
    into["final"] = await incoming.wait()


# -- 1. nothing is lost when an outage starts ------------------------------------------


async def test_transfers_opened_as_an_outage_begins_go_through(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(delay=0.005)  # mock time: the 3 s dead-link wait costs nothing
    a, b = await start_memory_pair(nursery, tmp_path, net)
    src = make_file(tmp_path / "early.bin", 300_000, seed=5)
    payload = random.Random(6).randbytes(200_000)
    got: dict[str, Any] = {}
    net.down = True  # the link dies; neither agent knows yet (dead-link bound: 3 s)
    async with open_client(b.config.control) as client, open_client(a.config.control) as rc:
        info = await client.send_file(src)
        async with trio.open_nursery() as inner:
            inner.start_soon(_read_all, rc, "early-stream", got)
            out = await client.open_stream(name="early-stream")
            await out.send_all(payload)
            await wait_for(lambda: b.link_state == "down" and a.link_state == "down")
            net.down = False
            final = await out.finish()
        file_final = await client.wait(info["id"])
    assert file_final["state"] == "done", file_final
    assert sha256_file(a.config.inbox / "early.bin") == sha256_file(src)
    assert final["state"] == "done", final
    assert got["data"] == payload and got["final"]["state"] == "done"


# -- 2. transfer faults stay in their transfer ------------------------------------------


async def test_oversized_attrs_refused_locally_at_once(pair: Any, tmp_path: Path) -> None:
    src = make_file(tmp_path / "x.bin", 10)
    async with open_client(pair.b.control) as client:
        with pytest.raises(ClientError) as err:
            await client.send_file(src, attrs={"big": "v" * 5000})
        assert err.value.code == "invalid_argument"
        with pytest.raises(ClientError) as err:
            await client.request("send_file", path=str(src), attrs={f"k{i}": "v" * 400
                                                                   for i in range(60)})
        assert err.value.code == "invalid_argument"
        with pytest.raises(ClientError) as err:
            await client.request("send_file", path=str(src), name="../../etc/passwd")
        assert err.value.code == "invalid_argument"
        assert (await client.wait((await client.send_file(src))["id"]))["state"] == "done"
    assert pair.b.agent.link_ups == 1


async def test_hostile_peer_messages_cost_only_their_transfer(pair: Any,
                                                              tmp_path: Path) -> None:
    a, b = pair.a.agent, pair.b.agent
    session_a, session_b = a.session, b.session
    # A peer open with attributes no client could have sent: refused, session kept.
    body = wire.encode_message(wire.Open(wire.new_transfer_id(), "file", 10, 4, "x", {}))
    body["attrs"] = {"k": "v" * 9000}
    session_b.conn.send_nowait(session_b.control_sid, encode_frame(body, wire.MAX_WIRE_FRAME))
    # Five thousand opens of a flood: bounded by max_incoming, the rest answered busy.
    src = make_file(tmp_path / "victim.bin", 2 * MiB, seed=2)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        await wait_for(lambda: a.transfers.get(info["id"]) is not None
                       and a.transfers[info["id"]].delivered > 0)
        # A forged ack beyond what was sent: that transfer fails at both ends ... (a
        # stream left open: a small file could be done before the forged ack lands)
        other = await client.open_stream(name="other")
        await other.send_all(b"o" * 1000)
        await wait_for(lambda: other.id in a.transfers)
        session_a.send(wire.Ack(other.id, 10 * MiB))
        forged = await client.wait(other.id)
        # ... and a decreasing ack on a finished transfer is harmless.
        done = await client.wait(info["id"])
    assert forged["state"] == "failed" and forged["error"]["code"] == "protocol_error"
    await wait_for(lambda: a.transfers[other.id].terminal)
    assert a.transfers[other.id].error_code == "protocol_error"
    assert done["state"] == "done" and sha256_file(a.config.inbox / "victim.bin") == \
        sha256_file(src)
    assert a.session is session_a and b.session is session_b  # the link never dropped
    assert a.link_ups == 1 and b.link_ups == 1


async def test_busy_receiver_holds_the_sender_back_without_losing(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    # Mock time: the sender's busy back-off (1 s, 2 s, ...) costs no wall time.
    a, b = await start_memory_pair(nursery, tmp_path, MemoryNetwork(delay=0.005),
                                   max_incoming=2)
    files = [make_file(tmp_path / f"f{i}.bin", 50_000, seed=i) for i in range(6)]
    async with open_client(b.config.control) as client:
        infos = [await client.send_file(f) for f in files]
        finals = [await client.wait(i["id"]) for i in infos]
    assert all(f["state"] == "done" for f in finals), finals
    for f in files:
        assert sha256_file(a.config.inbox / f.name) == sha256_file(f)
    assert any(t.busy_refusals for t in b.transfers)  # the bound was hit
    assert a.link_ups == 1


# -- 3. a full disk is back-pressure -------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.skip("needs root and tmpfs to make a small disk")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_inbox_stalls_then_completes(nursery: trio.Nursery, tmp_path: Path,
                                                small_disk: Path) -> None:
    pair = await start_pair(nursery, tmp_path, inbox=small_disk / "inbox",
                            min_free=1 * MiB, stall_timeout=600.0)
    a = pair.a.agent
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (5 * MiB))  # leaves about 3 MiB: below floor + file
    src = make_file(tmp_path / "big.bin", 3 * MiB, seed=9)
    stalls: list[dict[str, Any]] = []
    async with open_client(pair.b.control) as client, open_client(pair.a.control) as rc:
        await rc.request("subscribe")
        info = await client.send_file(src)
        await wait_for(lambda: (t := a.transfers.get(info["id"])) is not None
                       and t.stall is not None)
        got = await rc.get(info["id"])
        assert got["state"] == "stalled" and got["stall"]["reason"] == "no_space"
        stalls.append(got)
        filler.unlink()  # the operator frees space: it goes on by itself
        final = await client.wait(info["id"])
    assert final["state"] == "done", final
    assert sha256_file(small_disk / "inbox" / "big.bin") == sha256_file(src)
    assert a.link_ups == 1 and pair.b.agent.link_ups == 1


async def test_inbox_removed_at_run_time_is_recreated(pair: Any, tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(pair.a.inbox)
    src = make_file(tmp_path / "after.bin", 200_000, seed=4)
    async with open_client(pair.b.control) as client:
        final = await client.wait((await client.send_file(src))["id"])
    assert final["state"] == "done", final
    assert sha256_file(pair.a.inbox / "after.bin") == sha256_file(src)
    assert pair.a.agent.link_ups == 1


# -- 4. local clients cannot hurt the agent or each other ------------------------------------


async def test_client_that_never_reads_is_dropped(pair: Any, monkeypatch: Any) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(pair.a.control))
    requests = b"".join(encode_frame({"id": i, "op": "status"}) for i in range(4000))
    # Never read a reply; keep sending until the agent stops reading us.
    with trio.move_on_after(10):
        view = memoryview(requests)
        while view:
            try:
                sent = await sock.send(view)
            except (BrokenPipeError, ConnectionResetError):
                break
            view = view[sent:]
    # Another client is served meanwhile, and the agent holds no unbounded backlog.
    async with open_client(pair.a.control) as other:
        await other.ping()
        assert (await other.status())["link"]["state"] == "up"
    sock.close()


async def test_nul_path_and_nil_request_get_errors(pair: Any) -> None:
    async with open_client(pair.b.control) as client:
        with pytest.raises(ClientError) as err:
            await client.request("send_file", path="/tmp/a\x00b")
        assert err.value.code == "invalid_argument"
    stream = await trio.open_unix_socket(str(pair.b.control))
    await stream.send_all(encode_frame(None))
    decoder = FrameDecoder()
    with trio.fail_after(5):
        while (reply := decoder.next_frame_untrusted()) is None:
            decoder.feed(await stream.receive_some(65536))
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    await stream.aclose()


async def test_accept_incoming_claim_ends_with_its_client(pair: Any) -> None:
    async with open_client(pair.b.control) as sender:
        out = await sender.open_stream(name="claimed")
        await wait_for(lambda: any(t.name == "claimed" for t in pair.a.agent.transfers))
        async with open_client(pair.a.control) as first:
            info = await first.request("accept_incoming", name="claimed")  # claim, never attach
        # The first client left without attaching: the stream is claimable again.
        async with open_client(pair.a.control) as second:
            incoming = await second.accept_incoming(name="claimed")
            await out.send_all(b"hello")
            final = await out.finish()
            assert await incoming.read_all() == b"hello"
    assert info["id"] == incoming.id and final["state"] == "done"


# -- 5. any number of transfers ------------------------------------------------------------


async def test_listing_ten_thousand_transfers_is_paginated(pair: Any) -> None:
    book = pair.a.agent.book
    book.history = type(book.history)(max_count=100_000, max_age=1e9)  # no pruning meanwhile
    for i in range(10_000):
        t = Transfer(wire.new_transfer_id(), "in", "stream", f"s{i}", None, 4)
        t.fail("canceled", "test history", canceled=True)
        book.table.add(t)
    async with open_client(pair.a.control) as client:
        page = await client.ls_page(0, 500)
        assert len(page["transfers"]) == 500 and page["total"] == 10_000
        assert len(encode_frame(page, 16 * 64 * 1024)) < 16 * 64 * 1024
        everything = await client.ls()
        assert len(everything) == 10_000
        assert len({t["id"] for t in everything}) == 10_000
        # The cursor stays valid while transfers come and go between pages.
        first = await client.ls_page(0, 300)
        for t in list(book.table)[:50]:
            book.table.remove(t.id)
        book.table.add(Transfer(wire.new_transfer_id(), "in", "stream", "late", None, 4))
        second = await client.ls_page(first["next"], 300)
        seen = [t["id"] for t in first["transfers"] + second["transfers"]]
        assert len(seen) == len(set(seen)) == 600  # no duplicates, no gap
    book.history = type(book.history)(max_count=100, max_age=1e9)
    finished = sum(1 for t in book.table if t.terminal)
    assert book.prune() == finished - 100
    assert sum(1 for t in book.table if t.terminal) == 100


# -- 7. cancel is exact ----------------------------------------------------------------------


async def test_cancel_from_either_end_is_canceled_at_both(pair: Any) -> None:
    a, b = pair.a.agent, pair.b.agent
    for round_ in range(8):
        canceller = (b, a) if round_ % 2 == 0 else (a, b)
        async with open_client(b.config.control) as sender, \
                open_client(a.config.control) as receiver:
            out = await sender.open_stream(name=f"c{round_}")
            await out.send_all(b"x" * 100_000)
            incoming = await receiver.accept_incoming(name=f"c{round_}")
            tid = out.id
            await wait_for(lambda: (t := a.transfers.get(tid)) is not None  # noqa: B023
                           and t.delivered > 0)
            side = canceller[0]
            async with open_client(side.config.control) as c:
                await c.cancel(out.id)
            with trio.fail_after(10):
                sender_final = await sender.wait(out.id)
                receiver_final = await receiver.wait(out.id)
            await incoming.aclose()
            await out.aclose()
        assert sender_final["state"] == "canceled", sender_final
        assert receiver_final["state"] == "canceled", receiver_final
    assert a.link_ups == 1


async def test_idle_writer_gets_its_final_frame_at_once(pair: Any) -> None:
    async with open_client(pair.b.control) as client:
        out = await client.open_stream(name="idle")
        await out.send_all(b"abc")
        await client.cancel(out.id)
        # The writer never writes again: its connection still carries the verdict.
        decoder = FrameDecoder()
        with trio.fail_after(5):
            while (frame := decoder.next_frame_untrusted()) is None:
                data = await out._stream.receive_some(65536)
                assert data, "connection closed without a final frame"
                decoder.feed(data)
        assert frame["event"] == "transfer.canceled"


# -- 8. one agent per state directory; private files; a changing source --------------------


async def test_second_agent_on_a_state_dir_is_refused(pair: Any) -> None:
    cfg = pair.a.agent.config
    with pytest.raises(StateDirLocked):
        Agent(site_config(pair.a.root, listen=("127.0.0.1", 0), trust=list(cfg.trust),
                          control=pair.a.root / "other.sock"))
    for f in (cfg.state_dir).iterdir():
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


async def test_source_changed_while_sending_is_a_local_failure(
        nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    # The cap keeps the file in flight for 2.4 s of mock time.
    a, b = await start_memory_pair(nursery, tmp_path, MemoryNetwork(delay=0.005),
                                   rate=1_000_000)
    src = make_file(tmp_path / "moving.bin", 300_000, seed=8)
    async with open_client(b.config.control) as client:
        info = await client.send_file(src)
        await wait_for(lambda: b.transfers[info["id"]].sent > 0)
        assert b.transfers[info["id"]].sent < 300_000  # changed while in flight
        with open(src, "r+b") as f:
            f.write(b"changed")
        final = await client.wait(info["id"])
    assert final["state"] == "failed" and final["error"]["code"] == "source_changed"
    await wait_for(lambda: a.transfers[info["id"]].terminal)
    assert a.transfers[info["id"]].error_code == "source_changed"
    assert not any(p.name.startswith("moving") for p in a.config.inbox.iterdir())
    assert a.transfers[info["id"]].state is State.FAILED


def test_control_limits_are_bounded() -> None:
    assert control_server.MAX_UNSENT <= 1024 * 1024
    assert control_server.LISTEN_BACKLOG >= 256
