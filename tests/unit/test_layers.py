"""Imports only go downward (STYLE.md): a forbidden import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qmpd"

LAYER = {
    "errors": 0, "tasks": 0, "lazy": 0,
    "protocol": 1, "qapi": 1, "bitmap": 1,
    "block": 2, "events": 2, "jobs": 2, "machine": 2,
    "commands": 3,
    "server": 4, "nbd": 4, "web": 4,
    "cli": 5,
}
# Modules whose layer differs from their package's (STYLE.md, "Where this
# turn's new parts live"): the NBD wire codec is sans-I/O like protocol/.
MODULE_LAYER = {"nbd.protocol": 1}
# Same-layer imports that the architecture allows.
ALLOWED_SIDEWAYS = {("block", "bitmap"), ("jobs", "block"), ("jobs", "bitmap"), ("jobs", "events"),
                    ("machine", "block"), ("machine", "bitmap"), ("machine", "events"),
                    ("jobs", "machine"),
                    ("nbd", "server"), ("server", "nbd"), ("web", "server"), ("server", "web")}
NO_ASYNCIO = {"protocol", "bitmap", "qapi", "nbd.protocol"}


def _package_of(path: Path) -> str | None:
    rel = path.relative_to(PKG)
    head = rel.parts[0].removesuffix(".py")
    return head if head in LAYER else None


def _layer_of(module: str) -> int:
    """Layer of a dotted module below ``qmpd`` (``nbd.protocol``, ``block.io``)."""
    for prefix, layer in MODULE_LAYER.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return LAYER[module.split(".")[0]]


def test_imports_go_downward() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        pkg = _package_of(path)
        if pkg is None:
            continue
        own = ".".join(path.relative_to(PKG).with_suffix("").parts)
        own_layer = _layer_of(own)
        own_key = next((m for m in MODULE_LAYER if own == m or own.startswith(m + ".")), pkg)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("asyncio", "uvloop") and own_key in NO_ASYNCIO:
                    problems.append(f"{path}: {own_key} must stay free of asyncio")
                if not name.startswith("qmpd."):
                    continue
                target = name.split(".")[1]
                if target not in LAYER or target == pkg:
                    continue
                target_layer = _layer_of(name.removeprefix("qmpd."))
                up = target_layer > own_layer
                sideways = target_layer == own_layer and (pkg, target) not in ALLOWED_SIDEWAYS
                if up or sideways:
                    problems.append(f"{path}: {own} (L{own_layer}) imports {name} (L{target_layer})")
    assert problems == []
