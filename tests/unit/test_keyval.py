"""--blockdev style key=value strings, typed by the schema."""

from __future__ import annotations

import pytest

from qmpd.errors import GenericError
from qmpd.qapi.keyval import parse_keyval, parse_option_value
from qmpd.qapi.schema import load_schema


def test_nesting_lists_and_escaped_commas() -> None:
    assert parse_keyval("driver=raw,file.driver=file,file.filename=/a,,b.img,x.0.y=1,x.1.y=2") == {
        "driver": "raw", "file": {"driver": "file", "filename": "/a,b.img"}, "x": [{"y": "1"}, {"y": "2"}]}


@pytest.mark.parametrize("text,desc", [
    ("driver", "Expected '=' after parameter 'driver'"),
    ("a=1,a=2", "Parameter 'a' is set more than once"),
    ("a..b=1", "Invalid parameter 'a..b'"),
])
def test_malformed(text: str, desc: str) -> None:
    with pytest.raises(GenericError) as info:
        parse_keyval(text)
    assert info.value.desc == desc


def test_typed_by_schema() -> None:
    options = load_schema().lookup_type("BlockdevOptions")
    assert parse_option_value(
        "driver=blkdebug,node-name=d,image.driver=file,image.filename=/x,read-only=on,"
        "inject-error.0.event=read_aio,inject-error.0.errno=5,inject-error.0.once=off", options) == {
        "driver": "blkdebug", "node-name": "d", "image": {"driver": "file", "filename": "/x"}, "read-only": True,
        "inject-error": [{"event": "read_aio", "errno": 5, "once": False}]}
    assert parse_option_value('{"driver": "null-co", "node-name": "n"}', options) == {
        "driver": "null-co", "node-name": "n"}
