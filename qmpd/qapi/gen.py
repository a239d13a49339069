"""``python -m qmpd.qapi.gen [--check]``: regenerate the checked-in outputs.

From ``schema/qmpd.json`` (and its includes) it writes:

* ``schema/qmpd.schema.json``     JSON Schema, see :mod:`qmpd.qapi.jsonschema`
* ``schema/qmpd.introspect.json`` the full ``query-qmp-schema`` answer
* ``qmpd/qapi/models.py``         pydantic models, see :mod:`qmpd.qapi.modelgen`
* ``schema/qmpd.expr.json``       the parsed expressions, see :mod:`qmpd.qapi.exprcache`

``--check`` writes nothing and exits 1 when any output is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qmpd.errors import SchemaError
from qmpd.qapi.builder import build
from qmpd.qapi.exprcache import CACHE_NAME, render_cache
from qmpd.qapi.introspect import introspect
from qmpd.qapi.jsonschema import to_json_schema
from qmpd.qapi.loader import load
from qmpd.qapi.modelgen import generate_models
from qmpd.qapi.schema import Schema, default_schema_dir

__all__ = ["render", "main"]


def _dump_lines(entries: list[Any]) -> str:
    return "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n"


def render(schema: Schema, schema_dir: Path | None = None) -> dict[Path, str]:
    """:return: every generated file's path and its expected content."""
    sdir = schema_dir or default_schema_dir()
    return {
        sdir / "qmpd.schema.json": json.dumps(to_json_schema(schema), indent=1) + "\n",
        sdir / "qmpd.introspect.json": _dump_lines(introspect(schema)),
        Path(__file__).resolve().parent / "models.py": generate_models(schema),
        sdir / CACHE_NAME: render_cache(sdir / "qmpd.json"),
    }


def stale(schema_dir: Path | None = None) -> list[Path]:
    """:return: generated files whose content differs from a fresh generation."""
    sdir = schema_dir or default_schema_dir()
    out = []
    for path, text in render(build(load(sdir / "qmpd.json")), sdir).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; :return: the exit status."""
    parser = argparse.ArgumentParser(prog="python -m qmpd.qapi.gen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale outputs")
    parser.add_argument("--schema-dir", type=Path, default=default_schema_dir())
    args = parser.parse_args(argv)
    try:
        schema = build(load(args.schema_dir / "qmpd.json"))
    except SchemaError as err:
        print(f"qapi-gen: {err}", file=sys.stderr)
        return 1
    status = 0
    for path, text in render(schema, args.schema_dir).items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            print(f"stale: {path}", file=sys.stderr)
            status = 1
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
