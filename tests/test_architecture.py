"""The package's shape, checked: the rules docs/architecture.md states, as tests.

- no import cycle among the package's modules, counting imports inside functions;
- data flows one way: nothing outside `report/` (and the CLI, which dispatches) imports the
  report, and the core (`types`, `errors`, `store`, `stats`) imports nothing above it;
- outcome names are spelled only in `types.py`;
- the report and explorer read paths load no torch, gradio, matplotlib or numpy at import.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "t2i_eval"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere (module level or in functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the longest package module the target names (a.b.c -> a.b if c is a name)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("t2i_eval"):
                    graph[name].add(t)
    return graph


def _parents(module: str) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: not an edge we care about."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's members, found by strongly connected components (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v] - _parents(v):
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


def test_no_import_cycles_even_inside_functions() -> None:
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_nothing_outside_report_imports_the_report() -> None:
    graph = import_graph()
    offenders = sorted(
        m
        for m, deps in graph.items()
        if not m.startswith("t2i_eval.report")
        and m != "t2i_eval.cli"
        and any(d == "t2i_eval.report" or d.startswith("t2i_eval.report.") for d in deps)
    )
    assert offenders == []


def test_the_core_imports_nothing_above_it() -> None:
    graph = import_graph()
    allowed = {
        "t2i_eval.types": set(),
        "t2i_eval.errors": set(),
        "t2i_eval.store": {"t2i_eval.types", "t2i_eval.errors"},
        "t2i_eval.stats": {"t2i_eval.types"},
    }
    for module, ok in allowed.items():
        extra = graph[module] - ok - {"t2i_eval"}
        assert not extra, f"{module} imports {sorted(extra)}"


OUTCOME_LITERAL = re.compile(r"[\"'](complied|unjudged|blocked|sanitized)[\"']")


def test_outcome_names_are_spelled_only_in_types() -> None:
    """A tuple of outcome names elsewhere would be a second answer to "what is a refusal"."""
    hits = []
    for name, path in _modules().items():
        if name == "t2i_eval.types":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if OUTCOME_LITERAL.search(code):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert hits == []


def test_reading_and_reporting_runs_import_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import t2i_eval.store, t2i_eval.stats, t2i_eval.report, t2i_eval.sweep\n"
        "import t2i_eval.explorer.rows, t2i_eval.triggers, t2i_eval.predictor\n"
        "heavy = {'torch', 'gradio', 'matplotlib', 'numpy', 'diffusers', 'transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_public_api_resolves_every_name() -> None:
    import t2i_eval

    for name in t2i_eval.__all__:
        assert getattr(t2i_eval, name) is not None, name
