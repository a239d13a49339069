"""The parsed QAPI expressions, checked in as plain JSON (``schema/qmpd.expr.json``).

Parsing the QAPI files with :mod:`qmpd.qapi.loader` is the largest part of
loading the schema; the daemon reads this file instead (``json.loads``),
which ``python -m qmpd.qapi.gen`` writes and ``--check`` keeps fresh.  The
file records the SHA-256 of every QAPI file it came from; when any differs
(an edited schema that was not regenerated) the files are parsed as before,
so a stale cache can never change what the daemon serves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qmpd.qapi.loader import Expression, SourceInfo, load

__all__ = ["CACHE_NAME", "render_cache", "load_cached"]

#: The cache's file name, next to the top QAPI file.
CACHE_NAME = "qmpd.expr.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_cache(top: Path) -> str:
    """:return: the cache file's text for the QAPI files under *top*.

    :raise SchemaError: on syntax errors (as :func:`qmpd.qapi.loader.load`).
    """
    sources: list[Path] = []
    exprs = load(top, sources)
    root = top.resolve().parent
    digests = {str(p.relative_to(root)): _digest(p) for p in sources}
    rows = ",\n".join(json.dumps([e.info.file, e.info.line, e.expr]) for e in exprs)
    return (f'{{"sources": {json.dumps(digests, indent=1, sort_keys=True)},\n'
            f'"expressions": [\n{rows}\n]}}\n')


def _fresh(doc: dict[str, Any], root: Path) -> bool:
    try:
        return all(_digest(root / name) == digest for name, digest in doc["sources"].items())
    except OSError:
        return False


def load_cached(top: Path) -> list[Expression]:
    """:return: the expressions of *top*, from the cache when it is fresh.

    :raise SchemaError: as :func:`qmpd.qapi.loader.load` when it has to parse.
    """
    cache = top.parent / CACHE_NAME
    try:
        doc = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return load(top)
    if not isinstance(doc, dict) or not _fresh(doc, top.resolve().parent):
        return load(top)
    return [Expression(expr, SourceInfo(fname, line)) for fname, line, expr in doc["expressions"]]
