"""The layout holds: no import cycles, and the sans-IO cores import no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import quelay

ROOT = Path(quelay.__file__).parent

#: Modules docs/architecture.md calls sans-IO (keep the two lists in step).
SANS_IO = [
    "quelay.core.codes", "quelay.core.datagrams", "quelay.core.feed", "quelay.core.messages",
    "quelay.core.share",
    "quelay.core.names",
    "quelay.core.peer", "quelay.core.transfer", "quelay.framing", "quelay.control.protocol",
    "quelay.transport.pacing", "quelay.transport.liveness", "quelay.transport.allotted",
    "quelay.linksim.impairment", "quelay.units", "quelay.errors", "quelay.rendezvous.protocol",
]
IO_MODULES = {"trio", "socket", "os", "sqlite3", "subprocess", "asyncio", "selectors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """Every module ``path`` imports at module level or inside functions (absolute names)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{alias.name}" for alias in node.names}
            known = subs & (modules or set())
            found.update(known if known else {target})  # "from . import x" imports x
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {i for i in _imports(path, set(modules)) if i in modules and i != name}
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    # Package __init__ modules re-export; an edge into a package means "its __init__".
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_sans_io_modules_import_no_io() -> None:
    for name in SANS_IO:
        path = ROOT.parent / (name.replace(".", "/") + ".py")
        bad = {i for i in _imports(path) if i.split(".")[0] in IO_MODULES}
        assert not bad, f"{name} is documented as sans-IO but imports {sorted(bad)}"


def test_architecture_doc_lists_the_same_sans_io_modules() -> None:
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in SANS_IO if f"`{name}`" not in doc]
    assert not missing, f"docs/architecture.md does not name {missing} as sans-IO"


def test_aioquic_internals_stay_in_quic_ext() -> None:
    """Only quic_ext and its short paths (fast_receive, fast_send) may touch them: the
    aioquic pin in pyproject.toml covers exactly those three."""
    for path in ROOT.rglob("*.py"):
        if path.name in ("quic_ext.py", "fast_receive.py", "fast_send.py"):
            continue
        text = path.read_text()
        for needle in ("._loss", "._cc", "._rtt_smoothed", "._spaces", "._cryptos",
                       "._network_paths", "._payload_received"):
            assert needle not in text, f"{path} reaches into aioquic internals ({needle})"
