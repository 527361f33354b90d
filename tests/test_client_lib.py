"""The Python client library: send, stream, incoming stream, events, rate, blocking wrapper."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from quelay.client import (
    AgentUnavailable,
    BlockingClient,
    ClientError,
    ClientUsageError,
    connect,
    open_client,
)

from .conftest import Pair, make_file, sha256_file, wait_for


async def test_send_file_and_wait(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "report.bin", 300_000, seed=1)
    async with connect(pair.b.control) as client:
        info = await client.send_file(src, priority=6, attrs={"kind": "report"})
        assert info["direction"] == "out" and info["kind"] == "file"
        assert info["priority"] == 6 and info["attrs"] == {"kind": "report"}
        updates: list[dict[str, Any]] = []
        final = await client.track(info["id"], updates.append, interval=0.01)
    assert final["state"] == "done" and final["bytes"] == 300_000
    assert final["sha256"] == sha256_file(src)
    assert all(u["state"] in ("pending", "active") for u in updates)
    assert sha256_file(pair.a.inbox / "report.bin") == sha256_file(src)


async def test_stream_to_incoming_stream(pair: Pair) -> None:
    payload = random.Random(2).randbytes(700_000)
    got: dict[str, Any] = {}

    async def reader() -> None:
        async with open_client(pair.a.control) as client, \
                await client.accept_incoming(name="telemetry") as incoming:
            got["data"] = await incoming.read_all()
            got["final"] = await incoming.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        async with open_client(pair.b.control) as client:
            async with await client.open_stream(name="telemetry", priority=5) as out:
                for i in range(0, len(payload), 50_000):
                    await out.send_all(payload[i : i + 50_000])
            assert out.sent == len(payload)
    assert out.result is not None and out.result["state"] == "done"
    assert out.result["bytes"] == len(payload)
    assert got["data"] == payload
    assert got["final"]["state"] == "done"
    assert got["final"]["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_incoming_iterator_yields_each_stream(pair: Pair) -> None:
    names: list[str] = []

    async def reader() -> None:
        async with open_client(pair.a.control) as client:
            async for incoming in client.incoming():
                async with incoming:
                    names.append((await incoming.read_all()).decode())
                if len(names) == 2:
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        async with open_client(pair.b.control) as client:
            for text in ("one", "two"):
                async with await client.open_stream(name=text) as out:
                    await out.send_all(text.encode())
    assert names == ["one", "two"]


async def test_a_failing_writer_cancels_instead_of_truncating(pair: Pair) -> None:
    """An exception inside ``async with open_stream`` must not look like a clean end."""
    async with open_client(pair.b.control) as client:
        with pytest.raises(RuntimeError, match="producer broke"):
            async with await client.open_stream(name="cut") as out:
                await out.send_all(b"half of it")
                raise RuntimeError("producer broke")
        final = await client.wait(out.id)
    assert final["state"] == "canceled"
    await wait_for(lambda: out.id in pair.a.agent.transfers
                   and pair.a.agent.transfers[out.id].terminal)
    assert pair.a.agent.transfers[out.id].state.value != "done"


async def test_events_iterator(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "ev.bin", 10_000)
    seen: list[str] = []
    async with open_client(pair.b.control) as client:
        await client.subscribe()
        info = await client.send_file(src)
        async for event in client.events():
            if event["data"].get("id") == info["id"]:
                seen.append(event["event"])
            if event["event"] == "transfer.done":
                break
    assert seen[0] == "transfer.started" and seen[-1] == "transfer.done"


async def test_status_rate_cancel_and_errors(pair: Pair, tmp_path: Path) -> None:
    async with open_client(pair.b.control) as client:
        await client.ping()
        status = await client.status()
        assert status["link"]["state"] == "up" and status["role"] == "dial"
        assert await client.identity() == pair.b.agent.identity.fingerprint
        try:
            assert await client.get_rate() == 0
        except ClientError as exc:
            if exc.code == "unknown_op":
                pytest.skip("this agent has no get_rate/set_rate yet")
            raise
        assert await client.set_rate("2Mbps") == 2_000_000
        assert await client.get_rate() == 2_000_000
        # The live connection sends datagrams cut to fill the new cap's window.
        session = pair.b.agent.default.session
        assert session is not None
        quic = session.conn.quic
        assert await client.set_rate("100kbps") == 100_000
        assert quic._max_datagram_size == pair.b.agent.default.gate.datagram_size == 1222
        assert await client.set_rate(0) == 0
        assert quic._max_datagram_size == pair.b.agent.config.max_datagram_size
        with pytest.raises(ValueError, match="did you mean 10Mbps"):
            await client.set_rate("10")  # refused before it reaches the agent

        out = await client.open_stream(name="to-cancel")
        await out.send_all(b"x")
        canceled = await client.cancel(out.id)
        assert canceled["state"] == "canceled"
        await out.aclose()
        with pytest.raises(ClientError) as err:
            await client.cancel(out.id)
        assert err.value.code == "conflict"
        with pytest.raises(ClientError) as err:
            await client.get("no-such-id")
        assert err.value.code == "not_found"
        with pytest.raises(ClientError) as err:
            await client.send_file(tmp_path / "missing.bin")
        assert err.value.code == "io_error"


async def test_no_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="no agent on control socket"):
        async with open_client(tmp_path / "none.sock"):
            pass


async def test_blocking_client(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "blocking.bin", 50_000, seed=3)
    payload = b"from a script\n" * 1000
    got: dict[str, Any] = {}

    def script_one_call_each() -> dict[str, Any]:
        c = BlockingClient(pair.b.control)
        assert c.status()["link"]["state"] == "up"
        with pytest.raises(ClientUsageError):
            c.open_stream(name="x")
        return c.send_file(src, wait=True)

    def script_with_connection() -> None:
        with BlockingClient(pair.b.control) as c:
            assert c.ls()
            with c.open_stream(name="script") as out:
                out.write(payload)
            got["result"] = out.result

    def script_reader() -> None:
        with BlockingClient(pair.a.control) as c, c.accept_incoming(name="script") as incoming:
            got["data"] = incoming.read_all()

    final = await trio.to_thread.run_sync(script_one_call_each)
    assert final["state"] == "done" and final["sha256"] == sha256_file(src)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, script_reader)
        nursery.start_soon(trio.to_thread.run_sync, script_with_connection)
    assert got["result"]["state"] == "done" and got["data"] == payload


async def test_blocking_events(pair: Pair, tmp_path: Path) -> None:
    src = make_file(tmp_path / "bev.bin", 5_000)

    def script() -> list[str]:
        names = []
        with BlockingClient(pair.b.control) as c:
            c.subscribe()
            c.send_file(src)
            for event in c.events():
                names.append(event["event"])
                if event["event"] == "transfer.done":
                    return names
        return names

    names = await trio.to_thread.run_sync(script)
    assert names[-1] == "transfer.done" and "transfer.started" in names


def test_blocking_client_without_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable):
        BlockingClient(tmp_path / "none.sock").status()
    with pytest.raises(AgentUnavailable), BlockingClient(tmp_path / "none.sock"):
        pass
