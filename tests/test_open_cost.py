"""Opening a transfer costs the same with ten or ten thousand open (issue 15).

Counted, not timed: records stand in for transfers and count how often their
fields are read. Opening one more must not read the transfers already open —
not in the book's submit and ``fill`` (with or without ``max_concurrent``),
not in the table's indexes, not at the receiver's protocol and book. And a
claim of an incoming stream (``accept_incoming``) is woken by every arrival;
if it looked at every live transfer, each open at a receiver with a reader
waiting would cost what is already open (10,000 opens: 50 million looks).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import trio

from quelay.agent import Agent
from quelay.agent.book import TransferBook
from quelay.agent.events import EventHub
from quelay.agent.inbox import Inbox
from quelay.agent.journal import Journal
from quelay.client import open_client
from quelay.core import messages as m
from quelay.core.feed import Feed
from quelay.core.peer import Created, PeerProtocol
from quelay.core.transfer import State, Transfer, TransferTable
from quelay.transport.memory import MemoryNetwork

from .conftest import site_config

_IDS = itertools.count()


class _CountedField:
    """A field whose every read is counted in ``_Counted.reads``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: object, owner: type | None = None) -> bool:
        _Counted.reads += 1
        return getattr(obj, self.slot)  # type: ignore[no-any-return]

    def __set__(self, obj: object, value: bool) -> None:
        setattr(obj, self.slot, value)


class _Counted(Transfer):
    """A transfer that counts reads of ``claimed`` and ``attached`` (what a claim
    must look at in each record it considers)."""

    reads = 0
    claimed = _CountedField()  # type: ignore[assignment]
    attached = _CountedField()  # type: ignore[assignment]


class _Read(Transfer):
    """A transfer that counts every read of its fields."""

    reads = 0

    def __getattribute__(self, name: str) -> object:
        _Read.reads += 1
        return super().__getattribute__(name)


class _Link:
    """A session that is up, as far as the book can tell (announces through the
    peer protocol, as a session does)."""

    ready = True

    def __init__(self, table: TransferTable) -> None:
        self.protocol = PeerProtocol(table)

    def transfer_started(self, t: Transfer) -> None:
        self.protocol.announce(t)

    def transfer_ended(self, t: Transfer) -> None:
        raise AssertionError("nothing ends here")

    def fetch_requested(self, t: Transfer) -> None:
        raise AssertionError("nothing is fetched here")

    async def list_remote(self) -> list[dict[str, object]]:
        raise AssertionError("nothing is listed here")


def _book(root: Path, *, up: bool, max_concurrent: int = 0) -> TransferBook:
    root.mkdir(parents=True)
    book = TransferBook(journal=Journal(root / "journal.db"), events=EventHub(),
                        inbox=Inbox(root / "inbox"), feed=Feed(), max_concurrent=max_concurrent,
                        clock=lambda: 0.0)
    if up:
        book.links[""] = _Link(book.table)  # type: ignore[assignment]
    return book


def _reads_of_one_more_open(root: Path, open_before: int, **kw: object) -> int:
    """Reads of the transfers already submitted while one more is submitted."""
    book = _book(root, **kw)  # type: ignore[arg-type]
    for i in range(open_before):
        book.submit(_Read(f"o{i}", "out", "stream", f"s{i}", None, i % 16))
    before = _Read.reads
    book.submit(Transfer("new", "out", "stream", "new", None, 4))
    return _Read.reads - before


def test_submitting_one_more_reads_none_of_the_transfers_already_open(tmp_path: Path) -> None:
    for open_before in (10, 3000):
        assert _reads_of_one_more_open(tmp_path / f"up{open_before}", open_before, up=True) == 0
        # A limit above what is open: how many are active per link is kept, not counted.
        assert _reads_of_one_more_open(tmp_path / f"lim{open_before}", open_before, up=True,
                                       max_concurrent=open_before + 10) == 0


def test_queueing_one_more_reads_the_head_of_the_queue_only(tmp_path: Path) -> None:
    """The link is down: the new transfer queues, and queue.status names the first 100."""
    few = _reads_of_one_more_open(tmp_path / "few", 200, up=False)
    many = _reads_of_one_more_open(tmp_path / "many", 5000, up=False)
    assert few == many > 0


