"""The import graph of ``csvimg`` and ``csvimg_server``, read with `ast`.

Every import counts, including those inside functions (lazy imports still
run, and a lazy cycle is a cycle waiting for a caller); imports under
``if TYPE_CHECKING:`` do not, since they never run. An import names one
module: ``from csvimg.backends import memory`` is an edge to
``csvimg.backends.memory``, ``from csvimg.backends import Storage`` one to
the package ``csvimg.backends``; the parent packages Python initialises on
the way are not edges (else ``csvimg/__init__``, which re-exports the
public names, would close a cycle with every module).

Rules:

* no import cycle among the modules of either package, except the edges of
  `ALLOWED_CYCLE_EDGES` (each with its reason; empty today);
* only ``csvimg.backends.*`` and ``csvimg.testing.*`` import a named
  backend (`NAMED_BACKENDS`): everything else asks the plugin manager,
  which lists the built-ins by module name (`csvimg.plugins.BUILTIN_PLUGINS`);
* ``csvimg`` never imports ``csvimg_server``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from csvimg.plugins import BUILTIN_PLUGINS

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("csvimg", "csvimg_server")

NAMED_BACKENDS = tuple(
    f"csvimg.backends.{name}" for name in ("memory", "sqlite", "redis", "celery", "files")
)
"""Backend modules (and packages) that only backends, the contract suite and
the plugin manager's string list may name."""

MAY_IMPORT_BACKENDS = ("csvimg.backends", "csvimg.testing")
"""Packages whose submodules may import a named backend."""

ALLOWED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()
"""``(importer, imported)`` edges left out of the cycle check, each with a reason.

Empty: there is no import cycle. Add an edge here only with a comment
saying why it cannot be broken.
"""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the two packages: dotted name -> file."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in *tree* except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _runtime_imports(node)


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@cache
def imports_of(module: str) -> frozenset[str]:
    """The modules of either package that *module* imports (at run time)."""
    path = modules()[module]
    known = modules()
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _resolve(module, path, node)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        found.update(t for t in targets if t in known)
    found.discard(module)
    return frozenset(found)


def graph() -> dict[str, set[str]]:
    """Importer -> imported, minus `ALLOWED_CYCLE_EDGES`."""
    return {m: {t for t in imports_of(m) if (m, t) not in ALLOWED_CYCLE_EDGES} for m in modules()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _path_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One cycle through the first module of *component*, for the message."""
    start = component[0]
    members = set(component)
    trail = [start]
    seen = {start}
    while True:
        nexts = sorted(edges[trail[-1]] & members)
        if start in nexts and len(trail) > 1:
            return [*trail, start]
        step = next((n for n in nexts if n not in seen), None)
        if step is None:
            return [*trail, "..."]
        trail.append(step)
        seen.add(step)


def test_the_walk_sees_the_packages() -> None:
    names = modules()
    assert {
        "csvimg",
        "csvimg.plugins",
        "csvimg.hooks",
        "csvimg.backends.memory",
        "csvimg_server.app",
    } <= set(names)
    assert "csvimg.hooks" in imports_of("csvimg.backends.memory")
    # lazy imports (inside functions) count
    assert "csvimg.webhooks" in imports_of("csvimg_server.cli._backends")


def test_the_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert _path_in(["a", "b", "c"], edges) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    edges = graph()
    inside = {
        m: {t for t in ts if t.split(".")[0] == package}
        for m, ts in edges.items()
        if m.split(".")[0] == package
    }
    found = cycles(inside)
    assert not found, "import cycles: " + "; ".join(" -> ".join(_path_in(c, inside)) for c in found)


def test_allowed_cycle_edges_exist() -> None:
    for importer, imported in ALLOWED_CYCLE_EDGES:
        assert imported in imports_of(importer), f"stale allow-list entry {importer} -> {imported}"


def _is_named_backend(module: str) -> bool:
    return any(module == b or module.startswith(b + ".") for b in NAMED_BACKENDS)


def test_only_backends_and_the_contract_suite_import_named_backends() -> None:
    offenders = [
        f"{m} imports {t}"
        for m in modules()
        if not any(m.startswith(p + ".") for p in MAY_IMPORT_BACKENDS)
        for t in sorted(imports_of(m))
        if _is_named_backend(t)
    ]
    assert not offenders, offenders


def test_the_plugin_manager_names_the_builtin_backends_as_strings() -> None:
    assert set(NAMED_BACKENDS) <= set(BUILTIN_PLUGINS)
    assert set(BUILTIN_PLUGINS) <= set(modules())


def test_core_never_imports_the_server() -> None:
    offenders = [
        f"{m} imports {t}"
        for m in modules()
        if m.split(".")[0] == "csvimg"
        for t in sorted(imports_of(m))
        if t.split(".")[0] == "csvimg_server"
    ]
    assert not offenders, offenders


def test_the_hooks_module_is_a_leaf() -> None:
    """`csvimg.hooks` imports nothing of csvimg at run time but the errors."""
    assert imports_of("csvimg.hooks") <= {"csvimg._errors"}
