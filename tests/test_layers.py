"""The package layering: no import cycle between udamon's packages, and each package
imports only the ones below it.

    targets -> system -> intake -> probes -> primitives -> core -> record / schemes
            -> report -> cli

(a package may import any package to its left).  Imports inside ``if
TYPE_CHECKING:`` do not count; imports inside functions do (they run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "udamon"
ORDER = ["arrays", "errors", "units", "native", "targets", "system", "intake", "probes",
         "primitives", "core", "record", "schemes", "report", "reporter", "workloads", "cli"]


def _package(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # the bodies of `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "udamon" and len(parts) > 1:
                out.add(parts[1])
    return out


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        pkg = _package(path)
        if pkg in ("__init__", "__main__"):
            continue
        g.setdefault(pkg, set()).update(i for i in _imports(path) if i != pkg)
    return g


def test_no_import_cycle_between_packages():
    g = _graph()
    seen: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(n: str, path: list[str]) -> None:
        seen[n] = 1
        for m in sorted(g.get(n, ())):
            if seen.get(m) == 1:
                cycles.append(path[path.index(m):] + [m] if m in path else path + [m])
            elif m not in seen:
                visit(m, path + [m])
        seen[n] = 2

    for n in sorted(g):
        if n not in seen:
            visit(n, [n])
    assert not cycles, cycles


def test_packages_import_only_what_is_below_them():
    g = _graph()
    rank = {p: i for i, p in enumerate(ORDER)}
    unknown = sorted(set(g) - set(rank))
    assert not unknown, f"packages not in the layer order: {unknown}"
    upward = sorted((p, q) for p, deps in g.items() for q in deps if rank[q] > rank[p])
    assert not upward, f"imports of a higher layer: {upward}"


def test_cli_holds_no_orchestration():
    """cli/ turns arguments into library calls: a function there longer than ~40 lines
    is doing a library's work (the issue-14 bar)."""
    long = []
    for path in sorted((SRC / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 45:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
