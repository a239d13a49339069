"""QAPI loader and schema builder: syntax, includes, file:line errors, checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpd.errors import SchemaError
from qmpd.qapi.builder import build
from qmpd.qapi.loader import load, parse_text
from qmpd.qapi.schema import ArrayType, EnumType, ObjectType, load_schema


def _build(text: str) -> object:
    return build(parse_text(text, "t.json"))


def test_parse_comments_quotes_and_lines() -> None:
    exprs = parse_text(
        "# comment\n{ 'enum': 'E', # trailing\n  'data': [ 'a', 'b\\'c' ] }\n\n"
        "{ 'struct': 'S', 'data': { '*x': 'E' }, 'boxed': false }\n", "f.json")
    assert [e.info.line for e in exprs] == [2, 5]
    assert str(exprs[0].info) == "f.json:2"
    assert exprs[0].expr == {"enum": "E", "data": ["a", "b'c"]}
    assert exprs[1].expr["boxed"] is False


@pytest.mark.parametrize("text, line, fragment", [
    ("{ 'enum': 'E',\n  'data': [ 'a' }", 2, "expected ',' or ']'"),
    ("{ \"enum\": 'E' }", 1, "stray '\"'"),
    ("{ 'enum': 'E', 'enum': 'F' }", 1, "duplicate key 'enum'"),
    ("\n\n{ 'enum': 'E", 3, "missing terminating"),
    ("[ 'a' ]", 1, "expected '{' at top level"),
    ("{ 'a': 1 }", 1, "stray '1'"),
    ("{ 'a': 'x\\q' }", 1, "unknown escape"),
])
def test_syntax_errors_carry_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(SchemaError) as info:
        parse_text(text, "bad.json")
    assert str(info.value).startswith(f"bad.json:{line}: ")
    assert fragment in str(info.value)


def test_includes_spliced_in_place_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.json").write_text(
        "{ 'enum': 'A', 'data': [] }\n{ 'include': 'sub/x.json' }\n"
        "{ 'include': 'sub/x.json' }\n{ 'enum': 'C', 'data': [] }\n")
    (tmp_path / "sub" / "x.json").write_text("# x\n{ 'enum': 'B', 'data': [] }\n")
    exprs = load(tmp_path / "top.json")
    assert [e.expr["enum"] for e in exprs] == ["A", "B", "C"]
    assert str(exprs[1].info) == "sub/x.json:2"


def test_include_loop_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{ 'include': 'b.json' }\n")
    (tmp_path / "b.json").write_text("\n{ 'include': 'a.json' }\n")
    with pytest.raises(SchemaError, match=r"^b.json:2: inclusion loop"):
        load(tmp_path / "a.json")
    (tmp_path / "c.json").write_text("{ 'include': 'nope.json' }\n")
    with pytest.raises(SchemaError, match="nope.json: can't read"):
        load(tmp_path / "c.json")


@pytest.mark.parametrize("text, fragment", [
    ("{ 'struct': 'S', 'data': { 'x': 'Nope' } }", "unknown type 'Nope'"),
    ("{ 'struct': 'S', 'data': {}, 'bogus': true }", "unknown key(s) bogus"),
    ("{ 'enum': 'E', 'data': ['a'] }\n{ 'enum': 'E', 'data': ['b'] }", "t.json:2: 'E' is already defined"),
    ("{ 'enum': 'E', 'data': ['a'] }\n{ 'struct': 'B', 'data': { 'k': 'E' } }\n"
     "{ 'struct': 'X', 'data': {} }\n"
     "{ 'union': 'U', 'base': 'B', 'discriminator': 'nope', 'data': {} }",
     "t.json:4: discriminator 'nope' is not a member"),
    ("{ 'enum': 'E', 'data': ['a'] }\n{ 'struct': 'X', 'data': {} }\n"
     "{ 'union': 'U', 'base': { '*k': 'E' }, 'discriminator': 'k', 'data': { 'a': 'X' } }",
     "must be a mandatory enum"),
    ("{ 'enum': 'E', 'data': ['a'] }\n{ 'struct': 'X', 'data': {} }\n"
     "{ 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'b': 'X' } }",
     "branch 'b' is not a value of E"),
    ("{ 'alternate': 'A', 'data': { 'a': 'str', 'b': 'str' } }", "can't be told from"),
    ("{ 'struct': 'S', 'data': { 'Bad_Name': 'str' } }", "should be lower-case"),
    ("{ 'command': 'Bad_Cmd' }", "should be lower-case"),
    ("{ 'command': 'c', 'returns': 'str' }", "cannot return 'str'"),
    ("{ 'struct': 'B', 'data': { 'a': 'str' } }\n"
     "{ 'struct': 'S', 'base': 'B', 'data': { 'a': 'int' } }", "duplicate member(s) a"),
    ("{ 'struct': 'lower', 'data': {} }", "CamelCase"),
])
def test_semantic_errors(text: str, fragment: str) -> None:
    with pytest.raises(SchemaError) as info:
        _build(text)
    assert str(info.value).startswith("t.json:")
    assert fragment in str(info.value)


def test_pragma_exceptions_allow_odd_names() -> None:
    schema = build(parse_text(
        "{ 'pragma': { 'member-name-exceptions': ['S'], 'command-name-exceptions': ['odd_cmd'],"
        " 'command-returns-exceptions': ['odd_cmd'] } }\n"
        "{ 'struct': 'S', 'data': { 'new_state': 'int' } }\n"
        "{ 'command': 'odd_cmd', 'returns': 'str' }\n"))
    assert "odd_cmd" in schema.commands


def test_real_schema_shapes() -> None:
    schema = load_schema()
    add = schema.command("blockdev-add")
    assert add.boxed and add.arg_type is not None and add.arg_type.name == "BlockdevOptions"
    backup = schema.lookup_type("BlockdevBackup")
    assert isinstance(backup, ObjectType)
    names = [m.name for m in backup.members]
    assert names[:3] == ["job-id", "device", "sync"] and names[-1] == "target"
    xperf = next(m for m in backup.members if m.name == "x-perf")
    assert xperf.optional and xperf.features == ["unstable"]
    assert schema.command("drive-backup").features == ["deprecated"]
    assert schema.command("x-debug-block-dirty-bitmap-sha256").features == ["unstable"]
    event = schema.lookup_type("BlkdebugEvent")
    assert isinstance(event, EnumType) and len(event.values) == 48
    perms = schema.lookup_type("BlockdevOptionsBlkdebug")
    assert isinstance(perms, ObjectType)
    assert isinstance(perms.local_members[-1].type, ArrayType)
    create = schema.lookup_type("BlockdevCreateOptions")
    assert isinstance(create, ObjectType) and create.variants is not None
    assert create.variants.lookup("raw").type is schema.empty_object   # padded like QEMU
    assert {"SHUTDOWN", "JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
            "BLOCK_JOB_ERROR", "BLOCK_JOB_READY", "BLOCK_JOB_PENDING", "BLOCK_EXPORT_DELETED",
            "BLOCK_IMAGE_CORRUPTED", "STOP", "RESUME"} <= set(schema.events)
    assert "stop" in schema.commands and "cont" in schema.commands
