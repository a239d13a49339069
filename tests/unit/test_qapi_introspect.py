"""query-qmp-schema: QEMU's SchemaInfo shape, masking, builtins, filtering."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from qmpd.qapi import models
from qmpd.qapi.introspect import introspect
from qmpd.qapi.schema import Schema, load_schema

#: Structure of a few commands/events in QEMU 7.2.22's answer, with masked
#: names resolved (see _expand); qmpd must describe them identically.
QEMU_72 = json.loads(r'''{"query-block-jobs": {"meta-type": "command", "arg": {"members": []}, "ret": [{"members": [{"name": "type", "type": "str"}, {"name": "device", "type": "str"}, {"name": "len", "type": "int"}, {"name": "offset", "type": "int"}, {"name": "busy", "type": "bool"}, {"name": "paused", "type": "bool"}, {"name": "speed", "type": "int"}, {"name": "io-status", "type": {"enum": ["ok", "failed", "nospace"], "features": []}}, {"name": "ready", "type": "bool"}, {"name": "status", "type": {"enum": ["undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending", "aborting", "concluded", "null"], "features": []}}, {"name": "auto-finalize", "type": "bool"}, {"name": "auto-dismiss", "type": "bool"}, {"name": "error", "default": null, "type": "str"}]}]}, "block-dirty-bitmap-merge": {"meta-type": "command", "arg": {"members": [{"name": "node", "type": "str"}, {"name": "target", "type": "str"}, {"name": "bitmaps", "type": [{"alternate": ["str", {"members": [{"name": "node", "type": "str"}, {"name": "name", "type": "str"}]}]}]}]}, "ret": {"members": []}}, "JOB_STATUS_CHANGE": {"meta-type": "event", "arg": {"members": [{"name": "id", "type": "str"}, {"name": "status", "type": {"enum": ["undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending", "aborting", "concluded", "null"], "features": []}}]}}, "x-debug-block-dirty-bitmap-sha256": {"meta-type": "command", "features": ["unstable"], "arg": {"members": [{"name": "node", "type": "str"}, {"name": "name", "type": "str"}]}, "ret": {"members": [{"name": "sha256", "type": "str"}]}}, "query-tpm": {"meta-type": "command", "arg": {"members": []}, "ret": [{"members": [{"name": "id", "type": "str"}, {"name": "model", "type": {"enum": ["tpm-tis", "tpm-crb", "tpm-spapr"], "features": []}}, {"name": "options", "type": {"members": [{"name": "type", "type": {"enum": ["passthrough", "emulator"], "features": []}}], "tag": "type", "variants": {"passthrough": {"members": [{"name": "data", "type": {"members": [{"name": "path", "default": null, "type": "str"}, {"name": "cancel-path", "default": null, "type": "str"}]}}]}, "emulator": {"members": [{"name": "data", "type": {"members": [{"name": "chardev", "type": "str"}]}}]}}}}]}]}, "BLOCK_JOB_ERROR": {"meta-type": "event", "arg": {"members": [{"name": "device", "type": "str"}, {"name": "operation", "type": {"enum": ["read", "write"], "features": []}}, {"name": "action", "type": {"enum": ["ignore", "report", "stop"], "features": []}}]}}, "qmp_capabilities": {"meta-type": "command", "arg": {"members": [{"name": "enable", "default": null, "type": [{"enum": ["oob"], "features": []}]}]}, "ret": {"members": []}}}''')

_KEY_ORDER = {
    "command": [("name", "ret-type", "meta-type", "arg-type"),
                ("name", "ret-type", "meta-type", "arg-type", "features"),
                ("name", "ret-type", "allow-oob", "meta-type", "arg-type")],
    "event": [("name", "meta-type", "arg-type")],
    "object": [("name", "members", "meta-type"), ("name", "members", "meta-type", "features"),
               ("name", "tag", "variants", "members", "meta-type")],
    "enum": [("name", "members", "meta-type", "values")],
    "array": [("name", "element-type", "meta-type")],
    "builtin": [("name", "json-type", "meta-type")],
    "alternate": [("name", "members", "meta-type")],
}


@pytest.fixture(scope="module")
def schema() -> Schema:
    return load_schema()


@pytest.fixture(scope="module")
def full(schema: Schema) -> list[dict[str, Any]]:
    return introspect(schema)


def _expand(entries: list[dict[str, Any]], name: str, stack: tuple[str, ...] = ()) -> Any:
    """Resolve masked references into a nested structure."""
    e = {x["name"]: x for x in entries}[name]
    mt = e["meta-type"]
    if mt in ("command", "event"):
        out = {k: v for k, v in e.items() if k not in ("name", "arg-type", "ret-type")}
        out["arg"] = _expand(entries, e["arg-type"])
        if "ret-type" in e:
            out["ret"] = _expand(entries, e["ret-type"])
        return out
    if mt == "builtin":
        return name
    if mt == "array":
        return [_expand(entries, e["element-type"], stack)]
    if name in stack:
        return "<recursive>"
    st = (*stack, name)
    if mt == "enum":
        return {"enum": e["values"], "features": [m for m in e["members"] if "features" in m]}
    if mt == "alternate":
        return {"alternate": [_expand(entries, m["type"], st) for m in e["members"]]}
    out = {"members": [{**m, "type": _expand(entries, m["type"], st)} for m in e["members"]]}
    if "tag" in e:
        out["tag"] = e["tag"]
        out["variants"] = {v["case"]: _expand(entries, v["type"], st) for v in e["variants"]}
    if "features" in e:
        out["features"] = e["features"]
    return out


@pytest.mark.parametrize("name", sorted(QEMU_72))
def test_same_structure_as_qemu(full: list[dict[str, Any]], name: str) -> None:
    assert _expand(full, name) == QEMU_72[name]


def test_entry_shapes_and_key_order(full: list[dict[str, Any]]) -> None:
    for e in full:
        assert tuple(e) in _KEY_ORDER[e["meta-type"]], e
        for m in e.get("members", []):
            if e["meta-type"] == "object":
                assert tuple(m) in {("name", "type"), ("name", "default", "type"),
                                    ("name", "type", "features"), ("name", "default", "type", "features")}
                assert m.get("default", None) is None
    # commands and events first, then types
    kinds = [e["meta-type"] in ("command", "event") for e in full]
    assert kinds == sorted(kinds, reverse=True)


def test_masking_in_order_of_first_use(full: list[dict[str, Any]]) -> None:
    seen: list[str] = []
    for e in full:
        refs = [e.get("arg-type"), e.get("ret-type"), e.get("element-type")]
        refs += [m.get("type") for m in e.get("members", []) if isinstance(m, dict)]
        refs += [v["type"] for v in e.get("variants", [])]
        for r in refs:
            for num in re.findall(r"\d+", r or ""):
                if num not in seen:
                    seen.append(num)
    assert seen == [str(i) for i in range(len(seen))]
    names = {e["name"] for e in full if e["meta-type"] in ("object", "enum", "alternate")}
    assert names == set(seen)
    assert all(e["name"].isdigit() for e in full if e["meta-type"] in ("object", "enum", "alternate"))
    assert not any(e["name"][0].isupper() for e in full if e["meta-type"] not in ("event",))


def test_builtins_and_arrays(full: list[dict[str, Any]]) -> None:
    builtins = {e["name"]: e["json-type"] for e in full if e["meta-type"] == "builtin"}
    # "null" is used by BlockdevRefOrNull (a qcow2 node's backing), as in QEMU.
    assert builtins == {"str": "string", "int": "int", "bool": "boolean", "any": "value",
                        "null": "null"}
    arrays = [e for e in full if e["meta-type"] == "array"]
    assert all(a["name"] == f"[{a['element-type']}]" for a in arrays)
    assert {"name": "[str]", "element-type": "str", "meta-type": "array"} in arrays
    # uint32 granularity is reported as int
    add = _expand(full, "block-dirty-bitmap-add")
    assert {"name": "granularity", "default": None, "type": "int"} in add["arg"]["members"]


def test_features_and_empty_object(full: list[dict[str, Any]]) -> None:
    by = {e["name"]: e for e in full}
    assert by["drive-backup"]["features"] == ["deprecated"]
    assert by["x-debug-block-dirty-bitmap-sha256"]["features"] == ["unstable"]
    backup = _expand(full, "blockdev-backup")
    xperf = next(m for m in backup["arg"]["members"] if m["name"] == "x-perf")
    assert xperf["features"] == ["unstable"]
    quit_ = by["quit"]
    assert quit_["arg-type"] == quit_["ret-type"]
    assert by[quit_["arg-type"]] == {"name": quit_["arg-type"], "members": [], "meta-type": "object"}
    assert not any("allow-oob" in e for e in full)
    kinds = _expand(full, "transaction")["arg"]["members"][0]["type"][0]["members"][0]["type"]
    assert kinds["features"] == [{"name": "drive-backup", "features": ["deprecated"]}]


def test_union_variants(full: list[dict[str, Any]]) -> None:
    add = _expand(full, "blockdev-add")["arg"]
    assert add["tag"] == "driver"
    assert set(add["variants"]) == {"blkdebug", "copy-before-write", "file", "null-aio", "null-co",
                                    "qcow2", "raw", "snapshot-access"}
    raw_file = next(m for m in add["variants"]["raw"]["members"] if m["name"] == "file")
    assert raw_file["type"] == {"alternate": ["<recursive>", "str"]}
    create = _expand(full, "blockdev-create")["arg"]["members"][1]["type"]
    assert create["variants"]["raw"] == {"members": []}          # padded with the empty object


def test_only_implemented_commands(schema: Schema) -> None:
    small = introspect(schema, {"query-version", "qmp_capabilities", "not-a-command"})
    commands = [e["name"] for e in small if e["meta-type"] == "command"]
    assert commands == ["qmp_capabilities", "query-version"]
    assert {e["name"] for e in small if e["meta-type"] == "event"} == set(schema.events)
    # nothing that only blockdev-add uses survives, and numbering restarts densely
    assert not any(e["meta-type"] == "enum" and "null-co" in e["values"] for e in small)
    masked = sorted(int(e["name"]) for e in small if e["name"].isdigit())
    assert masked == list(range(len(masked)))
    assert _expand(small, "query-version") == _expand(introspect(schema), "query-version")


def test_checked_in_introspection_is_the_full_answer(schema: Schema, full: list[dict[str, Any]]) -> None:
    from qmpd.qapi.schema import default_schema_dir
    text = (default_schema_dir() / "qmpd.introspect.json").read_text()
    assert json.loads(text) == full
    assert len([e for e in full if e["meta-type"] == "command"]) == len(models.COMMAND_ARGS)
