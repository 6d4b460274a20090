"""The organism package's import structure: a light package import and a one-way module graph.

The dataset registry imports the package just to list questions, so that import must not load the trainer
(torch, optimisers, tqdm). And every module imports only modules below it, even inside functions: a lazy
cycle still means two modules that cannot be understood (or moved) one without the other.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "mmtrace.jobs.organism"


def _package_dir() -> Path:
    """The package's folder, found without importing it (the graph is read from source only)."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


PACKAGE_DIR = _package_dir()
MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py"))


def _modules_after(code: str) -> dict:
    """Run `code` in a fresh interpreter and return what it prints as JSON (a clean sys.modules)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_the_package_loads_no_trainer():
    got = _modules_after(
        "import json, sys\n"
        f"import {PACKAGE} as organism\n"
        "before = sorted(sys.modules)\n"
        "organism.TrainConfig\n"
        "print(json.dumps({'before': before, 'after': sorted(sys.modules)}))\n")
    before = set(got["before"])
    assert f"{PACKAGE}.train" not in before and f"{PACKAGE}.evaluate" not in before
    assert "torch.optim" not in before
    assert {f"{PACKAGE}.dataset", f"{PACKAGE}.install"} <= before  # the light names are really there
    assert f"{PACKAGE}.train" in got["after"]  # and the lazy name resolves to the trainer on first use


def test_lazy_names_resolve_and_unknown_names_fail():
    import mmtrace.jobs.organism as organism
    from mmtrace.jobs.organism import evaluate, train

    assert organism.build_organism is train.build_organism and organism.TrainConfig is train.TrainConfig
    assert organism.evaluate_organism is evaluate.evaluate_organism
    assert set(organism.__all__) <= set(dir(organism))
    with pytest.raises(AttributeError):
        organism.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------------- graph

def _package_imports(tree: ast.AST) -> set[str]:
    """Modules of the package that `tree` imports anywhere (top level or inside functions); `__init__` for
    a name taken from the package itself."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found |= _from_targets(node)
        elif isinstance(node, ast.Import):
            found |= {a.name[len(PACKAGE) + 1:].split(".")[0] for a in node.names
                      if a.name.startswith(PACKAGE + ".")}
    return found


def _from_targets(node: ast.ImportFrom) -> set[str]:
    """`from .x import y`, `from . import x` and their absolute spellings; nothing outside the package."""
    module = node.module or ""
    if node.level == 1:
        rest = module
    elif node.level == 0 and (module == PACKAGE or module.startswith(PACKAGE + ".")):
        rest = module[len(PACKAGE) + 1:]
    else:
        return set()
    if rest:
        return {rest.split(".")[0]}
    return {a.name if a.name in MODULES else "__init__" for a in node.names}


def _graph() -> dict[str, set[str]]:
    return {m: _package_imports(ast.parse((PACKAGE_DIR / f"{m}.py").read_text())) for m in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_parser_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from .train import build_organism\n    from . import world\n"
                     f"import {PACKAGE}.render\nfrom {PACKAGE} import World\nfrom {PACKAGE}.model import x\n"
                     "from mmtrace.workers.spec import Sample\nfrom ..datasets import y\n")
    assert _package_imports(tree) == {"train", "world", "render", "__init__", "model"}


def test_the_module_graph_points_one_way():
    graph = _graph()
    assert {"world", "render", "model", "train", "install", "dataset", "evaluate", "cli"} <= set(graph)
    assert all(t in graph for targets in graph.values() for t in targets), graph  # no edge to a missing module
    assert _find_cycle(graph) is None, _find_cycle(graph)
    assert graph["world"] == set() and graph["model"] == set()
    assert graph["render"] == {"world"}
    assert "train" in graph["install"]  # lazily, for a checkout without shipped weights
    assert not any("__init__" in graph[m] for m in MODULES if m != "__init__"), graph  # no facade imports
