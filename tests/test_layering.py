"""The package's dependencies run one way (docs/architecture.md)::

    io, arguments → models → data → simulate | train → evaluate → cli, jobs (stages, iterate, demo)

Every ``import`` of a clarify_lit module is read with ``ast`` — at module level, inside functions and classes, and
under ``if TYPE_CHECKING:`` — and checked against that order:

* no edge from a lower layer to a higher one;
* ``simulate`` and ``train`` are siblings that know nothing of each other (no edge either way): a piece both need
  lives below them (models, data);
* no import cycle among the modules, type-only imports under ``TYPE_CHECKING`` included: they never run, but a
  cycle through one still ties two modules together (a type both need lives in a module below both);
* no clarify_lit import inside a function: a lazy import of the package's own modules either hides an upward edge
  or a cycle, or buys nothing (lazy imports of heavy third-party libraries are fine);
* a string naming a clarify_lit module (``cli.py``'s dispatch table, loaded on demand with ``importlib``) follows
  the same order.

``clarify_lit/__init__.py`` is the public façade (names load lazily on first access) and is exempt: it sits above
everything, and importing the bare package (``from clarify_lit import __version__``) loads no submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "clarify_lit"
PACKAGE = "clarify_lit"

# module (or package) → layer; a module takes the entry of its longest matching prefix
LAYERS = {
    "clarify_lit.io": 0,
    "clarify_lit.arguments": 0,
    "clarify_lit.environment": 0,
    "clarify_lit.models": 1,
    "clarify_lit.base_reference": 1,
    "clarify_lit.data": 2,
    "clarify_lit.simulate": 3,
    "clarify_lit.train": 3,
    "clarify_lit.evaluate": 4,
    "clarify_lit.cli": 5,
    "clarify_lit.jobs": 5,
    "clarify_lit.demo": 5,  # `python -m clarify_lit.demo` / `.iterate`: shims that run the jobs' main
    "clarify_lit.iterate": 5,
}
SEPARATE_SIBLINGS = ("clarify_lit.simulate", "clarify_lit.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int | None:
    keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return LAYERS[max(keys, key=len)] if keys else None


def group(module: str) -> str:
    return next((g for g in SEPARATE_SIBLINGS if module == g or module.startswith(g + ".")), module)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The clarify_lit modules an import statement loads (``from pkg import submodule`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    base = node.module or ""
    if node.level:  # relative import
        anchor = importer.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if MODULES[importer].name == "__init__.py" else 0)]
        base = ".".join([*anchor, base] if base else anchor)
    if base.split(".")[0] != PACKAGE:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str, source: str | None = None) -> list[tuple[str, bool, bool, int]]:
    """``(imported module, inside a function, type-only, line)`` for every clarify_lit import of ``module`` (its file,
    or ``source`` when given)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8") if source is None else source)
    found: list[tuple[str, bool, bool, int]] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend((m, in_function, type_only, child.lineno) for m in resolve(module, child))
            elif isinstance(child, ast.If) and is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, type_only)
            else:
                inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, inner, type_only)

    visit(tree, False, False)
    return found


def named_modules(module: str) -> list[tuple[str, int]]:
    """clarify_lit modules named by a string constant (a dispatch table for ``importlib.import_module``)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return [
        (n.value, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and n.value in MODULES
        and n.value.startswith(PACKAGE + ".")
    ]


CHECKED = [m for m in MODULES if m != PACKAGE]


def test_every_module_has_a_layer():
    missing = [m for m in CHECKED if layer(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layering.py (and docs/architecture.md): {missing}"


def edge_problem(importer: str, imported: str) -> str | None:
    if imported == PACKAGE:
        return None  # the bare package: its __init__ loads no submodule
    low, high = layer(importer), layer(imported)
    if high is not None and low is not None and high > low:
        return f"upward: {importer} (layer {low}) imports {imported} (layer {high})"
    a, b = group(importer), group(imported)
    if a != b and a in SEPARATE_SIBLINGS and b in SEPARATE_SIBLINGS:
        return f"sibling: {importer} imports {imported} ({a} and {b} stay apart)"
    return None


@pytest.mark.parametrize("module", CHECKED)
def test_no_upward_or_sibling_import(module):
    problems = [
        f"line {line}: {p}" for imported, _, _, line in imports(module) if (p := edge_problem(module, imported))
    ]
    problems += [
        f"line {line}: {p} (by name)"
        for imported, line in named_modules(module)
        if (p := edge_problem(module, imported))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", CHECKED)
def test_no_package_import_inside_a_function(module):
    lazy = [
        f"line {line}: {imported}"
        for imported, in_function, type_only, line in imports(module)
        if in_function and not type_only and imported != PACKAGE
    ]
    assert not lazy, f"{module} imports clarify_lit modules inside functions (import them at the top): {lazy}"


def import_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The cycles of an import graph (module → the modules it imports): its strongly connected components of two or
    more modules, or one module importing itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, []):
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return cycles


def import_graph() -> dict[str, list[str]]:
    """Every module's clarify_lit imports, type-only ones (under ``TYPE_CHECKING``) included."""
    return {m: sorted({i for i, _, _, _ in imports(m) if i in MODULES and i != PACKAGE}) for m in CHECKED}


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, (
        f"import cycles (type-only imports count; move the shared piece to a module both can import): {cycles}"
    )


def test_the_checker_sees_what_it_must():
    """The walker finds imports inside functions and under TYPE_CHECKING, flags an upward edge, and the cycle finder
    counts a cycle closed by a type-only import."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from clarify_lit.evaluate.report import MethodSummary\n"
        "def f():\n    from clarify_lit.evaluate import metrics\n"
    )
    found = imports("clarify_lit.evaluate.audit_html", source)
    assert ("clarify_lit.evaluate.report", False, True, 3) in found
    assert ("clarify_lit.evaluate.metrics", True, False, 5) in found
    graph = import_graph()
    assert "clarify_lit.evaluate.summary" in graph["clarify_lit.evaluate.audit_html"]
    graph["clarify_lit.evaluate.audit_html"] = sorted(
        {*graph["clarify_lit.evaluate.audit_html"], *(i for i, _, _, _ in found)}
    )  # the old type-only import back
    assert ["clarify_lit.evaluate.audit_html", "clarify_lit.evaluate.report"] in import_cycles(graph)
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["d"], "e": ["a"]}) == [["a", "b", "c"], ["d"]]
    assert edge_problem("clarify_lit.data.datamodule", "clarify_lit.train.objectives")
    assert edge_problem("clarify_lit.train.module", "clarify_lit.evaluate.command")
    assert edge_problem("clarify_lit.simulate.command", "clarify_lit.train.module")
    assert edge_problem("clarify_lit.evaluate.command", "clarify_lit.train.module") is None
    assert ("clarify_lit.jobs.iterate", 0) in [(m, 0) for m, _ in named_modules("clarify_lit.cli")]
