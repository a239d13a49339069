"""QMP output encoding: QEMU's compact json-writer format, exact bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qmpd.protocol import JsonStreamParser, encode
from qmpd.protocol.encode import freeze


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ({"return": {}, "id": 1}, b'{"return": {}, "id": 1}\r\n'),
        ({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}},
         b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n'),
        ({"b": 1, "a": [1, 2, 3], "c": None}, b'{"b": 1, "a": [1, 2, 3], "c": null}\r\n'),
        ([], b"[]\r\n"),
        ([True, False, None], b"[true, false, null]\r\n"),
        (2**64 - 1, b"18446744073709551615\r\n"),
        (-(2**63), b"-9223372036854775808\r\n"),
        (1.5, b"1.5\r\n"),
        (1e16, b"1e+16\r\n"),
        (-0.0, b"-0.0\r\n"),
        (math.inf, b"1e999\r\n"),
        (-math.inf, b"-1e999\r\n"),
        (math.nan, b"null\r\n"),
        ({"x": [1.0, math.inf]}, b'{"x": [1.0, 1e999]}\r\n'),
        # recorded from QEMU 7.2 (id echo)
        ("\x00\x1f\x7f\x80\u00e9\U0001f600\"\\/\b\f\n\r\t",
         b'"\\u0000\\u001F\\u007F\\u0080\\u00E9\\uD83D\\uDE00\\"\\\\/\\b\\f\\n\\r\\t"\r\n'),
        ("\u20ac\uabcd", b'"\\u20AC\\uABCD"\r\n'),
        # a literal backslash followed by "u..." stays as it is
        ("\\u00e9", b'"\\\\u00e9"\r\n'),
        ({"k\u00e9y": "v"}, b'{"k\\u00E9y": "v"}\r\n'),
    ],
)
def test_exact_bytes(value: object, wire: bytes) -> None:
    assert encode(value) == wire


def test_bool_is_not_an_int() -> None:
    assert encode({"a": True, "b": 1}) == b'{"a": true, "b": 1}\r\n'


def test_tuple_encodes_as_list() -> None:
    assert encode({"a": (1, 2)}) == b'{"a": [1, 2]}\r\n'
    assert encode({"a": (1, "x"), "b": math.inf}) == b'{"a": [1, "x"], "b": 1e999}\r\n'


def test_deep_nesting_and_slow_path_agree() -> None:
    deep: object = 1
    for _ in range(1100):
        deep = [deep]
    wire = encode(deep)
    assert wire == b"[" * 1100 + b"1" + b"]" * 1100 + b"\r\n"
    nested = {"a": [{"b": math.inf, "c": "\u00e9"}, {}], "d": []}
    assert encode(nested) == b'{"a": [{"b": 1e999, "c": "\\u00E9"}, {}], "d": []}\r\n'


def test_unencodable_raises_type_error() -> None:
    with pytest.raises(TypeError):
        encode({"a": object()})
    with pytest.raises(TypeError):
        encode({"a": math.inf, "b": object()})


def test_output_is_ascii_json_that_parses_back() -> None:
    value = {"s": "a\u0000b\u00e9\U0001f600", "n": [0, -1, 2.5, 2**64 - 1], "t": None}
    wire = encode(value)
    assert wire.endswith(b"\r\n") and wire.count(b"\n") == 1
    assert wire.isascii()
    assert json.loads(wire) == value
    assert JsonStreamParser().feed(wire) == [value]


PRETTY_GOLDEN = Path(__file__).resolve().parents[1] / "transcripts" / "pretty_monitor.json"


def _split_messages(raw: str) -> list[tuple[object, str]]:
    decoder = json.JSONDecoder()
    out: list[tuple[object, str]] = []
    pos = 0
    while pos < len(raw):
        value, end = decoder.raw_decode(raw, pos)
        assert raw.startswith("\r\n", end)
        out.append((value, raw[pos:end + 2]))
        pos = end + 2
    return out


@pytest.mark.parametrize("raw", json.loads(PRETTY_GOLDEN.read_text())["answers"])
def test_pretty_matches_qemu(raw: str) -> None:
    """Every message QEMU 7.2 printed on a ``pretty=on`` monitor
    (tests/transcripts/record_pretty.py), re-encoded byte for byte."""
    for value, text in _split_messages(raw):
        assert encode(value, pretty=True) == text.encode("ascii")


def test_pretty_shapes() -> None:
    assert encode({}, pretty=True) == b"{\r\n}\r\n"
    assert encode([], pretty=True) == b"[\r\n]\r\n"
    assert encode(7, pretty=True) == b"7\r\n"
    assert encode({"a": [1, {"b": None}], "c": "\u00e9"}, pretty=True) == (
        b'{\r\n    "a": [\r\n        1,\r\n        {\r\n            "b": null\r\n        }\r\n    ],'
        b'\r\n    "c": "\\u00E9"\r\n}\r\n')
    deep: object = []
    for _ in range(5000):
        deep = [deep]
    assert encode(deep, pretty=True).count(b"\r\n") == 2 * 5001


def test_pretty_is_one_parser_message() -> None:
    """A pretty message reads back as one value (qmpd's own parser)."""
    parser = JsonStreamParser()
    value = {"return": {"x": [1, 2, {}], "s": "a\nb"}}
    assert parser.feed(encode(value, pretty=True)) == [value]



def test_frozen_member_gives_the_same_bytes() -> None:
    """A reply whose member is a frozen value (the query-qmp-schema answer)
    reuses its cached text: byte for byte what encoding it anew gives."""
    value = [{"name": "\u00e9\x01\u2028\U0001f600", "n": 1.5, "inf": math.inf}, ["a\\u", None, True]]
    ids = (1, "\u00fcn\u00efx", None, [1, {"x": "\x7f"}])
    copy = [dict(value[0]), list(value[1])]  # equal, not frozen
    expected = {repr(rid): encode({"return": copy, "id": rid}) for rid in ids}
    expected_first = {repr(rid): encode({"id": rid, "return": copy}) for rid in ids}
    freeze(value)
    for rid in ids:
        assert encode({"return": value, "id": rid}) == expected[repr(rid)]
        assert encode({"id": rid, "return": value}) == expected_first[repr(rid)]
    assert encode({"return": value}) == b'{"return": ' + encode(copy)[:-2] + b"}\r\n"
    assert encode({"\u00e9": value}) == b'{"\\u00E9": ' + encode(copy)[:-2] + b"}\r\n"
    assert encode({"return": value}, pretty=True) == encode({"return": copy}, pretty=True)
