"""The house's floors: every import of a pyvae module goes down a floor, none hides inside a
function, and no two modules import each other (CONTRIBUTING.md draws the floors).

A module may import the modules of its own unit (a package such as ``pyvae.infer``, or a single
module such as ``pyvae.program``) and those of units on lower floors; never a unit on its own
floor or above. Imports inside functions are allowed only for optional dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyvae"

#: floor of each unit, from the bottom
FLOORS = {
    "pyvae.errors": 0,
    "pyvae.program": 1,
    "pyvae.compiled": 1,
    "pyvae.distributed": 1,
    "pyvae.data": 2,
    "pyvae.parts": 2,
    "pyvae.models": 3,
    "pyvae.runs": 4,
    "pyvae.infer": 5,
    "pyvae.viz": 6,
    "pyvae.train": 7,
    "pyvae.cli": 8,
    "pyvae": 9,  # the package's own __init__ and __main__: the public API on top
}

#: packages that are not installed with pyvae itself: imported where they are used
OPTIONAL = {"mlflow"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The unit a module belongs to: its first-level package or module under pyvae."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "pyvae"
    return ".".join(parts[:2])


def imports(path: Path) -> list[tuple[list[str], int, bool]]:
    """(what it may name, line, at module level) of every import in the file at ``path``:
    ``from a.b import c`` may name the module a.b.c, else it imports the name c of a.b."""
    tree = ast.parse(path.read_text(), str(path))
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [[f"{node.module}.{a.name}", node.module] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            pytest.fail(f"{path}:{node.lineno}: relative import; pyvae imports absolutely")
        else:
            continue
        found += [(name, node.lineno, id(node) not in local) for name in names]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def pyvae_imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """The imports of pyvae's own modules."""
    found = []
    for names, line, top in imports(path):
        name = next((n for n in names if n in known), None)
        if name is not None:
            found.append((name, line, top))
    return found


def test_every_import_of_a_pyvae_module_goes_down_a_floor():
    known = modules()
    wrong = []
    for module, path in known.items():
        for name, line, _ in pyvae_imports(path, known):
            here, there = unit(module), unit(name)
            if here != there and FLOORS[there] >= FLOORS[here]:
                wrong.append(
                    f"{path}:{line}: {module} ({here}, floor {FLOORS[here]}) imports "
                    f"{name} ({there}, floor {FLOORS[there]})"
                )
    assert not wrong, "imports that do not go down:\n" + "\n".join(wrong)


def test_no_import_hides_in_a_function_but_of_an_optional_dependency():
    wrong = [
        f"{path}:{line}: import of {names[-1]} inside a function"
        for path in sorted(PACKAGE.rglob("*.py"))
        for names, line, top in imports(path)
        if not top and names[-1].split(".")[0] not in OPTIONAL
    ]
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_import_each_other():
    known = modules()
    graph = {
        m: {n for n, _, top in pyvae_imports(p, known) if top and n != m} for m, p in known.items()
    }
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m) :] + [m]))
        if m in seen:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            # a package imports its submodules to name its exports: not a cycle back
            if not (known[m].name == "__init__.py" and n.startswith(m + ".")):
                visit(n)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)
