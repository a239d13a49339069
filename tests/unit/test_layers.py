"""Imports only go downward (STYLE.md): a forbidden import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qmpd"

LAYER = {
    "errors": 0,
    "protocol": 1, "qapi": 1, "bitmap": 1,
    "block": 2, "events": 2, "jobs": 2,
    "commands": 3,
    "server": 4,
    "cli": 5,
}
# Same-layer imports that the architecture allows.
ALLOWED_SIDEWAYS = {("block", "bitmap"), ("jobs", "block"), ("jobs", "bitmap"), ("jobs", "events")}
NO_ASYNCIO = {"protocol", "bitmap", "qapi"}


def _package_of(path: Path) -> str | None:
    rel = path.relative_to(PKG)
    head = rel.parts[0].removesuffix(".py")
    return head if head in LAYER else None


def test_imports_go_downward() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        pkg = _package_of(path)
        if pkg is None:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name == "asyncio" and pkg in NO_ASYNCIO:
                    problems.append(f"{path}: {pkg} must stay free of asyncio")
                if not name.startswith("qmpd."):
                    continue
                target = name.split(".")[1]
                if target not in LAYER or target == pkg:
                    continue
                up = LAYER[target] > LAYER[pkg]
                sideways = LAYER[target] == LAYER[pkg] and (pkg, target) not in ALLOWED_SIDEWAYS
                if up or sideways:
                    problems.append(f"{path}: {pkg} (L{LAYER[pkg]}) imports {name} (L{LAYER[target]})")
    assert problems == []
