"""Where incoming files land, under names chosen by the (untrusted) peer.

Bytes are written to ``<inbox>/.quelay-partial/<transfer id>.part`` and only a
complete, verified file is given its final name. Publishing never overwrites:
if the name is taken the file becomes ``stem (1).ext``, ``stem (2).ext``, ...
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..core.names import MAX_DUPLICATES, UnsafeNameError, candidates, safe_name_untrusted
from ..errors import QuelayError

__all__ = ["Inbox", "InboxError", "UnsafeNameError", "safe_name_untrusted"]

PARTIAL_DIR = ".quelay-partial"
STAGING_SUFFIX = ".dir"
PARTIAL_SUFFIX = ".part"
_TRANSFER_ID_RE = re.compile(r"[0-9a-fA-F][0-9a-fA-F-]{0,63}")
# Errors from os.link meaning "this filesystem cannot hard-link here", not "name taken".
_NO_HARDLINK = frozenset(
    {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
)


def resolve_inside(root: str | Path, path: str | Path) -> str | None:
    """``path`` with every symlink resolved, if that lies strictly inside ``root``; else None.

    The one containment check for paths chosen by others (export names, journal
    rows, a peer's relative paths).
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        return None
    return real


class InboxError(QuelayError):
    """The local inbox directory cannot be used: the operator's (or the disk's) fault."""

    code = "inbox_error"


# -- inbox ------------------------------------------------------------------------


class Inbox:
    """An inbox directory plus its hidden partial directory on the same filesystem."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).absolute()
        self.partial_dir = self.directory / PARTIAL_DIR
        self.prepare()

    def prepare(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.partial_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise InboxError(f"inbox {self.directory}: cannot create it ({exc})") from exc
        if self.partial_dir.is_symlink() or not self.partial_dir.is_dir():
            raise InboxError(f"{self.partial_dir}: must be a real directory inside the inbox")
        if self.partial_dir.stat().st_dev != self.directory.stat().st_dev:
            raise InboxError(f"{self.partial_dir}: must be on the same filesystem as the inbox")
        for d in (self.directory, self.partial_dir):
            _probe_writable(d)

    def partial_path(self, transfer_id: str) -> Path:
        """Where the bytes of ``transfer_id`` accumulate until :meth:`finalize`."""
        if not isinstance(transfer_id, str) or not _TRANSFER_ID_RE.fullmatch(transfer_id):
            raise ValueError(f"transfer id {transfer_id!r} is not a UUID-like hex string")
        return self.partial_dir / f"{transfer_id}{PARTIAL_SUFFIX}"

    def finalize(self, partial: Path, name: str) -> Path:
        """Publish a complete partial as ``name`` (or a numbered variant); return the path.

        The partial is hard-linked to the final name: ``link`` fails if the name
        exists, so nothing is ever overwritten, and the file appears whole.
        Where hard links are unsupported the name is reserved with
        ``O_CREAT|O_EXCL`` and the partial renamed over that (empty) placeholder;
        a crash in between can leave an empty file, never a clobbered one.
        """
        safe = safe_name_untrusted(name)
        partial = self._own_partial(partial)
        try:
            _fsync_path(partial)
            final = self._publish(partial, safe)
            _fsync_path(self.directory)
            partial.unlink(missing_ok=True)  # already renamed away by the fallback
            _fsync_path(self.partial_dir)
        except OSError as exc:
            raise InboxError(f"inbox {self.directory}: cannot store {safe!r} ({exc})") from exc
        return final

    def discard(self, partial: Path) -> None:
        """Remove an unfinished partial; a missing one is fine, other failures are not."""
        partial = self._own_partial(partial)
        try:
            partial.unlink(missing_ok=True)
        except OSError as exc:
            raise InboxError(f"{partial}: cannot remove partial file ({exc})") from exc

    # -- directory transfers ---------------------------------------------------------

    def staging_dir(self, group_id: str) -> Path:
        """Where a directory transfer's tree is assembled, invisible until complete."""
        return self.partial_path(group_id).with_suffix(STAGING_SUFFIX)

    def create_staging(self, group_id: str, dirs: list[str]) -> Path:
        staging = self.staging_dir(group_id)
        staging.mkdir(mode=0o700, exist_ok=True)
        for rel in dirs:  # already validated: safe components only
            (staging / rel).mkdir(parents=True, exist_ok=True)
        return staging

    def place_member(self, partial: Path, group_id: str, rel: str, mode: int | None) -> Path:
        """Move a verified file of a directory transfer to its place in the staging tree."""
        partial = self._own_partial(partial)
        staging = self.staging_dir(group_id)
        target = staging / rel
        if resolve_inside(staging, rel) is None:
            raise ValueError(f"{rel!r} leaves the staging directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise InboxError(f"{rel!r} appears twice in the directory")
        _fsync_path(partial)
        os.rename(partial, target)
        os.chmod(target, (mode if mode is not None else 0o644) & 0o777)
        return target

    def publish_dir(self, group_id: str, name: str) -> Path:
        """Give a complete tree its name in the inbox (``name (1)`` if taken; never merged)."""
        safe = safe_name_untrusted(name)
        staging = self.staging_dir(group_id)
        for candidate in candidates(safe):
            target = self.directory / candidate
            try:
                os.mkdir(target, 0o700)  # reserve the name: fails if anything holds it
            except FileExistsError:
                continue
            os.rename(staging, target)  # onto our own empty reservation
            os.chmod(target, 0o755)
            _fsync_path(self.directory)
            return target
        raise InboxError(f"inbox {self.directory}: {safe!r} and {MAX_DUPLICATES} numbered "
                         "variants all exist")

    def remove_published(self, path: str) -> bool:
        """Delete a file or tree this inbox published (expiry); never anything else."""
        real = resolve_inside(self.directory, path)
        if real is None or os.path.dirname(real) == os.path.realpath(self.partial_dir) \
                or real == os.path.realpath(self.partial_dir):
            return False
        if os.path.isdir(real):
            shutil.rmtree(real)  # a directory transfer's tree
        elif os.path.isfile(real):
            os.unlink(real)
        else:
            return False
        return True

    def discard_staging(self, group_id: str) -> None:
        staging = self.staging_dir(group_id)
        if staging.exists():
            shutil.rmtree(staging)

    def stale_staging(self) -> list[Path]:
        """Staging trees left by an earlier life (directory transfers do not survive restarts)."""
        return [p for p in self.partial_dir.glob(f"*{STAGING_SUFFIX}") if p.is_dir()]

    def _own_partial(self, partial: Path) -> Path:
        """Refuse paths outside our partial dir: a caller bug must not delete user files."""
        partial = Path(partial).absolute()
        if partial.parent != self.partial_dir or partial.suffix != PARTIAL_SUFFIX:
            raise ValueError(f"{partial} is not a partial file of inbox {self.directory}")
        return partial

    def _publish(self, partial: Path, name: str) -> Path:
        use_link = True
        for candidate in candidates(name):
            target = self.directory / candidate
            if use_link:
                try:
                    os.link(partial, target)
                    return target
                except FileExistsError:
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_HARDLINK:
                        raise
                    use_link = False
            if _reserve_and_replace(partial, target):
                return target
        raise InboxError(
            f"inbox {self.directory}: {name!r} and {MAX_DUPLICATES} numbered variants all exist"
        )


def _reserve_and_replace(partial: Path, target: Path) -> bool:
    """Fallback publish: claim ``target`` exclusively, then rename the partial onto it."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    try:
        os.replace(partial, target)
    except OSError:
        target.unlink(missing_ok=True)  # give back the name we reserved, then report
        raise
    return True


def _fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory fsync makes a new entry durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _probe_writable(directory: Path) -> None:
    """Create and remove a file: ``os.access`` lies for root and read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".quelay-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InboxError(f"inbox {directory}: not writable ({exc})") from exc
