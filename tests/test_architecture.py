"""The package's layering, read from the source: no import cycles, no import from a lower
layer up to a higher one, and a configuration package that imports no area code.

Every ``import`` counts, also one inside a function (a lazy import is still a dependency);
only imports under ``if TYPE_CHECKING:`` are annotations and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import securefl

PACKAGE = Path(securefl.__file__).parent

#: each top-level part of ``securefl`` and its layer: a part may import only parts of its
#: own layer or below (within a layer, the module graph must still be acyclic)
LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 1,
    "vector": 2, "aggregation": 2, "data": 2, "models": 2, "objective": 2, "device": 2,
    "progress": 2,
    "engine": 3,
    "output": 4, "secagg": 4, "he": 4, "privacy": 4,
    "threat": 5, "provenance": 5,
    "build": 6,
    "simulation": 7, "ray_simulation": 7, "runtime": 7,
    "attacks": 8, "report": 8, "own": 8,
    "cli": 9, "__init__": 9,
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "securefl":
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names
                                   if a.name.split(".")[0] == "securefl")
    return {m: {t for t in graph[m] if t in modules and t != m} for m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {_part(m) for m in _imports()}
    assert parts - set(LAYERS) == set()


def test_no_import_cycles() -> None:
    assert _cycles(_imports()) == []


def test_no_import_from_a_lower_layer_up() -> None:
    upward = sorted(f"{source} -> {target}" for source, targets in _imports().items()
                    for target in targets
                    if _part(source) != _part(target)
                    and LAYERS[_part(target)] > LAYERS[_part(source)])
    assert upward == []


def test_the_configuration_package_is_a_leaf() -> None:
    code = ("import securefl.config, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('securefl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert {m for m in loaded if not m.startswith("securefl.config")} == {"securefl",
                                                                          "securefl.errors"}
