"""Every module imports on its own, and no import circle joins the modules of foundation/ and evaluation/.

The circle check is static: it reads each module's source (imports at the top and inside functions alike,
``TYPE_CHECKING`` ones included) so a circle hidden behind a function-level import is found as well. A
circle means two modules cannot be understood, tested or moved apart; reading a checkpoint belongs below the
tasks and models that use it, and a hook module below the reader that calls it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("foundation", "evaluation")

# Circles still being taken apart (each entry: the modules one circle may join). Remove an entry when its
# circle is gone; the test then keeps it gone.
ALLOWED: list[frozenset[str]] = [
]


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the two packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source (``from pkg import name`` counts as the
    submodule ``pkg.name`` when there is one, else as ``pkg``)."""
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, level - 1 steps up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [frozenset({"a", "b", "c"})]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "foundation"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from foundation.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nfrom ..sub.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    files = {k: v for k, v in module_files().items() if k.startswith("foundation")}
    graph = import_graph(files)
    assert graph["foundation.sub.a"] == {"foundation.sub.b"}
    assert graph["foundation.sub.b"] == {"foundation.sub.a"}
    assert circles(graph) == [frozenset({"foundation.sub.a", "foundation.sub.b"})]


def test_no_import_circles():
    found = circles(import_graph(module_files()))
    new = [sorted(c) for c in found if not any(c <= allowed for allowed in ALLOWED)]
    assert not new, f"import circles: {new}"


@pytest.mark.parametrize("module", sorted(module_files()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_model_task_and_loss_code_never_import_the_engine():
    """Math apart from machinery (docs STYLE): models, tasks and losses import no engine module but the small
    collectives one (all-gather with grad for contrastive losses), and never the training loop."""
    graph = import_graph(module_files())
    reaching = {m: sorted(d for d in deps if d == "foundation.train" or (d.startswith("foundation.engine")
                                                                        and d != "foundation.engine.collectives"))
                for m, deps in graph.items() if m.startswith(("foundation.models", "foundation.tasks",
                                                              "foundation.losses"))}
    assert not {m: d for m, d in reaching.items() if d}
