"""The inbox: peer-chosen names are vetted, and a finished file never overwrites another."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from pathlib import Path

import pytest

from quelay.agent.inbox import PARTIAL_DIR, Inbox, InboxError
from quelay.core.names import MAX_NAME_BYTES, UnsafeNameError, safe_name_untrusted
from quelay.errors import RemoteProtocolError

# -- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "report.pdf",
        "archive.tar.gz",
        ".hidden",
        "naïve café.txt",
        "日本語ファイル.bin",
        "a b c",
        "..hidden-ish",
        "CONSOLE.txt",  # only exact device stems are reserved
        "x" * MAX_NAME_BYTES,
    ],
)
def test_safe_names_pass_unchanged(name: str) -> None:
    assert safe_name_untrusted(name) == name


def test_name_is_nfc_normalised() -> None:
    assert safe_name_untrusted("cafe\u0301.txt") == "caf\u00e9.txt"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "empty"),
        (".", "directory"),
        ("..", "directory"),
        ("../etc/passwd", "separator"),
        ("/etc/passwd", "separator"),
        ("sub/file", "separator"),
        ("..\\..\\boot.ini", "separator"),
        ("C:\\Windows\\x", "separator"),
        ("evil\x00.txt", "control"),
        ("line\nbreak", "control"),
        ("tab\there", "control"),
        ("del\x7f", "control"),
        ("csi\x9b2J", "control"),
        ("gpj\u202eexe.txt", "bidirectional"),
        ("x" * (MAX_NAME_BYTES + 1), "255 bytes"),
        ("é" * 128, "255 bytes"),  # 128 characters, 256 bytes
        ("CON", "device"),
        ("con", "device"),
        ("nul.txt", "device"),
        ("Lpt9.tar.gz", "device"),
        ("COM1", "device"),
        ("aux .txt", "device"),
        (" leading", "whitespace"),
        ("trailing ", "whitespace"),
        ("trailing.", "dot"),
        ("...", "dot"),
    ],
)
def test_unsafe_names_rejected(name: str, reason: str) -> None:
    with pytest.raises(UnsafeNameError, match=reason):
        safe_name_untrusted(name)


@pytest.mark.parametrize("name", [None, 42, b"bytes.txt", ["a"]])
def test_non_string_names_rejected(name: object) -> None:
    with pytest.raises(UnsafeNameError, match="string"):
        safe_name_untrusted(name)


def test_lone_surrogate_rejected() -> None:
    with pytest.raises(UnsafeNameError, match="Unicode"):
        safe_name_untrusted("bad\udcff.txt")


def test_unsafe_name_is_the_peers_fault() -> None:
    with pytest.raises(RemoteProtocolError):
        safe_name_untrusted("../x")
    with pytest.raises(ValueError):
        safe_name_untrusted("../x")


# -- inbox ------------------------------------------------------------------------


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    return Inbox(tmp_path / "inbox")


def write_partial(inbox: Inbox, data: bytes) -> Path:
    partial = inbox.partial_path(str(uuid.uuid4()))
    partial.write_bytes(data)
    return partial


def test_directories_created_and_partial_dir_inside(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "deep" / "inbox")
    assert inbox.directory == tmp_path / "deep" / "inbox"
    assert inbox.directory.is_dir()
    partial = inbox.partial_path(str(uuid.uuid4()))
    assert partial.parent == inbox.directory / PARTIAL_DIR
    assert partial.parent.is_dir()
    assert partial.parent.stat().st_dev == inbox.directory.stat().st_dev
    assert list(inbox.directory.iterdir()) == [partial.parent]  # no probe files left


def test_existing_inbox_is_reused(tmp_path: Path) -> None:
    Inbox(tmp_path / "inbox")
    (tmp_path / "inbox" / "keep.txt").write_text("keep")
    Inbox(tmp_path / "inbox")
    assert (tmp_path / "inbox" / "keep.txt").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_inbox(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(InboxError, match="locked"):
            Inbox(locked / "inbox")
    finally:
        locked.chmod(0o700)


def test_inbox_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "inbox").write_text("not a dir")
    with pytest.raises(InboxError):
        Inbox(tmp_path / "inbox")


def test_partial_dir_symlink_refused(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "inbox" / PARTIAL_DIR).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InboxError, match="real directory"):
        Inbox(tmp_path / "inbox")


@pytest.mark.parametrize("tid", ["", "../x", "a/b", "xyz", "-abc", "a" * 65, "a.b"])
def test_partial_path_validates_transfer_id(inbox: Inbox, tid: str) -> None:
    with pytest.raises(ValueError):
        inbox.partial_path(tid)


def test_finalize_keeps_content_and_removes_partial(inbox: Inbox) -> None:
    data = os.urandom(100_000)
    partial = write_partial(inbox, data)
    final = inbox.finalize(partial, "data.bin")
    assert final == inbox.directory / "data.bin"
    assert final.read_bytes() == data
    assert not partial.exists()
    assert final.stat().st_nlink == 1


def test_finalize_numbers_a_taken_name(inbox: Inbox) -> None:
    (inbox.directory / "report.pdf").write_bytes(b"original")
    first = inbox.finalize(write_partial(inbox, b"one"), "report.pdf")
    second = inbox.finalize(write_partial(inbox, b"two"), "report.pdf")
    assert first.name == "report (1).pdf"
    assert second.name == "report (2).pdf"
    assert (inbox.directory / "report.pdf").read_bytes() == b"original"
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"


def test_finalize_numbers_names_without_extension_and_hidden(inbox: Inbox) -> None:
    for name in ("README", ".profile"):
        inbox.finalize(write_partial(inbox, b"a"), name)
        assert inbox.finalize(write_partial(inbox, b"b"), name).name == f"{name} (1)"


def test_numbered_long_name_stays_within_limit(inbox: Inbox) -> None:
    name = "é" * 120 + ".txt"  # 244 bytes
    inbox.finalize(write_partial(inbox, b"a"), name)
    final = inbox.finalize(write_partial(inbox, b"b"), name)
    assert final.name.endswith(" (1).txt")
    assert len(final.name.encode()) <= MAX_NAME_BYTES
    assert final.read_bytes() == b"b"


def test_finalize_does_not_overwrite_the_partial_dir(inbox: Inbox) -> None:
    final = inbox.finalize(write_partial(inbox, b"x"), PARTIAL_DIR)
    assert final.name == f"{PARTIAL_DIR} (1)"
    assert (inbox.directory / PARTIAL_DIR).is_dir()


def test_finalize_rechecks_the_name(inbox: Inbox) -> None:
    partial = write_partial(inbox, b"x")
    with pytest.raises(UnsafeNameError):
        inbox.finalize(partial, "../escape")
    assert partial.exists()
    assert not (inbox.directory.parent / "escape").exists()


def test_finalize_refuses_foreign_partials(inbox: Inbox, tmp_path: Path) -> None:
    outside = tmp_path / "precious.part"
    outside.write_bytes(b"keep")
    with pytest.raises(ValueError):
        inbox.finalize(outside, "x")
    with pytest.raises(ValueError):
        inbox.discard(outside)
    assert outside.read_bytes() == b"keep"


def test_finalize_gives_up_after_the_bound(inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quelay.core.names.MAX_DUPLICATES", 3)
    for name in ["f", "f (1)", "f (2)", "f (3)"]:
        (inbox.directory / name).write_text(name)
    partial = write_partial(inbox, b"x")
    with pytest.raises(InboxError, match="numbered variants"):
        inbox.finalize(partial, "f")
    assert partial.exists()


def finalize_concurrently(inbox: Inbox, count: int) -> list[Path]:
    payloads = [f"payload {i}".encode() * 1000 for i in range(count)]
    partials = [write_partial(inbox, p) for p in payloads]
    barrier = threading.Barrier(count)
    results: dict[int, Path] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = inbox.finalize(partials[i], "same.txt")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results.values())) == count
    for i, path in results.items():
        assert path.read_bytes() == payloads[i]
    return list(results.values())


def test_concurrent_finalize_same_name(inbox: Inbox) -> None:
    paths = finalize_concurrently(inbox, 2)
    assert {p.name for p in paths} == {"same.txt", "same (1).txt"}
    finalize_concurrently(inbox, 16)
    assert not list(inbox.partial_dir.iterdir())


@pytest.fixture
def no_hardlinks(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)


@pytest.mark.usefixtures("no_hardlinks")
def test_fallback_without_hardlinks_never_overwrites(inbox: Inbox) -> None:
    (inbox.directory / "a.txt").write_bytes(b"original")
    final = inbox.finalize(write_partial(inbox, b"new"), "a.txt")
    assert final.name == "a (1).txt" and final.read_bytes() == b"new"
    assert (inbox.directory / "a.txt").read_bytes() == b"original"
    finalize_concurrently(inbox, 8)
    assert not list(inbox.partial_dir.iterdir())


def test_other_link_errors_are_not_hidden(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    partial = write_partial(inbox, b"x")
    with pytest.raises(InboxError, match="No space"):
        inbox.finalize(partial, "x")
    assert partial.exists()
    assert not (inbox.directory / "x").exists()


def test_discard(inbox: Inbox) -> None:
    partial = write_partial(inbox, b"x")
    inbox.discard(partial)
    assert not partial.exists()
    inbox.discard(partial)  # already gone: fine


def test_discard_reports_real_errors(inbox: Inbox) -> None:
    partial = inbox.partial_path(str(uuid.uuid4()))
    partial.mkdir()  # unlink() on a directory fails with EISDIR
    with pytest.raises(InboxError):
        inbox.discard(partial)


def test_unwritable_inbox_reported_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("quelay.agent.inbox.tempfile.mkstemp", denied)
    with pytest.raises(InboxError, match="not writable"):
        Inbox(tmp_path / "inbox")
