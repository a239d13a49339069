"""The checked-in parsed expressions (schema/qmpd.expr.json) stand for the
QAPI files exactly, and are ignored the moment a QAPI file differs."""

from __future__ import annotations

import shutil
from pathlib import Path

from qmpd.qapi.builder import build
from qmpd.qapi.exprcache import CACHE_NAME, load_cached
from qmpd.qapi.introspect import introspect
from qmpd.qapi.loader import load
from qmpd.qapi.modelgen import generate_models
from qmpd.qapi.schema import default_schema_dir


def test_cache_gives_the_same_expressions_and_schema() -> None:
    top = default_schema_dir() / "qmpd.json"
    cached, parsed = load_cached(top), load(top)
    assert cached == parsed
    a, b = build(cached), build(parsed)
    assert introspect(a) == introspect(b)
    assert generate_models(a) == generate_models(b)


def test_an_edited_schema_file_is_parsed_not_taken_from_the_stale_cache(tmp_path: Path) -> None:
    sdir = tmp_path / "schema"
    shutil.copytree(default_schema_dir(), sdir)
    assert (sdir / CACHE_NAME).exists()
    with (sdir / "misc.json").open("a", encoding="utf-8") as f:
        f.write("\n{ 'command': 'x-cache-probe' }\n")
    exprs = load_cached(sdir / "qmpd.json")
    assert exprs == load(sdir / "qmpd.json")
    assert "x-cache-probe" in build(exprs).commands


def test_a_missing_or_broken_cache_falls_back_to_parsing(tmp_path: Path) -> None:
    sdir = tmp_path / "schema"
    shutil.copytree(default_schema_dir(), sdir)
    (sdir / CACHE_NAME).write_text("{not json", encoding="utf-8")
    assert load_cached(sdir / "qmpd.json") == load(sdir / "qmpd.json")
    (sdir / CACHE_NAME).unlink()
    assert load_cached(sdir / "qmpd.json") == load(sdir / "qmpd.json")
