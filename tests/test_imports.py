"""The import graph of ptp_cli, read from the source: every import statement (function-level and
TYPE_CHECKING ones included), so a cycle hidden behind a lazy import is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import ptp_cli

ROOT = Path(ptp_cli.__file__).parent
ACYCLIC = ("ptp_cli.pruning", "ptp_cli.models")  # packages that take part in no import cycle
ABOVE_MODELS = ("ptp_cli.engine", "ptp_cli.pruning", "ptp_cli.pipeline", "ptp_cli.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ptp_cli modules it imports (``from pkg import mod`` counts as importing pkg.mod)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = stack[stack.index(v):]
                del stack[stack.index(v):]
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_pruning_and_models_take_part_in_no_import_cycle():
    graph = import_graph()
    assert "ptp_cli.pruning.base" in graph and "ptp_cli.models.vit" in graph  # the walk did read the package
    assert [c for c in cycles(graph) if any(m.startswith(ACYCLIC) for m in c)] == []


def test_models_import_nothing_above_them():
    graph = import_graph()
    bad = {m: sorted(t for t in ts if t.startswith(ABOVE_MODELS)) for m, ts in graph.items() if m.startswith("ptp_cli.models")}
    assert {m: ts for m, ts in bad.items() if ts} == {}
