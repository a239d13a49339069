"""Argument validation: QEMU's exact texts (recorded from QEMU 7.2.22), wrapping, models.

Every (command, arguments, message) row below was checked against
``qemu-system-x86_64 -machine none`` 7.2.22, except the few rows marked
"qmpd" (commands QEMU does not have in that shape).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.errors import CommandNotFound, GenericError
from qmpd.qapi import models
from qmpd.qapi.ghash import first_remaining_key
from qmpd.qapi.validate import ArgumentValidator
from qmpd.qapi.walk import first_error


@pytest.fixture(scope="module")
def validator() -> ArgumentValidator:
    return ArgumentValidator()


def _raw(file: Any, **extra: Any) -> dict[str, Any]:
    return {"driver": "raw", "node-name": "n", "file": file, **extra}


def _dbg(**extra: Any) -> dict[str, Any]:
    return _raw({"driver": "blkdebug", "image": "x", **extra})


BB = {"device": "x", "target": "t", "sync": "full"}

CASES: list[tuple[str, dict[str, Any], str]] = [
    # unsigned integers: range (bare name, "_t"), non-numbers, wrap
    ("block-dirty-bitmap-add", {"node": "x", "name": "y", "granularity": 2**33},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "x", "name": "y", "granularity": -1},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "x", "name": "y", "granularity": "a"},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "x", "name": "y", "granularity": 1.5},
     "Parameter 'granularity' expects uint64"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": "x"},
     "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": 2**64},
     "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "n", "file": "a",
                      "target": "b", "cbw-timeout": -1}, "Parameter 'cbw-timeout' expects uint32_t"),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "n", "file": "a",
                      "target": "b", "cbw-timeout": -(2**63) - 1}, "Parameter 'cbw-timeout' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "/x", "size": "x"}},
     "Parameter 'options.size' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "/x", "size": 1.5}},
     "Parameter 'options.size' expects uint64"),
    # signed integers
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 2**63},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1.0},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", _dbg(**{"max-transfer": 2**31}), "Parameter 'max-transfer' expects int32_t"),
    ("blockdev-add", _dbg(**{"max-transfer": -(2**31) - 1}), "Parameter 'max-transfer' expects int32_t"),
    ("blockdev-add", _dbg(**{"max-transfer": "x"}),
     "Invalid parameter type for 'file.max-transfer', expected: integer"),
    ("blockdev-backup", {**BB, "x-perf": {"max-workers": 1.5}},
     "Invalid parameter type for 'x-perf.max-workers', expected: integer"),
    ("blockdev-backup", {**BB, "speed": True}, "Invalid parameter type for 'speed', expected: integer"),
    ("human-monitor-command", {"command-line": "x", "cpu-index": 1e3},
     "Invalid parameter type for 'cpu-index', expected: integer"),
    # other scalar types
    ("blockdev-backup", {**BB, "compress": "yes"}, "Invalid parameter type for 'compress', expected: boolean"),
    ("blockdev-backup", {**BB, "device": 5}, "Invalid parameter type for 'device', expected: string"),
    ("query-named-block-nodes", {"flat": None}, "Invalid parameter type for 'flat', expected: boolean"),
    ("blockdev-backup", {**BB, "x-perf": 5}, "Invalid parameter type for 'x-perf', expected: object"),
    ("transaction", {"actions": {}}, "Invalid parameter type for 'actions', expected: array"),
    # enums
    ("blockdev-backup", {**BB, "sync": "fully"}, "Parameter 'sync' does not accept value 'fully'"),
    ("blockdev-backup", {**BB, "sync": 5}, "Invalid parameter type for 'sync', expected: string"),
    ("blockdev-add", _dbg(**{"inject-error": [{"event": "read_aio"}, {"event": "nope"}]}),
     "Parameter 'event' does not accept value 'nope'"),
    ("blockdev-add", _dbg(**{"take-child-perms": ["write", "x"]}),
     "Parameter 'null' does not accept value 'x'"),
    ("blockdev-add", _dbg(**{"take-child-perms": ["write", 5]}),
     "Invalid parameter type for 'file.take-child-perms[1]', expected: string"),
    ("qmp_capabilities", {"enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
    # unions: the tag first, in base order
    ("blockdev-add", {"driver": "qqq"}, "Parameter 'driver' does not accept value 'qqq'"),
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"node-name": 5}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", _raw("q", discard="x", zz=1), "Parameter 'discard' does not accept value 'x'"),
    ("transaction", {"actions": [{"type": "nope", "data": {}}]}, "Parameter 'type' does not accept value 'nope'"),
    ("transaction", {"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    # missing / unexpected, nested paths
    ("blockdev-add", _raw({"driver": "file"}), "Parameter 'file.filename' is missing"),
    ("blockdev-add", _raw({"driver": "file", "filename": "/x", "bogus": 1}, zz=1),
     "Parameter 'file.bogus' is unexpected"),
    ("blockdev-add", _dbg(**{"inject-error": [{"event": "read_aio"}, {}]}),
     "Parameter 'file.inject-error[1].event' is missing"),
    ("blockdev-add", _dbg(**{"inject-error": [{"event": "read_aio"}, 5]}),
     "Invalid parameter type for 'file.inject-error[1]', expected: object"),
    ("transaction", {"actions": [{"type": "abort", "data": {}},
                                 {"type": "block-dirty-bitmap-add", "data": {"name": "x"}}]},
     "Parameter 'actions[1].data.node' is missing"),
    ("transaction", {"actions": [{"type": "abort"}]}, "Parameter 'actions[0].data' is missing"),
    ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]},
     "Parameter 'actions[0].data.x' is unexpected"),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [{"node": "a"}]},
     "Parameter 'bitmaps[0].name' is missing"),
    # alternates: bare name, 'null' inside lists
    ("blockdev-add", _raw(5), "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", _raw({"driver": "raw", "file": 5}),
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("transaction", {"actions": [{"type": "abort", "data": {}},
                                 {"type": "block-dirty-bitmap-merge",
                                  "data": {"node": "n", "target": "t", "bitmaps": ["a", 5]}}]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [None]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    # unexpected keys: GLib hash order, not input order
    ("quit", {"x": 1, "y": 2}, "Parameter 'y' is unexpected"),
    ("query-version", {"b": 1, "a": 2, "c": 3}, "Parameter 'b' is unexpected"),
    ("query-named-block-nodes", {"flat": True, **{k: 1 for k in "abcdefghi"}}, "Parameter 'b' is unexpected"),
    ("query-named-block-nodes", {k: 1 for k in "ihgfedcba"}, "Parameter 'b' is unexpected"),
    # qmpd-only shapes
    ("query-status", {"x": 1}, "Parameter 'x' is unexpected"),
    ("block-job-set-speed", {"device": "j"}, "Parameter 'speed' is missing"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "raw"}}, "OK"),
]


@pytest.mark.parametrize("command, arguments, message", CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_qemu_texts(validator: ArgumentValidator, command: str, arguments: dict[str, Any],
                    message: str) -> None:
    if message == "OK":
        validator.validate(command, arguments)
        return
    with pytest.raises(GenericError) as info:
        validator.validate(command, arguments)
    assert info.value.desc == message
    assert info.value.error_class == "GenericError"


def test_uint64_wraps_negative_values(validator: ArgumentValidator) -> None:
    args = {"driver": "null-co", "node-name": "n", "latency-ns": -1}
    validator.validate("blockdev-add", args)
    assert validator.normalize("blockdev-add", args)["latency-ns"] == 2**64 - 1
    model = validator.parse("blockdev-add", args)
    assert isinstance(model, models.BlockdevAddArgs)
    assert isinstance(model.root, models.BlockdevOptionsNullCoBranch)
    assert model.root.latency_ns == 2**64 - 1
    assert args["latency-ns"] == -1                       # input untouched
    size = {"job-id": "j", "options": {"driver": "file", "filename": "/x", "size": -(2**63)}}
    assert validator.normalize("blockdev-create", size)["options"]["size"] == 2**63


def test_valid_arguments_build_models(validator: ArgumentValidator) -> None:
    m = validator.parse("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 65536})
    assert isinstance(m, models.BlockDirtyBitmapAddArgs) and m.granularity == 65536
    assert m.model_dump(by_alias=True, exclude_none=True) == {"node": "n", "name": "b", "granularity": 65536}
    t = validator.parse("transaction", {"actions": [
        {"type": "blockdev-backup", "data": {**BB, "x-perf": {"max-workers": 1}}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "n", "target": "t",
                                                      "bitmaps": ["a", {"node": "m", "name": "b"}]}},
        {"type": "abort", "data": {}}]})
    assert isinstance(t, models.TransactionArgs)
    backup, merge, abort = t.actions
    assert isinstance(backup, models.TransactionActionBlockdevBackupBranch)
    assert backup.data.sync is models.MirrorSyncMode.FULL and backup.data.x_perf is not None
    assert isinstance(merge, models.TransactionActionBlockDirtyBitmapMergeBranch)
    assert merge.data.bitmaps[1] == models.BlockDirtyBitmap(node="m", name="b")
    assert isinstance(abort, models.TransactionActionAbortBranch)
    bd = validator.parse("blockdev-add", {"driver": "raw", "node-name": "d", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": "/f"},
        "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}]}})
    assert isinstance(bd, models.BlockdevAddArgs)
    assert isinstance(bd.root, models.BlockdevOptionsRawBranch)
    dbg = bd.root.file
    assert isinstance(dbg, models.BlockdevOptionsBlkdebugBranch) and dbg.set_state is not None
    assert dbg.set_state[0].new_state == 2


def test_no_argument_commands(validator: ArgumentValidator) -> None:
    for name in ("query-version", "quit", "query-jobs", "query-block-jobs", "query-qmp-schema"):
        validator.validate(name, {})
        assert validator.parse(name, {}) == models.COMMAND_ARGS[name]()


def test_unknown_command(validator: ArgumentValidator) -> None:
    with pytest.raises(CommandNotFound, match="The command nope has not been found"):
        validator.validate("nope", {})


def test_every_command_has_models() -> None:
    from qmpd.qapi.schema import load_schema
    schema = load_schema()
    assert set(models.COMMAND_ARGS) == set(schema.commands) == set(models.COMMAND_RETURNS)
    assert set(models.EVENT_DATA) == set(schema.events)
    assert models.COMMAND_RETURNS["query-block-jobs"] == list[models.BlockJobInfo]
    data = models.EVENT_DATA["JOB_STATUS_CHANGE"].model_validate({"id": "j", "status": "null"})
    assert data.model_dump(mode="json", by_alias=True) == {"id": "j", "status": "null"}


def test_ghash_order_falls_back_safely() -> None:
    assert first_remaining_key(["x"], []) == "x"
    assert first_remaining_key(["a", "zz"], ["a"]) == "zz"


# -- jsonschema and the QAPI walker agree on validity --------------------------------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**65), max_value=2**65),
                  st.floats(allow_nan=False, allow_infinity=False),
                  st.sampled_from(["", "n", "full", "bitmap", "raw", "file", "null-co", "read_aio",
                                   "abort", "blockdev-backup", "block-dirty-bitmap-add", "on-success"]))
_keys = st.sampled_from(["node", "name", "driver", "node-name", "file", "filename", "device", "target",
                         "sync", "bitmap", "bitmap-mode", "granularity", "actions", "type", "data",
                         "bitmaps", "x-perf", "max-workers", "latency-ns", "size", "image",
                         "inject-error", "event", "new_state", "speed", "id", "bogus"])
_json = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=5)), max_leaves=12)

_COMMANDS = ["blockdev-add", "transaction", "block-dirty-bitmap-add", "block-dirty-bitmap-merge",
             "blockdev-backup", "drive-backup", "blockdev-create", "block-job-set-speed",
             "query-named-block-nodes", "qmp_capabilities", "quit"]


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_keys, _json, max_size=3).map(lambda extra: {**base, **extra})


_SEEDS = [
    ("blockdev-add", _raw({"driver": "file", "filename": "/x"})),
    ("blockdev-add", _dbg(**{"inject-error": [{"event": "read_aio"}]})),
    ("blockdev-add", {"driver": "null-co", "node-name": "n"}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "b"}}]}),
    ("blockdev-backup", dict(BB)),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": ["a"]}),
]


def _agree(validator: ArgumentValidator, command: str, args: dict[str, Any]) -> None:
    js_valid = validator.json_validator(command).is_valid(args)
    msg = first_error(validator.arg_type(command), args)
    assert js_valid == (msg is None), (command, args, msg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(_COMMANDS), args=st.dictionaries(_keys, _json, max_size=6))
def test_walker_agrees_with_jsonschema_random(validator: ArgumentValidator, command: str,
                                              args: dict[str, Any]) -> None:
    _agree(validator, command, args)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=st.sampled_from(_SEEDS))
def test_walker_agrees_with_jsonschema_near_valid(validator: ArgumentValidator, data: st.DataObject,
                                                  seed: tuple[str, dict[str, Any]]) -> None:
    command, base = seed
    _agree(validator, command, data.draw(_mutations(base)))
    _agree(validator, "transaction", {"actions": [data.draw(_mutations({"type": "blockdev-backup",
                                                                         "data": dict(BB)}))]})


def test_empty_arguments_shortcut_agrees_with_json_schema(validator: ArgumentValidator) -> None:
    """``{}`` is accepted without a jsonschema validator where no member is
    required (the first commands need not wait for jsonschema): for every
    command, the answer is still the JSON Schema's."""
    wrong = []
    for name in validator.schema.commands:
        try:
            validator.validate(name, {})
            accepted = True
        except GenericError:
            accepted = False
        if accepted != validator.json_validator(name).is_valid({}):
            wrong.append(name)
    assert wrong == []
