"""QMP input framing: QEMU's JSON lexer/streamer/parser, byte for byte.

Expected error texts were recorded from QEMU 7.2 (``-qmp unix:...``) where
noted; the rest follow ``qobject/json-*.c``.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpd.protocol import FramingError, JsonStreamParser

E = FramingError
EXPECTING = E("JSON parse error, expecting value")


def stray(text: str) -> FramingError:
    return E(f"JSON parse error, stray '{text}'")


def perr(text: str) -> FramingError:
    return E(f"JSON parse error, {text}")


def feed_all(data: bytes, eof: bool = True, fast: bool = True, **limits: int) -> list[object]:
    parser = JsonStreamParser(**limits, fast=fast)
    out = parser.feed(data)
    if eof:
        out += parser.feed(b"")
    return out


def feed_bytewise(data: bytes, eof: bool = True, fast: bool = True, **limits: int) -> list[object]:
    parser = JsonStreamParser(**limits, fast=fast)
    out: list[object] = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
    if eof:
        out += parser.feed(b"")
    return out


def same(a: list[object], b: list[object]) -> bool:
    """Equality that also tells 1 from 1.0 and -0.0 from 0.0."""
    return json.dumps(a, default=repr) == json.dumps(b, default=repr) and a == b


# (input, expected items) - every case is also checked byte by byte and
# with the fast path off.
CASES: list[tuple[bytes, list[object]]] = [
    (b'{"execute": "query-version", "id": 1}', [{"execute": "query-version", "id": 1}]),
    (b'{\n  "execute":\n\t"query-version",\r\n  "id": 1\n}\n', [{"execute": "query-version", "id": 1}]),
    (b'{"execute":"a"}{"execute":"b"} {"execute":"c"}\n',
     [{"execute": "a"}, {"execute": "b"}, {"execute": "c"}]),
    (b'[1, [2, {"a": [true, false, null]}], "x", -0.5e-3]', [[1, [2, {"a": [True, False, None]}], "x", -0.0005]]),
    (b'"str" true false null 7 ', ["str", True, False, None, 7]),
    (b"{'execute': 'a\\'b\"c', \"k\": \"d\\'e\"}", [{"execute": "a'b\"c", "k": "d'e"}]),
    (b'{"b": 1, "a": 2, "c": 3}', [{"b": 1, "a": 2, "c": 3}]),
    (b"{}[]", [{}, []]),
    # stray closers and separators at top level (QEMU 7.2)
    (b"}", [EXPECTING]),
    (b"] ]", [EXPECTING, EXPECTING]),
    (b": ,", [EXPECTING, EXPECTING]),
    (b"[1, 2]]", [[1, 2], EXPECTING]),
    (b"[{]}", [EXPECTING]),
    # lexical errors and resynchronisation (QEMU 7.2)
    (b'{"execute": @}', [stray("@"), EXPECTING]),
    (b'{"a": 1.}"x"\n', [stray("1.}")]),
    (b"01\n", [stray("01")]),
    (b"-a 5 ", [stray("-a")]),
    (b"1e} 2 ", [stray("1e}")]),  # recovery skips up to the next structural char
    (b"1e+x, 3 ", [stray("1e+x"), EXPECTING, 3]),
    (b"True 4 ", [stray("T")]),
    (b"True, 4 ", [stray("T"), EXPECTING, 4]),
    (b'{"execute": "a",\x1b{"execute": "b"}', [stray("\x1b"), {"execute": "b"}]),
    (b'{"execute": "a\x1b"}', [stray('"a\x1b'), EXPECTING]),
    (b'{"a": "x\ty"} 5 ', [stray('"x\t'), EXPECTING, 5]),
    (b'"ab\ncd" 1 ', [stray('"ab\n')]),
    (b'"ab\ncd", 1 ', [stray('"ab\n'), EXPECTING, 1]),
    (b"\xff", [stray("\ufffd")]),
    (b"[1, \xfe 2]", [stray("\ufffd"), EXPECTING]),
    (b"\x00 3 ", [stray("")]),
    (b"\x00\n3 ", [stray(""), 3]),
    (b"%d 1 ", [stray("%")]),
    # parser errors
    (b'{"execute": }', [EXPECTING]),
    (b'{"a":1,"a":2}', [perr("duplicate key")]),
    (b"{'a':1,\"a\":[2,3]}", [perr("duplicate key")]),
    (b'{"a": tru}', [perr("invalid keyword 'tru'")]),
    (b"nul ", [perr("invalid keyword 'nul'")]),
    (b"truefalse ", [perr("invalid keyword 'truefalse'")]),
    (b'{"a": 0e5}', [perr("expected separator in dict")]),
    (b"[1 2]", [perr("expected separator in list")]),
    (b'{1: 2}', [perr("key is not a string in object")]),
    (b'{"a" 1}', [perr("missing : in object pair")]),
    (b'{"a": 1,}', [EXPECTING]),
    (b'{"a": 1]', [perr("expected separator in dict")]),
    (b"[1,]", [EXPECTING]),
    (b'{"a"]', [perr("missing : in object pair")]),
    (b'{[}', []),  # brackets still open: waits (and EOF drops it)
    # strings
    (b'"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20AC"', ['"\\/\b\f\n\r\t\u00e9\u20ac']),
    (b'"\\u0000"', ["\x00"]),
    (b'"\xc0\x80"', ["\x00"]),
    (b'"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"', ["\u00e9\u20ac\U0001f600"]),
    (b'"\\uD83D\\uDE00"', ["\U0001f600"]),
    (b'"\\ud83d\\ude00"', ["\U0001f600"]),
    (b'"\\x"', [perr("invalid escape sequence in string")]),
    (b'"\\\xc3\xa9"', [perr("invalid escape sequence in string")]),
    (b'"\\u12"', [perr('\\u12" is not a valid Unicode character')]),
    (b'"\\uD800"', [perr("\\uD800 is not a valid Unicode character")]),
    (b'"\\uDE00"', [perr("\\uDE00 is not a valid Unicode character")]),
    (b'"\\uD800\\u0041"', [perr("\\uD800 is not a valid Unicode character")]),
    (b'"\\uFFFF"', [perr("\\uFFFF is not a valid Unicode character")]),
    (b'"\\uFDD0"', [perr("\\uFDD0 is not a valid Unicode character")]),
    (b'"\xc3"', [perr("invalid UTF-8 sequence in string")]),
    (b'"\xed\xa0\x80"', [perr("invalid UTF-8 sequence in string")]),
    (b'"\xef\xbf\xbf"', [perr("invalid UTF-8 sequence in string")]),
    (b'"\xc1\xbf"', [perr("invalid UTF-8 sequence in string")]),
    (b'"\\x" "\xc3"', [perr("invalid escape sequence in string"), perr("invalid UTF-8 sequence in string")]),
    (b'"\xc3(\\x"', [perr("invalid UTF-8 sequence in string")]),
    # numbers
    (b"9223372036854775807 -9223372036854775808 ", [2**63 - 1, -(2**63)]),
    (b"9223372036854775808 18446744073709551615 ", [2**63, 2**64 - 1]),
    (b"18446744073709551616 -9223372036854775809 ", [float(2**64), -float(2**63 + 1)]),
    (b"1" + b"0" * 5000 + b" ", [math.inf]),
    (b"[1e999, -1E+2, 0.5, -0, 0]", [[math.inf, -100.0, 0.5, 0, 0]]),
]


@pytest.mark.parametrize(("data", "expected"), CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_cases(data: bytes, expected: list[object]) -> None:
    assert same(feed_all(data), expected)
    assert same(feed_bytewise(data), expected)
    assert same(feed_all(data, fast=False), expected)


def test_no_trailing_newline_needed_after_brace() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b'{"execute": "a"}') == [{"execute": "a"}]


def test_bare_number_waits_for_delimiter_or_eof() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b"42") == []
    assert parser.feed(b"1") == []
    assert parser.feed(b"\n") == [421]
    assert parser.feed(b"true") == []
    assert parser.feed(b"") == [True]


def test_incomplete_message_at_eof_is_dropped() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b'{"execute": "a", "id": 12') == []
    assert parser.feed(b"") == []
    assert parser.feed(b'{"execute": "b"}') == [{"execute": "b"}]


def test_reset_drops_partial_input() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b'{"execute": "a", ') == []
    parser.reset()
    assert parser.feed(b'{"execute": "b"}') == [{"execute": "b"}]


def test_newline_does_not_end_an_object() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b'{"execute":\n\n') == []
    assert parser.feed(b'"x"}\n') == [{"execute": "x"}]


def test_one_bad_line_several_errors_then_recovery() -> None:
    data = b'{"execute": "a", "arguments": {"x": @1}}\n{"execute": "b"}\n'
    assert feed_all(data) == [stray("@"), EXPECTING, EXPECTING, {"execute": "b"}]


# ---- limits ------------------------------------------------------------------

def test_nesting_1024_ok_1025_fails() -> None:
    deep = feed_all(b"[" * 1024 + b"]" * 1024)
    assert len(deep) == 1 and isinstance(deep[0], list)
    # QEMU 7.2 answers every following "]" as a stray closer; qmpd discards
    # the rest of the offending message (one error per message).
    items = feed_all(b"[" * 1025 + b"]" * 1025)
    assert items == [E("JSON nesting depth limit exceeded")]
    objects = feed_all(b'{"a":' * 1024 + b"1" + b"}" * 1024)
    assert len(objects) == 1 and isinstance(objects[0], dict)


def test_nesting_limit_small() -> None:
    items = feed_all(b'[[[1]]] [[[[1]]]] {"a": [{}]}', max_depth=3)
    assert items[0] == [[[1]]]
    # The 4th "[" fails; the rest of that message is discarded.
    assert items[1:] == [E("JSON nesting depth limit exceeded"), {"a": [{}]}]


def test_token_count_limit() -> None:
    limit = E("JSON token count limit exceeded")
    assert feed_all(b"[1,2]", max_tokens=5) == [[1, 2]]
    assert feed_all(b"[1,2,3]", max_tokens=5) == [limit]
    assert feed_bytewise(b"[1,2,3]", max_tokens=5) == [limit]


def test_token_size_limit_total() -> None:
    limit = E("JSON token size limit exceeded")
    # Tokens of one message must total fewer than max_bytes (whitespace is free).
    assert feed_all(b'[ "aaaaaa" ,   "b" ]', max_bytes=15) == [["aaaaaa", "b"]]
    assert feed_all(b'["aaaaaa","bb"]', max_bytes=15) == [limit]
    assert feed_all(b'["aaaaaa","bb"] 5 ]', max_bytes=15) == [limit, 5, EXPECTING]
    assert feed_all(b'"abcdefghijkl"', max_bytes=15) == ["abcdefghijkl"]
    assert feed_all(b'"abcdefghijklm"', max_bytes=15) == [limit]


def test_token_size_limit_single_long_token_is_cut() -> None:
    # The lexer cuts a token after max_bytes + 1 bytes and starts afresh.
    limit = E("JSON token size limit exceeded")
    data = b'"' + b"a" * 20 + b"bc 7 "
    assert feed_all(data, max_bytes=20) == [limit, perr("invalid keyword 'bc'"), 7]
    assert feed_bytewise(data, max_bytes=20) == [limit, perr("invalid keyword 'bc'"), 7]


def test_limit_error_discards_rest_of_message_not_one_error_per_token() -> None:
    # Issue 7 item 1: 1 Mi leftover tokens must not become 1 Mi error items.
    data = b'{"execute": "query-status", "arguments": {"x": [' + b"1," * (1 << 19) + b'1]}}{"execute": "b"}'
    items = feed_all(data, max_tokens=1000)
    assert items == [E("JSON token count limit exceeded"), {"execute": "b"}]


def test_discarding_stops_at_a_lexical_error_as_qemu_resyncs() -> None:
    items = feed_all(b'[[[[1, 2 \x1b{"execute": "b"}', max_depth=3)
    assert items == [E("JSON nesting depth limit exceeded"), stray("\x1b"), {"execute": "b"}]


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 13, 21])
def test_scanned_token_count_matches_the_exact_lexer(limit: int) -> None:
    data = (b'{"execute": "a", "arguments": {"x": [1, -2.5e3, true, null, "s\\"q", {}, []]}}'
            b' [1,2] {"b": "c"} 7 ')
    fast = JsonStreamParser(max_tokens=limit)
    exact = JsonStreamParser(max_tokens=limit, fast=False)
    assert fast.feed(data) + fast.feed(b"") == exact.feed(data) + exact.feed(b"")


def test_over_count_message_costs_no_per_token_work() -> None:
    data = b'{"execute": "query-status", "arguments": {"x": [' + b"1," * (3 << 20) + b'1]}} 5 '
    parser = JsonStreamParser(slice_bytes=1 << 16)
    out, calls = _drain(parser, data)
    assert out == [E("JSON token count limit exceeded"), 5]
    assert parser.footprint < 1 << 20  # no token list was built


def _drain(parser: JsonStreamParser, data: bytes) -> tuple[list[object], int]:
    out: list[object] = list(parser.feed(data))
    calls = 1
    while parser.pending:
        out += parser.resume()
        calls += 1
    return out, calls


@pytest.mark.parametrize("fast", [True, False])
def test_sliced_parsing_is_bounded_and_gives_the_same_items(fast: bool) -> None:
    msgs = [{"execute": "a", "arguments": {"data": "x" * 200_000}}, [1] * 50_000, {"execute": "b"}]
    data = b"".join(json.dumps(m).encode() for m in msgs) + b" " * 100_000 + b"}"
    parser = JsonStreamParser(slice_bytes=4096, fast=fast)
    out, calls = _drain(parser, data)
    assert out == msgs + [EXPECTING]
    assert calls >= len(data) // 4096 - 2
    # Data arriving while a slice is pending is queued behind it.
    parser = JsonStreamParser(slice_bytes=4096)
    items = parser.feed(data[:300_000])
    assert parser.pending
    items += parser.feed(data[300_000:])
    while parser.pending:
        items += parser.resume()
    assert items == msgs + [EXPECTING]


def test_sliced_eof_waits_for_pending_input() -> None:
    parser = JsonStreamParser(slice_bytes=16)
    items = parser.feed(b"[" + b"1," * 100 + b"1] 42")
    items += parser.feed(b"")
    while parser.pending:
        items += parser.resume()
    assert items == [[1] * 101, 42]


def test_footprint_counts_queued_tokens() -> None:
    parser = JsonStreamParser(fast=False)
    parser.feed(b"[" + b"1," * 1000)
    assert parser.footprint >= 2000 * 64


def test_large_message_in_chunks() -> None:
    payload = "x" * (3 << 20)
    data = json.dumps({"execute": "a", "arguments": {"data": payload}}).encode()
    parser = JsonStreamParser()
    out: list[object] = []
    for i in range(0, len(data), 65536):
        out += parser.feed(data[i:i + 65536])
    assert out == [{"execute": "a", "arguments": {"data": payload}}]


# ---- properties ------------------------------------------------------------

def _ok_char(c: str) -> bool:
    cp = ord(c)
    return not (0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


_text = st.text(st.characters().filter(_ok_char), max_size=12)
_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | _text)
_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(_text, kids, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(_values, min_size=1, max_size=4), st.booleans(), st.data())
def test_roundtrip_random_chunks(values: list[object], ascii_only: bool, data: st.DataObject) -> None:
    blob = b"".join(json.dumps(v, ensure_ascii=ascii_only).encode() + b"\n" for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=6)))
    parser = JsonStreamParser()
    out: list[object] = []
    last = 0
    for cut in cuts + [len(blob)]:
        if cut == last:
            continue  # feed(b"") would mean EOF
        out += parser.feed(blob[last:cut])
        last = cut
    out += parser.feed(b"")
    assert same(out, values)


_FRAGMENTS = [b"0E", b"1.", b"-0.5", b"1e+", b"[1,2,", b"{", b"}", b"[", b"]", b":", b",", b'"a"', b"'b'", b'"\\u00e9"', b"1", b"-", b"0", b".", b"e",
              b"E", b"1.5e3", b"true", b"tru", b" ", b"\n", b"\t", b"\x01", b"\xc3\xa9", b'"\xc3"', b"\\",
              b'"\\x"', b'"\\uD800"', b"@", b'"', b"'", b"0e5", b'"k":', b"\xff", b"\x00", b'"\xc0\x80"']


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=16))
def test_fast_path_equals_exact_path_and_bytewise(parts: list[bytes]) -> None:
    data = b"".join(parts)
    expected = feed_all(data, fast=False)
    assert same(feed_all(data), expected)
    assert same(feed_bytewise(data), expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 17))
def test_byte_soup_never_raises(blob: bytes, step: int) -> None:
    parser = JsonStreamParser(max_bytes=64, max_tokens=16, max_depth=4)
    for i in range(0, len(blob), step):
        for item in parser.feed(blob[i:i + step]):
            assert item is None or isinstance(item, (FramingError, dict, list, str, int, float, bool))
    parser.feed(b"")


def test_long_invalid_keyword_text_is_cut_like_qemu() -> None:
    # QEMU formats parser errors into a 1024-byte buffer (checked on 7.2).
    [item] = feed_all(b"a" * 2000 + b" ")
    assert item == perr("invalid keyword '" + "a" * (1023 - len("invalid keyword '")))