def test_receiving_one_more_open_reads_none_of_the_transfers_already_open(
        tmp_path: Path) -> None:
    for open_before in (10, 3000):
        book = _book(tmp_path / f"in{open_before}", up=False)
        protocol = PeerProtocol(book.table, max_incoming=open_before + 1)
        for i in range(open_before):
            t = _Read(f"i{i}", "in", "stream", f"s{i}", None, 4)
            t.move_to(State.ACTIVE)
            book.table.add(t)
            book.add_incoming(t)
        before = _Read.reads
        actions = protocol.receive(m.Open("new", "stream", None, 4, "new"))
        created = [a for a in actions if isinstance(a, Created)]
        assert len(created) == 1
        book.add_incoming(created[0].transfer)
        assert _Read.reads - before == 0
        assert book.table.live_incoming() == open_before + 1


def _incoming(name: str) -> _Counted:
    t = _Counted(f"c{next(_IDS)}", "in", "stream", name, None, 4)
    t.move_to(State.ACTIVE)  # (as the protocol adds an incoming stream)
    return t


def _takes(t: Transfer) -> bool:
    return not t.claimed and not t.terminal


def _claims(table: TransferTable, arrivals: int) -> list[int]:
    """Reads per claim while ``arrivals`` streams arrive one by one, each claimed and
    attached by a reader before the next arrives."""
    costs = []
    for i in range(arrivals):
        t = _incoming(f"new{i}")
        table.add(t)
        before = _Counted.reads
        assert table.first_unattached_stream(_takes) is t
        costs.append(_Counted.reads - before)
        t.claimed = t.attached = True
    return costs


def test_a_claim_looks_at_what_waits_for_a_reader_not_at_what_is_open() -> None:
    costs = {}
    for open_before in (10, 10_000):
        table = TransferTable()
        for i in range(open_before):  # open and read: each has its reader
            t = _incoming(f"old{i}")
            table.add(t)
            t.claimed = t.attached = True
        first, *rest = _claims(table, 200)
        # The first claim meets the attached streams once (and drops them)...
        assert open_before <= first <= 2 * open_before + 2
        costs[open_before] = rest
    # ...then each claim reads the previous (now attached) stream and the new one.
    assert costs[10] == costs[10_000] == [3] * 199


def test_a_claim_still_finds_a_stream_whose_claim_was_given_back() -> None:
    """Claimed, never attached, claim released (its control connection left): it is
    offered again, oldest first, and a stream that ended is not."""
    table = TransferTable()
    a, b, c = _incoming("a"), _incoming("b"), _incoming("c")
    for t in (a, b, c):
        table.add(t)
    assert table.first_unattached_stream(_takes) is a
    a.claimed = True
    assert table.first_unattached_stream(_takes) is b
    b.claimed = b.attached = True
    a.claimed = False  # (TransferBook.unclaim)
    assert table.first_unattached_stream(_takes) is a
    a.fail("canceled", "gone", canceled=True)
    assert table.first_unattached_stream(_takes) is c
    table.remove(c.id)
    assert table.first_unattached_stream(_takes) is None


async def test_accept_incoming_over_the_control_socket_costs_the_same_with_many_open(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """The control server's claim goes through the index: the reads per
    ``accept_incoming`` do not grow with the incoming streams already open and read."""
    net = MemoryNetwork()
    nursery.start_soon(net.run)
    agent = Agent(site_config(tmp_path / "a", peer=("10.0.0.9", 4433), trust=[]),
                  socket_factory=net.socket)
    await nursery.start(agent.run)
    book = agent.book

    def arrive(name: str) -> _Counted:
        t = _incoming(name)
        book.table.add(t)
        book.add_incoming(t)
        return t

    async def claim_arrivals(count: int) -> list[int]:
        costs = []
        for i in range(count):
            t = arrive(f"new{i}")
            before = _Counted.reads
            assert (await client.request("accept_incoming"))["id"] == t.id
            costs.append(_Counted.reads - before)
            t.attached = True  # (its reader attached)
        return costs

    async with open_client(agent.config.control) as client:
        few = await claim_arrivals(20)
        for i in range(5000):
            arrive(f"old{i}").claimed = True
        for t in book.table.live("in"):
            t.attached = True
        many = await claim_arrivals(20)
    assert few[1:] == many[1:]
    assert max(many[1:]) <= 5
