"""The house's layout holds: no import cycles, no layer importing the one above it.

The graph is read from the source (AST), counting every import: at the top of a module, inside a
function, or under `TYPE_CHECKING`. A module's layer is the longest prefix of its name in
`LAYERS`; an import may point to its own layer or one below, never up or sideways. Run as a
script (`python tests/test_layout.py`), it prints the graph's figures as one JSON line.
"""

import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIONS = ("retrieval", "training", "api")  # installed as twostage.<folder> (setup.py)

# bottom to top; one rank may hold several layers that must not import each other
LAYERS: list[tuple[str, ...]] = [
    ("twostage.retrieval.core",),
    ("twostage.retrieval.models",),
    ("twostage.retrieval.store",),
    ("twostage.retrieval.access",),
    ("twostage.retrieval.ingest", "twostage.retrieval.search"),
    ("twostage.retrieval.traffic",),
    ("twostage.retrieval.deployments",),
    ("twostage.training",),
    ("twostage.api.settings",),
    ("twostage.api.runtime",),
    ("twostage.api.http",),
    ("twostage.api.cli",),
]


def modules() -> dict[str, Path]:
    """Every module of the installed namespace, by its import name."""
    found = {}
    for station in STATIONS:
        for path in (ROOT / station).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(["twostage", *parts])] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports (a `from package import name` of a submodule
    counts as importing that submodule, not the package)."""

    def resolve(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                    ).strip(".")
                # `from pkg import sub` imports pkg.sub; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base for a in node.names]
            else:
                continue
            for target in targets:
                resolved = resolve(target) if target.startswith("twostage.") else None
                if resolved and resolved != name:
                    edges[name].add(resolved)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(set(edges) | {t for ts in edges.values() for t in ts}):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, layer prefix) of the longest layer prefix of `module`; None for the station roots."""
    best = None
    for rank, layers in enumerate(LAYERS):
        for layer in layers:
            if (module == layer or module.startswith(layer + ".")) and (
                best is None or len(layer) > len(best[1])
            ):
                best = (rank, layer)
    return best


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports that point to a higher rank, or sideways to another layer of the same rank."""
    wrong = []
    for source, targets in edges.items():
        here = layer_of(source)
        for target in targets:
            there = layer_of(target)
            if here is None or there is None:
                wrong.append(f"{source} -> {target} (a module outside every layer)")
            elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                wrong.append(f"{source} ({here[1]}) -> {target} ({there[1]})")
    return sorted(wrong)


def test_there_are_no_import_cycles() -> None:
    assert cycles(import_graph(modules())) == []


def test_no_layer_imports_the_one_above_it() -> None:
    assert upward(import_graph(modules())) == []


def test_every_module_belongs_to_a_layer() -> None:
    roots = {f"twostage.{s}" for s in STATIONS}
    assert [m for m in modules() if m not in roots and layer_of(m) is None] == []


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The two checks above on a graph that breaks both rules: they must say so."""
    edges = {
        "twostage.retrieval.models.a": {"twostage.retrieval.store.b"},
        "twostage.retrieval.store.b": {"twostage.retrieval.models.a"},
        "twostage.retrieval.ingest.c": {"twostage.retrieval.search.d"},
    }
    assert cycles(edges) == [["twostage.retrieval.models.a", "twostage.retrieval.store.b"]]
    assert upward(edges) == [
        "twostage.retrieval.ingest.c (twostage.retrieval.ingest) -> twostage.retrieval.search.d "
        "(twostage.retrieval.search)",
        "twostage.retrieval.models.a (twostage.retrieval.models) -> twostage.retrieval.store.b "
        "(twostage.retrieval.store)",
    ]


if __name__ == "__main__":
    found = modules()
    graph = import_graph(found)
    between = sorted({(layer_of(a) or (0, a))[1] + " -> " + (layer_of(b) or (0, b))[1]
                      for a, bs in graph.items() for b in bs if layer_of(a) != layer_of(b)})  # fmt: skip
    print(json.dumps({"modules": len(found), "imports": sum(len(v) for v in graph.values()),
                      "cycles": cycles(graph), "upward": upward(graph), "between_layers": between}))  # fmt: skip
    sys.exit(0)
