"""The package's structure, read from its source (AST): imports flow one way, no cycles, no sibling's private names.

Layers (DESIGN.md): the top (the package root, cli, demo, bench, serve) -> checkpoint -> inject -> modules -> ops
-> {kernels, reference}; config and errors sit beside them. A module imports only from its own layer or the layers
below it that the table names (modules never skips ops to reach a kernel or a reference; kernels and reference
never import each other or anything above). A private name (`_x`) is used only inside its own file, or taken from
a shared-helper file (a `_`-prefixed module such as ops/_common.py). Lazy imports inside functions count too.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.aot import ROOT

PACKAGE = ROOT / "fastpeft"
TOP = {"fastpeft", "fastpeft.__main__", "fastpeft.cli", "fastpeft.demo"}
TOP_PACKAGES = ("fastpeft.bench", "fastpeft.serve")
LAYERS = ("checkpoint", "inject", "modules", "ops", "kernels", "reference", "config")
BASE = {"fastpeft.errors", "fastpeft.version"}
ALLOWED = {  # layer -> the layers it may import from (its own included)
    "checkpoint": {"checkpoint", "inject", "modules", "config", "base"},
    "inject": {"inject", "modules", "config", "base"},
    "modules": {"modules", "ops", "config", "base"},
    "ops": {"ops", "kernels", "reference", "base"},
    "kernels": {"kernels"},
    "reference": {"reference"},
    "config": {"config", "base"},
    "base": {"base"},
}
MAX_LINES = 500  # per file, except one kernel family's kernels (fastpeft/kernels/<family>.py)


@dataclass(frozen=True)
class Import:
    source: str        # the importing module
    target: str        # the imported module (a package's __init__ is the package's name)
    names: tuple       # names taken from it ("from target import a, b"); () for "import target"
    line: int


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(known: dict[str, Path], only: str | None = None) -> Iterator[Import]:
    """Every import of a fastpeft module by a fastpeft module (at any depth of the file: lazy imports too), or by
    module `only`."""
    for source, path in known.items():
        if only is not None and source != only:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("fastpeft", "benchmarks"):
                        yield Import(source, alias.name, (), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(source, is_package, node)
                if target.split(".")[0] not in ("fastpeft", "benchmarks"):
                    continue
                submodules = [a.name for a in node.names if f"{target}.{a.name}" in known]
                for name in submodules:  # `from . import x`: an import of module x
                    yield Import(source, f"{target}.{name}", (), node.lineno)
                rest = tuple(a.name for a in node.names if a.name not in submodules)
                if rest or not submodules:
                    yield Import(source, target, rest, node.lineno)


def layer_of(module: str) -> str:
    if module in TOP or module.startswith(TOP_PACKAGES):
        return "top"
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module}: not in any layer of tests/test_layering.py; add it to the table")


def _shared_helper(module: str) -> bool:
    return module.rsplit(".", 1)[-1].startswith("_")


def test_imports_flow_one_way():
    known = modules()
    wrong = []
    for imp in imports(known):
        if imp.target.split(".")[0] == "benchmarks":
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target}: the package may not depend on the "
                         "benchmarks/ script folder (a wheel does not ship it)")
            continue
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src != "top" and dst not in ALLOWED[src]:
            wrong.append(f"{imp.source}:{imp.line} ({src}) imports {imp.target} ({dst})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_private_names_across_files():
    """`from x import _y` and `x._y` take a private name from another file: only shared-helper files lend theirs."""
    known = modules()
    wrong = []
    for imp in imports(known):
        if imp.target == imp.source or _shared_helper(imp.target):
            continue
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__"):
                wrong.append(f"{imp.source}:{imp.line} imports {name} from {imp.target}")
    for source, path in known.items():  # attribute access on an imported module: `reference._col_scaled(...)`
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = {}
        for imp in imports(known, only=source):
            node_names = _bound_names(tree, imp)
            for bound in node_names:
                aliases[bound] = imp.target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                target = aliases[node.value.id]
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                if private and target != source and not _shared_helper(target) and target in known:
                    wrong.append(f"{source}:{node.lineno} uses {node.value.id}.{node.attr} of {target}")
    assert not wrong, "private names used outside their file:\n" + "\n".join(wrong)


def _bound_names(tree: ast.AST, imp: Import) -> list[str]:
    """The local names an import of a module binds (`from . import x as y` binds y to module x)."""
    bound = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) != imp.line:
            continue
        if isinstance(node, ast.ImportFrom) and not imp.names:
            leaf = imp.target.rsplit(".", 1)[-1]
            bound += [a.asname or a.name for a in node.names if a.name == leaf]
        elif isinstance(node, ast.Import) and not imp.names:
            bound += [a.asname for a in node.names if a.name == imp.target and a.asname]
    return bound


def test_no_import_cycles():
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports(known):
        if imp.target in known and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    cycles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(component)
    return found


def test_files_stay_small():
    """One purpose per file: a few hundred lines, except one kernel family's Triton kernels."""
    long = []
    for module, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and not module.startswith("fastpeft.kernels."):
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"files over {MAX_LINES} lines (split them by purpose):\n" + "\n".join(long)


def test_the_rules_catch_what_they_should():
    """The checks themselves: a cycle, a wrong arrow and a borrowed private name are found."""
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) in ([["b", "a"], ["c"]], [["a", "b"], ["c"]])
    assert layer_of("fastpeft.modules.base") == "modules" and "reference" not in ALLOWED["modules"]
    assert layer_of("fastpeft.bench.lora") == "top" and layer_of("fastpeft.errors") == "base"
    tree = ast.parse("from ..reference import lora as ref\nref._col_scaled(1)\n")
    imp = Import("fastpeft.ops.lora", "fastpeft.reference.lora", (), 1)
    assert _bound_names(tree, imp) == ["ref"]
