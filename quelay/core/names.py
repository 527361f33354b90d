"""Names a peer proposes for incoming files, and whether we will create them.

Pure string rules (no filesystem access), shared by the peer protocol (which
refuses an unsafe name at ``open``) and the inbox (which checks again when it
publishes).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import PurePosixPath

from ..errors import RemoteProtocolError

MAX_NAME_BYTES = 255  # NAME_MAX on Linux filesystems
MAX_DUPLICATES = 1000  # "name (1000).ext" is plenty; beyond that something is wrong

_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]
)
# Bidirectional controls can make "gpj.exe" display as "exe.jpg".
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


class UnsafeNameError(RemoteProtocolError, ValueError):
    """The peer proposed a file name we will not create: the peer's fault."""

    code = "unsafe_name"


# -- names ------------------------------------------------------------------------


def safe_name_untrusted(name: object) -> str:
    """Return ``name`` (NFC-normalised) if it is a safe single path component, else raise.

    Rules are for POSIX filesystems plus Windows device names, so a received
    file can be copied onward without surprises.
    """
    if not isinstance(name, str):
        raise UnsafeNameError(f"file name must be a string, not {type(name).__name__}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafeNameError("file name is not valid Unicode (lone surrogate)") from exc
    name = unicodedata.normalize("NFC", name)
    problem = _name_problem(name, len(encoded))
    if problem is not None:
        raise UnsafeNameError(f"unsafe file name {name[:80]!r}: {problem}")
    return name


def _name_problem(name: str, nbytes: int) -> str | None:
    """Why ``name`` is unsafe, or None; one reason per check keeps messages exact."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it refers to a directory"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if any(_is_control(c) for c in name):
        return "it contains a control character"
    if any(c in _BIDI_CONTROLS for c in name):
        return "it contains a bidirectional text control"
    if max(nbytes, len(name.encode("utf-8"))) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes in UTF-8"
    if name[0].isspace() or name[-1].isspace():
        return "it starts or ends with whitespace"
    if name.endswith("."):
        return "it ends with a dot"
    if name.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        return "it is a Windows device name"
    return None


def _is_control(c: str) -> bool:
    code = ord(c)
    return code < 0x20 or 0x7F <= code <= 0x9F  # C0, DEL and C1 (e.g. CSI 0x9b)


def _numbered(name: str, n: int) -> str:
    """``"report (n).pdf"``, shortening the stem if needed to stay within NAME_MAX."""
    path = PurePosixPath(name)
    stem, ext = path.stem, path.suffix
    tag = f" ({n})"
    budget = MAX_NAME_BYTES - len((tag + ext).encode("utf-8"))
    if budget < 1:  # an absurdly long "extension": number the whole name instead
        stem, ext = name, ""
        budget = MAX_NAME_BYTES - len(tag.encode("utf-8"))
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
    return f"{stem}{tag}{ext}"


def candidates(name: str) -> Iterator[str]:
    yield name
    for n in range(1, MAX_DUPLICATES + 1):
        yield _numbered(name, n)




MAX_DEPTH = 32  # path components in a file of a directory transfer


def safe_relative_path_untrusted(path: object) -> str:
    """``a/b/c.txt`` if every component is a safe name (see ``safe_name_untrusted``)."""
    if not isinstance(path, str) or not path:
        raise UnsafeNameError("a path inside a directory transfer must be a non-empty string")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeNameError(f"path {path[:80]!r} is deeper than {MAX_DEPTH} levels")
    return "/".join(safe_name_untrusted(part) for part in parts)
