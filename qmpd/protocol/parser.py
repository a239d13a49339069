"""QEMU's JSON parser (``qobject/json-parser.c``) over one message's tokens.

Iterative (an explicit stack), so 1024 levels of nesting need no Python
recursion.  The first error ends the parse, exactly like QEMU, whose
``parse_error()`` keeps only the first message.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

from qmpd.protocol.lexer import (
    COLON, COMMA, FLOAT, INTEGER, KEYWORD, LCURLY, LSQUARE, RCURLY, RSQUARE, STRING,
)

__all__ = ["JsonParseError", "parse_tokens", "qemu_text", "NONCHARACTER"]

#: Unicode's 66 noncharacters, which QEMU's UTF-8 code rejects.
NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef" + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17)) + "]"
)
_INT64_MIN = -(1 << 63)
_UINT64_END = 1 << 64
_KEYWORDS: dict[bytes, object] = {b"true": True, b"false": False, b"null": None}
_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
                   ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


class JsonParseError(Exception):
    """A parse error; ``desc`` is the full QEMU text."""

    def __init__(self, message: str) -> None:
        # parse_error() formats into a 1024-byte buffer: at most 1023 bytes.
        raw = message.encode("utf-8")[:1023]
        super().__init__("JSON parse error, " + raw.decode("utf-8", "ignore"))
        self.desc: str = self.args[0]


# --- UTF-8 as QEMU sees it -------------------------------------------------

def _valid_codepoint(cp: int) -> bool:
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and (cp & 0xFFFE) != 0xFFFE)


def _mod_utf8_codepoint(data: bytes, start: int) -> tuple[int, int]:
    """QEMU's ``mod_utf8_codepoint()`` at ``data[start]``: (codepoint or -1, end)."""
    byte = data[start]
    if byte < 0x80:
        return byte, start + 1
    if byte >= 0xFE or not byte & 0x40:
        return -1, start + 1
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    p = start + 1
    for _ in range(1, length):
        nxt = data[p] if p < len(data) else 0
        if nxt & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = cp << 6 | (nxt & 0x3F)
    min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
    if not _valid_codepoint(cp) or (cp < min_cp and not (cp == 0 and length == 2)):
        return -1, p
    return cp, p


