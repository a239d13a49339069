"""No module touches another module's ``_private`` names (STYLE.md).

For every file of qmpd/ and tests/: ``from qmpd... import _name`` is
refused, and so is ``expr._name`` unless ``expr`` is ``self``/``cls`` or
``_name`` is defined in the same file (a class comparing with another
instance of itself, as ``HBitmap.__eq__`` does).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Private names of other libraries that are their documented API, and
#: asyncio's ready queue, which the tests' settle() reads to see that the
#: loop is idle (no public API tells).
ALLOWED = {"_exit", "_getframe", "_asdict", "_replace", "_fields", "_make", "_value_", "_missing_",
           "_ready"}


def _defined(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
            names.add(n.attr)
        elif isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.alias):
            names.add(n.asname or n.name.split(".")[0])
    return names


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    defined = _defined(tree)
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue
            if n.attr in defined or n.attr in ALLOWED:
                continue
            out.append(f"{path.relative_to(ROOT)}:{n.lineno}: .{n.attr}")
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("qmpd"):
            out += [f"{path.relative_to(ROOT)}:{n.lineno}: imports {a.name}" for a in n.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_no_private_access_across_modules() -> None:
    problems = []
    for top in ("qmpd", "tests", "tools", "bench", "examples"):
        for path in sorted((ROOT / top).rglob("*.py")):
            problems += _problems(path)
    assert problems == []
