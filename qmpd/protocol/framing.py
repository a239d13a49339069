"""Sans-I/O QMP input framing: bytes in, parsed messages and errors out.

:class:`JsonStreamParser` reproduces QEMU's JSON message parser
(``qobject/json-lexer.c``, ``json-streamer.c``, ``json-parser.c``): a
message ends when the brackets it opened balance again (not at a newline),
top-level scalars are messages, lexical errors discard the partial message
and make the lexer skip to a resynchronisation point, and the limits on
token bytes, token count and nesting apply per message.  Errors are
returned as :class:`FramingError` items, in input order, never raised.

Two tiers: well-formed ``{...}``/``[...]`` messages are framed by a regex
scanner and decoded by the C ``json`` module (see
:mod:`qmpd.protocol.fastpath`); everything else, and every error, goes
through the exact lexer/streamer/parser.

End of input (``feed(b"")``): a pending number or keyword completes (so
``42`` then EOF gives ``42``); an incomplete message or token is dropped
silently and the parser is reset.  (QEMU's monitor never flushes its
parser: it just discards the state when the client goes away.)
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpd.protocol.encode import encode
from qmpd.protocol.fastpath import BAIL, NEED_MORE, Scanner, Window, fast_decode
from qmpd.protocol.lexer import (
    ERROR, LCURLY, LSQUARE, OVERSIZE, RCURLY, RSQUARE, Lexer,
)
from qmpd.protocol.parser import JsonParseError, parse_tokens, qemu_text

__all__ = ["FramingError", "JsonStreamParser", "encode"]

_SIZE_DESC = "JSON token size limit exceeded"
_COUNT_DESC = "JSON token count limit exceeded"
_DEPTH_DESC = "JSON nesting depth limit exceeded"
_WS = frozenset(b" \t\r\n")
_COMPACT_AT = 1 << 16


@dataclass(frozen=True, slots=True)
class FramingError:
    """An input error; ``desc`` is QEMU's text (answered as a GenericError)."""

    desc: str


class JsonStreamParser:
    """Incremental QMP input parser (see the module docstring)."""

    __slots__ = ("_max_bytes", "_max_tokens", "_max_depth", "_buf", "_pos", "_lexer",
                 "_scanner", "_speculating", "_exact", "_out", "_tokens", "_size",
                 "_brace", "_bracket", "_fast", "_window", "_whole")

    def __init__(self, max_bytes: int = 64 << 20, max_tokens: int = 2 << 20,
                 max_depth: int = 1024, *, fast: bool = True) -> None:
        """:param fast: try the whole-document fast path (``json.raw_decode``)
            before the exact lexer; tests switch it off to compare both."""
        self._max_bytes = max_bytes
        self._max_tokens = max_tokens
        self._max_depth = max_depth
        self._lexer = Lexer(max_bytes)
        self._scanner = Scanner(max_depth)
        self._window = Window()
        # raw_decode cannot check a nesting limit; Python's recursion limit
        # (~1000) keeps what it accepts under QEMU's 1024.
        self._whole = max_depth >= 1024
        self._out: list[object | FramingError] = []
        self._fast = fast
        self.reset()

    def reset(self) -> None:
        """Drop all partial input (e.g. on disconnect)."""
        self._buf = bytearray()
        self._pos = 0
        self._lexer.reset()
        self._speculating = False
        self._exact = False
        self._tokens: list[tuple[int, bytes]] = []
        self._size = 0
        self._brace = 0
        self._bracket = 0

    def feed(self, data: bytes) -> list[object | FramingError]:
        """Consume ``data`` (``b""`` = end of input); return complete items."""
        out: list[object | FramingError] = []
        self._out = out
        if not data:
            if self._exact:
                self._lexer.flush(self._buf, self._pos, self)
            self.reset()
            return out
        self._buf += data
        self._window.invalidate()
        self._run()
        self._compact()
        return out

    # ---- the driver -------------------------------------------------------

    def _run(self) -> None:
        buf = self._buf
        n = len(buf)
        while self._pos < n:
            if self._exact:
                self._window.invalidate()
                self._pos, idle = self._lexer.run(buf, self._pos, self, stop_when_idle=True)
                if not idle:
                    return
                self._exact = False
                continue
            scanner = self._scanner
            if not self._speculating:
                pos = self._pos
                while pos < n and buf[pos] in _WS:
                    pos += 1
                self._pos = pos
                if pos >= n:
                    return
                if buf[pos] not in b"{[" or not self._fast:
                    self._exact = True
                    continue
                if self._whole:
                    end, value = self._window.decode_at(buf, pos, self._max_bytes, self._max_tokens)
                    if end >= 0:
                        self._out.append(value)
                        self._pos = end
                        continue
                    if end == BAIL:
                        self._exact = True
                        continue
                scanner.begin(pos)
                self._speculating = True
            end = scanner.scan(buf, self._max_bytes)
            if end == NEED_MORE:
                return
            self._speculating = False
            if end != BAIL:
                ok, value = fast_decode(bytes(buf[scanner.start:end]), self._max_tokens)
                if ok:
                    self._out.append(value)
                    self._pos = end
                    continue
            self._exact = True  # re-lex exactly from the span start

    def _compact(self) -> None:
        keep = self._pos
        if self._exact and self._lexer.in_token:
            keep = self._lexer.tok
        if keep >= _COMPACT_AT or keep == len(self._buf):
            del self._buf[:keep]
            self._pos -= keep
            self._lexer.tok -= keep
            if self._speculating:
                self._scanner.start -= keep
                self._scanner.pos -= keep

    # ---- the streamer (Sink protocol of the lexer) ---------------------

    @property
    def idle(self) -> bool:
        return not self._tokens

    def _emit_error(self, desc: str) -> None:
        self._out.append(FramingError(desc))
        self._tokens = []
        self._size = self._brace = self._bracket = 0

    def token(self, kind: int, text: bytes) -> None:
        if kind >= ERROR:
            if kind == OVERSIZE:
                self._emit_error(_SIZE_DESC)
            else:
                self._emit_error(f"JSON parse error, stray '{qemu_text(text)}'")
            return
        if kind <= RSQUARE:
            if kind == LCURLY:
                self._brace += 1
            elif kind == RCURLY:
                self._brace -= 1
            elif kind == LSQUARE:
                self._bracket += 1
            else:
                self._bracket -= 1
        if self._size + len(text) + 1 > self._max_bytes:
            return self._emit_error(_SIZE_DESC)
        if len(self._tokens) + 1 > self._max_tokens:
            return self._emit_error(_COUNT_DESC)
        if self._brace + self._bracket > self._max_depth:
            return self._emit_error(_DEPTH_DESC)
        self._tokens.append((kind, text))
        self._size += len(text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        try:
            value = parse_tokens(self._tokens)
        except JsonParseError as exc:
            self._emit_error(exc.desc)
            return
        self._out.append(value)
        self._tokens = []
        self._size = self._brace = self._bracket = 0
