"""The layers of the code, read from every import statement (type-only and function-level ones
included): model library (`memflow`) < configuration (`config`) < shared helpers (`utils`) <
applications (`pipeline`, `trainer`) < their users (`eval`, `benchmarks`, the entry scripts).
A module imports only from its own layer or below, inference never imports training code, and no
two modules import each other, however indirectly."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("inference", "train", "serve")
PACKAGES = ("memflow", "config", "utils", "pipeline", "trainer", "eval", "benchmarks")
# what each top-level package or script may import of the project, besides itself
ALLOWED = {
    "memflow": set(),
    "config": {"memflow"},
    "utils": {"memflow", "config"},
    "pipeline": {"memflow", "config", "utils"},
    "trainer": {"memflow", "config", "utils"},
    "eval": {"memflow", "config", "utils", "pipeline"},
    "benchmarks": {"memflow", "config", "utils", "pipeline", "trainer"},
    "inference": {"memflow", "config", "utils", "pipeline"},
    "serve": {"memflow", "config", "utils", "pipeline"},
    "train": {"memflow", "config", "utils", "trainer"},
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every project module (tests excluded)."""
    found = {name: ROOT / f"{name}.py" for name in ENTRY_SCRIPTS}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules that module `name` imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `a.b.c` of a function c: module `a.b`
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_reader_sees_the_imports():
    assert "memflow.streaming" in GRAPH["memflow.chunk_loop"]
    assert "config.schema" in GRAPH["config.stream"]  # a relative import
    assert "pipeline.runner" in GRAPH["inference"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    top = name.split(".")[0]
    wrong = sorted(t for t in GRAPH[name] if t.split(".")[0] not in ALLOWED[top] | {top})
    assert wrong == [], f"{name} imports from a layer above or beside it"


def test_no_import_circles():
    """Tarjan's strongly connected components of the module graph: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert circles == []


def test_inference_loads_no_training_code():
    code = ("import sys, pipeline.runner, pipeline.session, pipeline.live.app\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
