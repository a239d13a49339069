"""Speculative framing plus ``json.loads`` for well-formed messages.

At a clean point of the stream (no partial message, lexer in its start
state) a message starting with ``{`` or ``[`` is *scanned* rather than
lexed: string bodies and runs between brackets are swallowed by regular
expressions, brackets are counted.  Once the brackets balance, the span is
decoded with the C ``json`` module plus checks that make its result
identical to QEMU's.  Anything unusual (a byte that could be a lexical
error, a limit in sight, single quotes, invalid UTF-8, a parse failure...)
makes the caller re-run the exact lexer and parser from the span start, so
the fast path only ever decides "this is that value", never an error.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qmpd.protocol.lexer import run_end
from qmpd.protocol.parser import NONCHARACTER, parse_integer

__all__ = ["Scanner", "Window", "NEED_MORE", "BAIL", "fast_decode"]

NEED_MORE = -1
BAIL = -2

# Between tokens of valid JSON: whitespace, separators, keywords, numbers.
_REGION = re.compile(rb"[ \t\r\n:,0-9a-z.+\-E]*+")
# Region contents that QEMU lexes without a lexical error, and whose numbers
# Python's json reads the same way ("0e5" is three tokens to QEMU: bail).
_REGION_OK = re.compile(
    rb"(?:[ \t\r\n:,]++|[a-z]++"
    rb"|-?+(?:0(?![0-9eE])|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+(?![.eE]))*+"
)
# A region cut short by the end of the buffer: complete tokens, then maybe
# the prefix of a number that has not hit a lexical error yet.
_REGION_TAIL = re.compile(
    rb"(?:[ \t\r\n:,]++|[a-z]++"
    rb"|-?+(?:0(?![0-9eE])|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+(?![.eE]))*+"
    rb"(?:-?+(?:0(?:\.[0-9]++[eE][+-]?+[0-9]*+|\.[0-9]*+)?+"
    rb"|[1-9][0-9]*+(?:\.[0-9]++[eE][+-]?+[0-9]*+|\.[0-9]*+|[eE][+-]?+[0-9]*+)?+)?+)?+"
)
#: Whitespace and separators to b" ", everything else to b"x" (token runs).
_RUN_MAP = bytes(0x20 if c in b" \t\r\n:," else 0x78 for c in range(256))
#: A number with a leading zero ("01"): QEMU lexes it as two tokens.
_LEADING_ZERO = re.compile(rb"(?<![0-9])0[0-9]")
_STR_BODY = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*+(?:\\[\x20-\xfd][^"\\\x00-\x1f\xfe\xff]*+)*+')
_OPEN = {0x7B: 0, 0x5B: 1}
_CLOSE = {0x7D: 0, 0x5D: 1}
#: Python's json C code recurses; stay well inside the recursion limit.
_FAST_DEPTH = 200


class Scanner:
    """Incremental bracket scanner for one speculative message."""

    __slots__ = ("start", "pos", "counts", "in_string", "max_depth", "tokens")

    def __init__(self, max_depth: int) -> None:
        self.max_depth = min(max_depth, _FAST_DEPTH)
        self.begin(0)

    def begin(self, start: int) -> None:
        self.start = start
        self.pos = start
        self.counts = [0, 0]
        self.in_string = False
        #: QEMU tokens in the scanned part (exact: the span lexes cleanly).
        self.tokens = 0

    def scan(self, buf: bytearray, limit: int, end: int | None = None) -> int:
        """Advance up to ``end`` (default: the buffer end); return the span
        end, NEED_MORE or BAIL."""
        n = len(buf) if end is None else end
        pos = self.pos
        counts = self.counts
        while True:
            if self.in_string:
                pos = run_end(_STR_BODY, buf, pos, n)
                if pos >= n - 1 and (pos == n or buf[pos] == 0x5C):
                    break
                if buf[pos] != 0x22:
                    return BAIL
                pos += 1
                self.in_string = False
                self.tokens += 1
            end = run_end(_REGION, buf, pos, n)
            if end > pos:
                if end >= n:  # the run may continue: check what is complete
                    cut = buf.rfind(b",", pos, end)
                    if cut >= 0:
                        if not region_ok(buf, pos, cut):
                            return BAIL
                        self.tokens += region_tokens(buf, pos, cut + 1)
                        pos = cut + 1
                    if not _REGION_TAIL.fullmatch(buf, pos, end):
                        return BAIL  # a lexical error is already certain
                    break
                if not region_ok(buf, pos, end):
                    return BAIL
                self.tokens += region_tokens(buf, pos, end)
                pos = end
            if pos >= n:
                break
            c = buf[pos]
            pos += 1
            if c == 0x22:
                self.in_string = True
                continue
            self.tokens += 1
            if c in _OPEN:
                counts[_OPEN[c]] += 1
                if counts[0] + counts[1] > self.max_depth:
                    return BAIL
            elif c in _CLOSE:
                counts[_CLOSE[c]] -= 1
                if counts[0] < 0 or counts[1] < 0:
                    return BAIL
                if counts[0] == counts[1] == 0:
                    return pos if pos - self.start < limit else BAIL
            else:
                return BAIL
            if pos - self.start >= limit:
                return BAIL
        self.pos = pos
        return BAIL if pos - self.start >= limit else NEED_MORE


def region_ok(buf: bytearray, pos: int, end: int) -> bool:
    """``_REGION_OK.fullmatch(buf, pos, end)``, in C for the common region
    of integers and commas (the body of a huge array: regex matching token
    by token costs ~1 ms per 16 KiB)."""
    chunk = buf[pos:end]
    if not chunk.translate(None, b"0123456789,") and _LEADING_ZERO.search(chunk) is None:
        return True
    return _REGION_OK.fullmatch(buf, pos, end) is not None


def region_tokens(buf: bytearray, pos: int, end: int) -> int:
    """QEMU tokens in a validated region (matches of ``[:,]|[^ \\t\\r\\n:,]++``)
    without building a list of them: separators plus runs of other bytes."""
    runs = buf[pos:end].translate(_RUN_MAP)
    return (buf.count(b",", pos, end) + buf.count(b":", pos, end)
            + runs.count(b" x") + (runs[:1] == b"x"))


class _Reject(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Reject("duplicate key")
    return obj


def _constant(name: str) -> Any:
    raise _Reject(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_int=parse_integer, parse_constant=_constant)


def _strings_ok(value: object) -> bool:
    """No lone surrogate or noncharacter (possible through ``\\u`` escapes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and (NONCHARACTER.search(item) or _SURROGATE.search(item)):
                return False
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_many_tokens(raw: bytes, max_tokens: int) -> bool:
    if len(raw) <= max_tokens // 2:
        return False
    # Every scalar follows one of { [ , : so tokens <= 2 * structurals.
    structurals = sum(raw.count(c) for c in (b"{", b"}", b"[", b"]", b":", b","))
    return 2 * structurals > max_tokens


#: "0e5" is one number to Python, three tokens to QEMU (0, e, 5).
_ZERO_E = re.compile("(?<![0-9.])0[eE]")
_WINDOW = 1 << 16


class Window:
    """Try ``json`` directly on the buffered bytes at a message start.

    Decodes (a window of) the buffer once and lets ``raw_decode`` find the
    end of the message; consecutive ASCII messages reuse the decoded text.
    """

    __slots__ = ("base", "text")

    def __init__(self) -> None:
        self.base = -1
        self.text = ""

    def invalidate(self) -> None:
        self.base = -1

    def decode_at(self, buf: bytearray, pos: int, max_bytes: int, max_tokens: int,
                  window: int = 1 << 16) -> tuple[int, object]:
        """Return ``(end, value)``; ``end`` is NEED_MORE (unknown: scan) or BAIL (go exact).

        :param window: bytes decoded at most (the caller's work slice: a
            huge message is not decoded 64 KiB at a time just to fail)."""
        idx = pos - self.base
        if self.base < 0 or idx >= len(self.text):
            self.base = pos
            # surrogateescape: bad bytes become lone surrogates, checked below.
            self.text = bytes(buf[pos:pos + min(window, _WINDOW)]).decode("utf-8", "surrogateescape")
            if not self.text.isascii():
                self.base = -1  # index arithmetic only holds for ASCII
            idx = 0
        text = self.text
        try:
            value, end = _DECODER.raw_decode(text, idx)
        except (ValueError, RecursionError) as exc:
            # Incomplete at the window end, or a real problem: let the scanner decide.
            return (BAIL if isinstance(exc, _Reject) else NEED_MORE), None
        span = text[idx:end]
        if span.isascii():
            size = len(span)
        else:
            if _SURROGATE.search(span) or NONCHARACTER.search(span):
                return BAIL, None
            size = len(span.encode("utf-8"))
        if ((("0e" in span or "0E" in span) and _ZERO_E.search(span)) or size >= max_bytes
                or ("\\u" in span and not _strings_ok(value))
                or _too_many_tokens(span.encode("ascii", "replace"), max_tokens)):
            return BAIL, None
        return pos + size, value


def fast_decode(raw: bytes, max_tokens: int) -> tuple[bool, object]:
    """Decode a scanned span: ``(True, value)``, or ``(False, None)`` to fall back."""
    if _too_many_tokens(raw, max_tokens):
        return False, None
    if (b"0e" in raw or b"0E" in raw) and _ZERO_E.search(raw.decode("latin-1")):
        return False, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False, None
    if not text.isascii() and NONCHARACTER.search(text):
        return False, None
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError):
        return False, None
    if "\\u" in text and not _strings_ok(value):
        return False, None
    return True, value
