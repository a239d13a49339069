"""The fast path's C-speed region checks agree with its regular expressions."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpd.protocol.fastpath import region_ok, region_tokens

#: The fast path's region regex (what QEMU lexes without an error), verbatim.
_REGION_OK = re.compile(
    rb"(?:[ \t\r\n:,]++|[a-z]++"
    rb"|-?+(?:0(?![0-9eE])|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+(?![.eE]))*+"
)
#: One token of a validated region: a separator or a number/keyword run.
_TOKEN = re.compile(rb"[:,]|[^ \t\r\n:,]++")
_ALPHABET = b' \t\r\n:,0123456789-+.eEatrulfsnx"{'


def _reference(buf: bytearray, pos: int, end: int) -> tuple[bool, int]:
    ok = _REGION_OK.fullmatch(buf, pos, end) is not None
    return ok, len(_TOKEN.findall(buf, pos, end))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(list(_ALPHABET)), max_size=24), st.data())
def test_region_checks_match_the_regexes(chars: list[int], data: st.DataObject) -> None:
    buf = bytearray(chars)
    pos = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.integers(pos, len(buf)))
    ok, tokens = _reference(buf, pos, end)
    assert region_ok(buf, pos, end) == ok
    assert region_tokens(buf, pos, end) == tokens


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"0", b"1", b"10", b"01", b"007", b"", b",", b",,", b"9"]), max_size=30))
def test_integer_lists(parts: list[bytes]) -> None:
    buf = bytearray(b"x" + b",".join(parts) + b"x")
    assert (region_ok(buf, 1, len(buf) - 1), region_tokens(buf, 1, len(buf) - 1)) == \
        _reference(buf, 1, len(buf) - 1)


def test_huge_array_body() -> None:
    buf = bytearray(b"[" + b"1," * 8192 + b"10,0,7]")
    assert region_ok(buf, 1, len(buf) - 1)
    assert region_tokens(buf, 1, len(buf) - 1) == 2 * 8192 + 5
    assert not region_ok(bytearray(b"1,01"), 0, 4)
