"""The shape of the package, read from its source: no import cycles, and the loading path free of builders."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ptp_cli

ROOT = Path(ptp_cli.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, package: str, known: dict[str, Path], *, top_level_only: bool) -> set[str]:
    """ptp_cli modules a module imports at run time (``if TYPE_CHECKING:`` blocks skipped), function bodies
    included unless ``top_level_only``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from ptp_cli import loading` imports the module ptp_cli.loading
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known}


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = _imports(tree, package, known, top_level_only=top_level_only) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done, stack = [], set(), []

    def walk(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):])
            return
        if node in done:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            walk(dep)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        walk(node)
    return cycles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        if (node := todo.pop()) not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def test_no_import_cycles() -> None:
    """Function-level imports count: a lazy import that closes a loop is still a loop."""
    cycles = _cycles(_graph(top_level_only=False))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_loading_path_never_imports_builders() -> None:
    graph = _graph(top_level_only=True)
    for start in ("ptp_cli.loading", "ptp_cli.run.pipeline"):
        assert not {m for m in _reachable(graph, start) if m.startswith("ptp_cli.builders")}, start
    assert not any(m.startswith(("ptp_cli.zoo", "ptp_cli.builders")) for m in _reachable(graph, "ptp_cli.loading"))
    # And at run time: importing the library and loading a checkpoint's config leaves the builders unloaded.
    code = (
        "import sys, ptp_cli.run.pipeline, ptp_cli.loading, ptp_cli.zoo\n"
        "print(sorted(m for m in sys.modules if m.startswith('ptp_cli.builders')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_entry_points_import_the_zoo() -> None:
    importers = {name for name, deps in _graph(top_level_only=False).items() if "ptp_cli.zoo" in deps}
    assert importers, "nothing resolves built-in names"
    # run_config: reading a run's model config (a built-in's too) before anything heavy, for pipeline and --check
    entry = ("ptp_cli.run.pipeline", "ptp_cli.run_config")
    assert all(m in entry or m.startswith(("ptp_cli.bench", "ptp_cli.cli")) for m in importers), importers


# (importer, forbidden): no module under the first imports one under the second, lazily or not.
LAYERS = [
    *(("ptp_cli.models", above) for above in ("ptp_cli.run.engine", "ptp_cli.pruning", "ptp_cli.run.pipeline",
                                                "ptp_cli.preprocess.inputs", "ptp_cli.loading", "ptp_cli.cli")),
    ("ptp_cli.pruning", "ptp_cli.run.engine"),
    ("ptp_cli.pruning", "ptp_cli.run.pipeline"),
    ("ptp_cli.run.engine", "ptp_cli.run.pipeline"),
    ("ptp_cli.run.engine", "ptp_cli.text.tokenization"),  # the engine works on token ids only
    ("ptp_cli.run.engine", "ptp_cli.preprocess.image"),
]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize(("importer", "forbidden"), LAYERS)
def test_layers_point_one_way(importer: str, forbidden: str) -> None:
    graph = _graph(top_level_only=False)
    offenders = sorted(f"{m} -> {d}" for m, deps in graph.items() if _under(m, importer)
                       for d in deps if _under(d, forbidden))
    assert offenders == []


def test_only_the_cli_imports_the_cli() -> None:
    graph = _graph(top_level_only=False)
    offenders = sorted(f"{m} -> {d}" for m, deps in graph.items() if not _under(m, "ptp_cli.cli")
                       for d in deps if _under(d, "ptp_cli.cli"))
    assert offenders == []


def test_no_module_is_too_long() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 450}
    assert long == {}


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert [sorted(c) for c in _cycles(graph)] == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_cli_starts_without_torch() -> None:
    """Usage errors are reported before torch loads (it costs over a second): the CLI imports it lazily."""
    code = "import sys, ptp_cli.cli.main\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.mark.parametrize("argv", [
    ["methods"], ["methods", "--json"],
    ["infer", "--check", str(SAMPLES / "questions.jsonl"), "--model", "tiny"],
    ["infer", "--check", str(SAMPLES / "questions.jsonl"), "--method", "fastv", "--preset", "ocr"],
], ids=["methods", "methods-json", "check-tiny", "check-default-model"])
def test_methods_and_check_run_without_torch(argv: list[str], ptp_home: Path) -> None:
    """The registry of methods, the settings, RunConfig and the input checks import no torch (nor does finding
    a built-in model already built, or reading a checkpoint's config), nor pyarrow on a JSONL input."""
    code = (
        "import sys\nfrom ptp_cli.cli.main import main\nsys.argv = ['ptp', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules or 'pyarrow' in sys.modules)\n"
    )
    env = {**os.environ, "PTP_HOME": str(ptp_home)}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    last = out.stdout.strip().splitlines()[-1]
    assert last in ("exit 0 False", "exit 3 False"), (last, out.stderr[-2000:])  # 3: the sample with no image
    if argv[0] == "infer":
        assert "no weights loaded" in out.stderr


def test_only_ptp_cli_ray_imports_ray() -> None:
    """Ray is an optional extra: without --ray nothing imports it."""
    importers = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(name)
    assert importers == {"ptp_cli.run.ray"}


def test_only_the_table_formats_import_pyarrow() -> None:
    """pyarrow is an optional extra: only the Parquet/Arrow modules import it, and only inside functions."""
    importers = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "pyarrow" or n.startswith("pyarrow.") for n in names):
                importers[name] = importers.get(name, False) or node in tree.body  # True: at module level
    assert set(importers) == {"ptp_cli.io.formats.arrow", "ptp_cli.io.formats.parquet_out"}
    assert not any(importers.values())
