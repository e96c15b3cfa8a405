"""The package's shape: no import cycles, lower floors never import higher ones, small modules.

Read from the source with `ast` (no imports run), so it is fast and sees lazy imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "appliance"
MAX_LINES = 400

# (importer prefix, imported prefix): edges that would make a lower floor depend on a higher one.
FORBIDDEN = [
    ("appliance.engine", "appliance.backends."),  # the engine knows only the Backend protocol (backends.base)
    ("appliance.engine", "appliance.api"),
    ("appliance.backends", "appliance.api"),
    ("appliance.agent", "appliance.api"),
    ("appliance.memory", "appliance.api"),
    ("appliance.observability", "appliance.api"),
    ("appliance.api.protocol", "appliance.app"),
]
ALLOWED = {("appliance.engine", "appliance.backends.base")}


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports run no code
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("appliance")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("appliance"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p, top_level_only) if i in files and i != m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph(top_level_only=False)) == []


def test_lower_floors_never_import_higher_ones() -> None:
    bad = [
        (m, i)
        for m, imported in _graph(top_level_only=False).items()
        for i in imported
        for src, dst in FORBIDDEN
        if (m == src or m.startswith(src + "."))
        and (i.startswith(dst) or i == dst.rstrip("."))
        and not any(m.startswith(a) and i.startswith(b) for a, b in ALLOWED)
    ]
    assert bad == []


def test_modules_are_small_or_say_why() -> None:
    long = []
    for p in PKG.rglob("*.py"):
        lines = p.read_text().splitlines()
        if len(lines) > MAX_LINES and not any("Long because" in ln for ln in lines[:12]):
            long.append(f"{p.relative_to(PKG.parent)}: {len(lines)} lines")
    assert long == []


def test_no_environment_writes_at_run_time() -> None:
    """Settings and explicit arguments, not os.environ, carry configuration (child processes excepted)."""
    writers = []
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        for needle in ("os.environ[", "os.environ.setdefault(", "os.environ.update(", "os.putenv("):
            if needle in text and p.name != "embed_worker.py":  # that process sets its own offline flags
                writers.append(f"{p.relative_to(PKG.parent)}: {needle}")
    assert writers == []
