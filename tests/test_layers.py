"""The packages depend one way (docs/architecture.md): canonical ← codecs ← services ← actors ← plug-ins ←
the composition layer. A module that imports from a layer above its own, or two packages that import
each other, fail here, whether the import is at the top of a module, inside a function or only for
type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import babelhub

ROOT = Path(babelhub.__file__).parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("babelhub", "babelhub.canonical", "babelhub.errors", "babelhub.redaction",
                    "babelhub.entrypoints")),
    ("codecs", ("babelhub.codecs", "babelhub.audio", "babelhub.media")),
    ("services", ("babelhub.services",)),
    ("actors", ("babelhub.actors",)),
    ("plug-in contracts", ("babelhub.plugins",)),
    ("plug-ins", ("babelhub.processors", "babelhub.sources", "babelhub.sessions", "babelhub.api")),
    ("composition", ("babelhub.hub", "babelhub.__main__")),
]


def package(module: str) -> str:
    """The unit a layer is made of: `babelhub.<package>` for a module in a package, else the module."""
    for _, members in LAYERS:
        for member in members:
            if member != "babelhub" and (module == member or module.startswith(member + ".")):
                return member
    return module


def layer(module: str) -> int:
    unit = package(module)
    for rank, (_, members) in enumerate(LAYERS):
        if unit in members:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The babelhub modules `path` imports, wherever in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("babelhub"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("babelhub"):
            for alias in node.names:  # `from babelhub import canonical` imports a module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{importer} (layer {LAYERS[layer(importer)][0]}) imports {imported} (layer {LAYERS[layer(imported)][0]})"
            for importer, imported_modules in sorted(graph.items()) for imported in sorted(imported_modules)
            if layer(imported) > layer(importer)]


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between packages (imports inside one package are its own business)."""
    edges: dict[str, set[str]] = {}
    for importer, imported_modules in graph.items():
        for imported in imported_modules:
            if package(importer) != package(imported):
                edges.setdefault(package(importer), set()).add(package(imported))
    cycles: list[list[str]] = []

    def visit(unit: str, path: list[str]) -> None:
        for following in sorted(edges.get(unit, ())):
            if following == path[0]:
                cycles.append([*path, following])
            elif following not in path and following > path[0]:  # each cycle once, from its smallest unit
                visit(following, [*path, following])

    for start in sorted(edges):
        visit(start, [start])
    return cycles


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert upward_imports(import_graph()) == []


def test_no_two_packages_import_each_other() -> None:
    assert package_cycles(import_graph()) == []


def test_every_module_is_in_a_layer() -> None:
    for module in import_graph():
        layer(module)


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """The checks themselves, on a made-up graph: a service that reaches up into the hub, and two plug-in
    packages that import each other."""
    graph = import_graph()
    graph["babelhub.services.ingest"] = graph["babelhub.services.ingest"] | {"babelhub.hub.app"}
    assert upward_imports(graph) == [
        "babelhub.services.ingest (layer services) imports babelhub.hub.app (layer composition)"]
    graph = import_graph()
    graph["babelhub.sources.webhook"] = graph["babelhub.sources.webhook"] | {"babelhub.sessions.websocket"}
    graph["babelhub.sessions.websocket"] = graph["babelhub.sessions.websocket"] | {"babelhub.sources.polling"}
    assert package_cycles(graph) == [["babelhub.sessions", "babelhub.sources", "babelhub.sessions"]]
