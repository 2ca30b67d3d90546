"""The package's own import graph: imports go one way, none hides in a function, no file grows too long.

Every module of ``adapter_fused`` is parsed with ``ast`` (nothing is imported); an edge A -> B is an
import statement in A, wherever it stands (module level, a class, a function, an ``if``), naming B or a
name in B. ``from pkg import name`` counts as an import of the module ``pkg.name`` where that is a module
of the package, else of ``pkg`` itself. The implicit import of a parent package is not an edge.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adapter_fused"
MAX_LINES = 800

DEFERRED_OUTSIDE_HF = {
    ("adapter_fused.library", "adapter_fused.kernels"),  # Triton loads on the first kernel call
    ("adapter_fused.report", "adapter_fused"),  # the command line answers --help without torch
    ("adapter_fused.report", "adapter_fused.ops"),
}
"""Function-level imports of package modules that keep torch or Triton from loading early. They are
outside ``adapter_fused.hf``, where no such import is allowed (its optional third-party packages,
transformers, adapters and safetensors, are the only imports its functions make)."""


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of the package
    line: int
    in_function: bool
    names: tuple[str, ...]  # for ``from target import a, b``: a, b; empty for ``import target``
    alias: str | None  # the name ``import target as alias`` / ``from pkg import target as alias`` binds


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _absolute(source: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a ``from`` import of ``level`` dots names, relative to ``source``."""
    if level == 0:
        return module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(modules: dict[str, Path]) -> list[Import]:
    found: list[Import] = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool, source: str = source, is_package: bool = is_package) -> None:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        found.append(Import(source, alias.name, node.lineno, in_function, (), alias.asname))
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(source, is_package, node.level, node.module)
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:
                        found.append(Import(source, submodule, node.lineno, in_function, (),
                                            alias.asname or alias.name))
                    elif target in modules:
                        found.append(Import(source, target, node.lineno, in_function, (alias.name,), None))
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(tree, False)
    return found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = walk(start)
            if cycle is not None:
                return cycle
    return None


MODULES = package_modules()
IMPORTS = imports(MODULES)


def test_the_graph_sees_the_package() -> None:
    """The parser finds the modules and their imports (a check of this test itself)."""
    assert "adapter_fused.hf" in MODULES and "adapter_fused.ops" in MODULES
    assert any(i.source.startswith("adapter_fused.hf.") and i.target == "adapter_fused.hf.config" for i in IMPORTS)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for item in IMPORTS:
        if item.target != item.source:
            edges.setdefault(item.source, set()).add(item.target)
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_function_level_import_of_a_package_module() -> None:
    deferred = sorted({f"{i.source}:{i.line} imports {i.target}" for i in IMPORTS
                       if i.in_function and (i.source, i.target) not in DEFERRED_OUTSIDE_HF})
    assert not deferred, "imports inside functions: " + "; ".join(deferred)


def test_allowed_deferred_imports_are_outside_hf() -> None:
    assert not any(source.startswith("adapter_fused.hf") for source, _ in DEFERRED_OUTSIDE_HF)


def test_no_private_name_crosses_a_file() -> None:
    """No module imports a name with a leading underscore from another module of the package, or
    reads one as an attribute of a package module it imported (dunder names aside)."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    crossing = [f"{i.source}:{i.line} imports {i.target}.{name}" for i in IMPORTS for name in i.names
                if private(name)]
    crossing += [f"{i.source}:{i.line} imports the module {i.target}" for i in IMPORTS
                 if private(i.target.rsplit(".", 1)[-1])]
    by_source: dict[str, dict[str, str]] = {}
    for item in IMPORTS:
        if item.alias is not None:
            by_source.setdefault(item.source, {})[item.alias] = item.target
    for source, aliases in by_source.items():
        tree = ast.parse(MODULES[source].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and private(node.attr)):
                crossing.append(f"{source}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not crossing, "private names used outside their file: " + "; ".join(sorted(crossing))


def documented_layers() -> list[str]:
    """The layers of ``adapter_fused.hf``, lowest first, as its package docstring lists them
    (``N. ``module``: ...``), as module names relative to ``adapter_fused.hf``."""
    doc = ast.get_docstring(ast.parse(MODULES["adapter_fused.hf"].read_text(encoding="utf-8"))) or ""
    return re.findall(r"^\d+\. ``([\w.]+)``", doc, re.MULTILINE)


def test_hf_imports_follow_the_documented_layers() -> None:
    """Every module of ``adapter_fused.hf`` sits in a layer its docstring names, and imports only
    modules of its own layer or of the layers before it."""
    layers = documented_layers()
    assert len(layers) >= 10 and "sites" in layers and "model" in layers

    def layer(module: str) -> int | None:
        name = module.removeprefix("adapter_fused.hf.")
        return next((i for i, top in enumerate(layers) if name == top or name.startswith(top + ".")), None)

    inner = [m for m in MODULES if m.startswith("adapter_fused.hf.") and m != "adapter_fused.hf.adapterhub"]
    assert not [m for m in inner if layer(m) is None], "modules in no documented layer"
    upward = sorted({f"{i.source} imports {i.target}" for i in IMPORTS
                     if i.source in inner and i.target in inner and layer(i.target) > layer(i.source)})  # type: ignore[operator]
    assert not upward, "imports of a later layer: " + "; ".join(upward)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_the_line_limit(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"