def _qemu_replace(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    cp, end = _mod_utf8_codepoint(exc.object, exc.start)
    return ("\ufffd" if cp < 0 else chr(cp)), end


codecs.register_error("qmpd-qemu-writer", _qemu_replace)


def qemu_text(data: bytes) -> str:
    """Bytes QEMU would put in an error text, as its JSON writer prints them.

    C strings stop at NUL; invalid sequences become U+FFFD with QEMU's
    resynchronisation rule; ``C0 80`` is U+0000.
    """
    nul = data.find(0)
    if nul >= 0:
        data = data[:nul]
    text = data.decode("utf-8", "qmpd-qemu-writer")
    if not text.isascii():
        text = NONCHARACTER.sub("\ufffd", text)
    return text


# --- scalars -----------------------------------------------------------------

def _decode_raw(seg: bytes) -> str:
    try:
        text = seg.decode("utf-8")
    except UnicodeDecodeError:
        try:  # modified UTF-8: C0 80 is U+0000 (C0 is never a continuation byte)
            text = seg.replace(b"\xc0\x80", b"\x00").decode("utf-8")
        except UnicodeDecodeError:
            raise JsonParseError("invalid UTF-8 sequence in string") from None
    if not text.isascii() and NONCHARACTER.search(text):
        raise JsonParseError("invalid UTF-8 sequence in string")
    return text


def _hex4(data: bytes, at: int) -> int:
    return int(data[at:at + 4], 16) if _HEX4.match(data, at) else -1


def parse_string(tok: bytes) -> str:
    """Decode a string token (quotes included)."""
    end = len(tok) - 1
    j = tok.find(b"\\", 1, end)
    if j < 0:
        return _decode_raw(tok[1:end])
    parts: list[str] = []
    i = 1
    while j >= 0:
        parts.append(_decode_raw(tok[i:j]))
        esc = tok[j + 1]
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            parts.append(simple)
            i = j + 2
        elif esc == 0x75:  # \u
            cp = _hex4(tok, j + 2)
            i = j + 6
            if 0xD800 <= cp <= 0xDBFF and tok[i:i + 2] == b"\\u":
                low = _hex4(tok, i + 2)
                if 0xDC00 <= low <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
                    i += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                bad = qemu_text(tok[j:i])
                raise JsonParseError(f"{bad} is not a valid Unicode character")
            parts.append(chr(cp))
        else:
            raise JsonParseError("invalid escape sequence in string")
        j = tok.find(b"\\", i, end)
    parts.append(_decode_raw(tok[i:end]))
    return "".join(parts)


def parse_integer(text: str | bytes) -> int | float:
    """int64 if it fits, else uint64 if it fits, else a double (like QEMU).
    Also the fast path's ``json`` ``parse_int`` hook (``text`` a str)."""
    if len(text) <= 21:
        value = int(text)
        if _INT64_MIN <= value < _UINT64_END:
            return value
    return float(text)


# --- structure -----------------------------------------------------------------

_PREMATURE = "premature EOI"


def _scalar(kind: int, text: bytes) -> object:
    if kind == STRING:
        return parse_string(text)
    if kind == INTEGER:
        return parse_integer(text)
    if kind == FLOAT:
        return float(text)
    value = _KEYWORDS.get(text, _KEYWORDS)
    if value is _KEYWORDS:
        raise JsonParseError(f"invalid keyword '{qemu_text(text)}'")
    return value


def parse_tokens(tokens: list[tuple[int, bytes]]) -> object:
    """Parse one message's tokens; raise :class:`JsonParseError`."""
    n = len(tokens)
    i = 0
    # Frames: [container, key-or-None, expecting_key].  A frame's container
    # is a list (array) or dict (object).
    stack: list[list[Any]] = []
    while True:
        # ---- parse_value at tokens[i]
        if i >= n:
            raise JsonParseError(_PREMATURE)
        kind, text = tokens[i]
        value: object
        if kind == LCURLY or kind == LSQUARE:
            i += 1
            if i >= n:
                raise JsonParseError(_PREMATURE)
            close = RCURLY if kind == LCURLY else RSQUARE
            if tokens[i][0] != close:
                container: Any = {} if kind == LCURLY else []
                stack.append([container, None, kind == LCURLY])
                continue
            i += 1
            value = {} if kind == LCURLY else []
        elif STRING <= kind <= KEYWORD:
            value = _scalar(kind, text)
            i += 1
        else:
            raise JsonParseError("expecting value")
        # ---- hand the value to the enclosing containers
        while stack:
            frame = stack[-1]
            container = frame[0]
            if isinstance(container, list):
                container.append(value)
                if i >= n:
                    raise JsonParseError(_PREMATURE)
                sep = tokens[i][0]
                i += 1
                if sep == RSQUARE:
                    stack.pop()
                    value = container
                    continue
                if sep != COMMA:
                    raise JsonParseError("expected separator in list")
                break
            if frame[2]:  # value was a key
                if not isinstance(value, str):
                    raise JsonParseError("key is not a string in object")
                if i >= n:
                    raise JsonParseError(_PREMATURE)
                if tokens[i][0] != COLON:
                    raise JsonParseError("missing : in object pair")
                i += 1
                frame[1] = value
                frame[2] = False
                break
            key = frame[1]
            if key in container:
                raise JsonParseError("duplicate key")
            container[key] = value
            if i >= n:
                raise JsonParseError(_PREMATURE)
            sep = tokens[i][0]
            i += 1
            if sep == RCURLY:
                stack.pop()
                value = container
                continue
            if sep != COMMA:
                raise JsonParseError("expected separator in dict")
            frame[2] = True
            break
        else:
            return value
