"""Mutual pinning: an untrusted peer is refused on both sides, a trusted one accepted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from quelay.client import open_client

from .conftest import make_file, start_pair, wait_for

STRANGER = "sha256:" + "ab" * 32


async def test_trusted_peers_connect(nursery: trio.Nursery, tmp_path: Path) -> None:
    pair = await start_pair(nursery, tmp_path)
    assert pair.a.agent.peer_fingerprint == pair.b.agent.identity.fingerprint
    assert pair.b.agent.peer_fingerprint == pair.a.agent.identity.fingerprint


@pytest.mark.parametrize("who_refuses", ["listener", "dialler"])
async def test_untrusted_peer_refused(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, who_refuses: str
) -> None:
    caplog.set_level(logging.INFO)
    kw = {"trust_a": [STRANGER]} if who_refuses == "listener" else {"trust_b": [STRANGER]}
    pair = await start_pair(nursery, tmp_path, wait_up=False, **kw)  # type: ignore[arg-type]
    src = make_file(tmp_path / "secret.bin", 5000)
    async with open_client(pair.b.control) as client:
        info = await client.send_file(src)

    refuser, refused = ("a", "b") if who_refuses == "listener" else ("b", "a")

    def refused_and_reported() -> bool:
        text = caplog.text
        refusal = f"{refuser}: refusing peer" in text and "not in the trust list" in text
        # The refused side hears why, from the reason carried by the connection close.
        heard = f"{refused}: connection with 127.0.0.1" in text and "ended: untrusted peer" in text
        return refusal and heard

    await wait_for(refused_and_reported)
    assert pair.a.agent.link_state != "up"
    assert pair.b.agent.link_state != "up"
    assert info["id"] not in pair.a.agent.transfers  # no byte moved
    assert pair.b.agent.transfers[info["id"]].state.value == "pending"
    assert not (pair.a.inbox / "secret.bin").exists()
