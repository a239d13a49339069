"""Unused names that pyflakes (ruff ``F``) cannot see: a module-level
``_private`` name (function, class, constant) or a ``_private`` method
that nothing in its module refers to is dead code (decorated definitions
are registered by their decorator and count as used)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qmpd"


def _unused(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    defined: dict[str, int] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not node.decorator_list:  # a decorator registers it
                defined.setdefault(node.name, node.lineno)
        elif isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    defined.setdefault(n.id, node.lineno)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.decorator_list:
                    defined.setdefault(item.name, item.lineno)
    used: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            used.add(n.id)
        elif isinstance(n, ast.Attribute):
            used.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            used.add(n.value)  # __all__, __slots__, getattr by name
    return [f"{path.relative_to(PKG.parent)}:{line}: {name}" for name, line in defined.items()
            if name.startswith("_") and not name.startswith("__") and name not in used]


def test_no_unused_private_names() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        problems += _unused(path)
    assert problems == []
