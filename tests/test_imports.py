"""weft_core's modules import each other without a cycle, lazily or not.

A cycle hidden by a function-level import works only as long as nobody moves the
import; the graph here counts every import that runs (not those under
TYPE_CHECKING), so a new cycle fails where it is made.
"""

from __future__ import annotations

import ast
from pathlib import Path

import weft_core

PACKAGE = Path(weft_core.__file__).parent


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The weft_core modules ``path`` imports when it runs."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                found.update(n.split(".")[0] for n in names)
            elif node.module and node.module.startswith("weft_core."):
                found.add(node.module.split(".")[1])

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != path.stem}


def test_no_import_cycle_between_weft_core_modules() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: _runtime_imports(PACKAGE / f"{m}.py", modules) for m in modules}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append([*path[path.index(dep) :], dep])
            elif len(path) < len(modules):
                visit(dep, [*path, dep])

    for module in sorted(modules):
        visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
