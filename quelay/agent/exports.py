"""Read-only exports: directories the peer may list and fetch files from.

Safe by construction: a requested name is a relative path resolved inside
its export root only — no absolute paths, no ``..``, no NUL, no symlink that
leads out of the root, only regular files (a FIFO or a device would block
or lie). Anything else is refused with a code the fetching side shows.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import QuelayError
from .inbox import resolve_inside

MAX_LISTED = 10_000  # files a listing walks per export (deep trees are cut, not crashed on)


class ExportError(QuelayError):
    """A fetch or listing the exporting side refuses; ``code`` travels to the fetcher."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    size: int
    mtime_ns: int
    inode: int


def parse_exports(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after its last component) → {name: absolute dir}."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = Path(spec).name, spec
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"export {spec!r}: the name must be one path component")
        root = Path(directory).expanduser().absolute()
        if not root.is_dir():
            raise ValueError(f"export {spec!r}: {root} is not a directory")
        if name in out:
            raise ValueError(f"export name {name!r} is used twice")
        out[name] = root
    return out


class Exports:
    def __init__(self, roots: dict[str, Path]) -> None:
        self.roots = roots

    def resolve_untrusted(self, export: str, name: str) -> ExportedFile:
        """The regular file ``name`` inside ``export``, or :class:`ExportError`."""
        if not export and len(self.roots) > 1 and "/" in name:
            export, name = name.split("/", 1)  # EXPORT/PATH names the export itself
        root = self.roots.get(export) if export else None
        if root is None and not export and len(self.roots) == 1:
            root = next(iter(self.roots.values()))
        if root is None:
            raise ExportError("not_found", f"no export named {export!r}" if export
                              else "name the export (several are offered)")
        rel = PurePosixPath(name)
        if not name or "\x00" in name or rel.is_absolute() or any(
                part in ("..", "") for part in name.split("/")):
            raise ExportError("refused", f"{name!r} is not a relative path inside the export")
        target = resolve_inside(root, os.path.join(*rel.parts))
        if target is None:
            raise ExportError("refused", f"{name!r} leads outside the export")
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise ExportError("not_found", f"{name!r} does not exist in the export") from None
        except OSError as exc:
            raise ExportError("io_error", f"{name!r}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ExportError("refused", f"{name!r} is not a regular file")
        if not os.access(target, os.R_OK):
            raise ExportError("io_error", f"{name!r} is not readable by the agent")
        return ExportedFile(Path(target), st.st_size, st.st_mtime_ns, st.st_ino)

    def listing(self) -> list[dict[str, object]]:
        """Every regular file under every export (sorted; symlinks out of a root skipped)."""
        out: list[dict[str, object]] = []
        for export, root in sorted(self.roots.items()):
            real_root = os.path.realpath(root)
            seen = 0
            for dirpath, dirnames, filenames in os.walk(real_root):
                dirnames.sort()
                for fname in sorted(filenames):
                    full = os.path.join(dirpath, fname)
                    real = resolve_inside(real_root, full)
                    if real is None:
                        continue
                    try:
                        st = os.stat(real)
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    out.append({"export": export,
                                "name": os.path.relpath(full, real_root).replace(os.sep, "/"),
                                "size": st.st_size, "mtime": st.st_mtime})
                    seen += 1
                    if seen >= MAX_LISTED:
                        break
                if seen >= MAX_LISTED:
                    break
        return out


MAX_TREE_FILES = 100_000  # files one directory transfer may hold (the receiver bounds it too)


class TreeError(QuelayError):
    """A directory that cannot be sent as one transfer (a local, operator-side problem)."""


@dataclass(frozen=True)
class TreeFile:
    rel: str  # relative path with "/" separators
    path: Path
    size: int
    mode: int
    mtime_ns: int
    inode: int


def walk_tree(root: Path) -> tuple[list[TreeFile], list[str]]:
    """Regular files and empty directories under ``root`` (sorted).

    Symbolic links inside the tree are refused (a link could point anywhere on
    the sending host, or nowhere at the receiver); so are FIFOs, sockets and
    devices. The receiver applies its own name rules to every path.
    """
    files: list[TreeFile] = []
    empty: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise TreeError(f"{os.path.join(dirpath, d)} is a symbolic link: "
                                "directory transfers carry regular files only")
        if not dirnames and not filenames and rel_dir != ".":
            empty.append(rel_dir.replace(os.sep, "/"))
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                raise TreeError(f"{full} is not a regular file (symbolic links, FIFOs and "
                                "devices are refused)")
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            files.append(TreeFile(rel, Path(full), st.st_size, stat.S_IMODE(st.st_mode),
                                  st.st_mtime_ns, st.st_ino))
            if len(files) > MAX_TREE_FILES:
                raise TreeError(f"{root} holds more than {MAX_TREE_FILES} files")
    return files, empty
