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

Bounded work: one :meth:`JsonStreamParser.feed` (or :meth:`resume`) call
looks at no more than ``slice_bytes`` new bytes; when input is left over,
:attr:`pending` is true and the driver calls :meth:`resume` later, so a
huge message never monopolises the event loop.

After a *limit* error (token size, token count, nesting depth) the rest of
the offending message is discarded silently: bracket depth is still tracked
and the parser resumes once the message's brackets balance, or at the next
lexical error (which is reported as QEMU reports it, so sending 0x1B still
resynchronises a client).  QEMU instead answers every leftover token with
its own error; this deliberate difference stops one oversized message from
turning into millions of error replies.

End of input (``feed(b"")``): a pending number or keyword completes (so
``42`` then EOF gives ``42``); an incomplete message or token is dropped
silently and the parser is reset.  (QEMU's monitor never flushes its
parser: it just discards the state when the client goes away.)
"""

from __future__ import annotations

import re
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
_WS_RUN = re.compile(rb"[ \t\r\n]*+")
_COMPACT_AT = 1 << 16
#: Bytes lexed or scanned per feed()/resume() call in the server.
SLICE_BYTES = 32 << 10
#: Rough memory cost of one queued token (tuple + bytes object).
_TOKEN_COST = 96


@dataclass(frozen=True, slots=True)
class FramingError:
    """An input error; ``desc`` is QEMU's text (answered as a GenericError)."""

    desc: str


class JsonStreamParser:
    """Incremental QMP input parser (see the module docstring)."""

    __slots__ = ("_max_bytes", "_max_tokens", "_max_depth", "_buf", "_pos", "_lexer",
                 "_scanner", "_speculating", "_exact", "_out", "_tokens", "_size",
                 "_brace", "_bracket", "_fast", "_window", "_whole", "_slice", "_discard",
                 "_eof", "_stalled")

    def __init__(self, max_bytes: int = 64 << 20, max_tokens: int = 2 << 20,
                 max_depth: int = 1024, *, fast: bool = True, slice_bytes: int | None = None) -> None:
        """:param fast: try the whole-document fast path (``json.raw_decode``)
            before the exact lexer; tests switch it off to compare both.
        :param slice_bytes: bytes looked at per call; None: everything (then
            never :attr:`pending`)."""
        self._slice = (1 << 62) if slice_bytes is None else max(1, slice_bytes)
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
        #: Bracket depth still to skip after a limit error (0: not discarding).
        self._discard = 0
        self._eof = False
        self._stalled = False

    @property
    def pending(self) -> bool:
        """Buffered input is left for :meth:`resume` (the slice ran out)."""
        return self._stalled

    @property
    def footprint(self) -> int:
        """Approximate bytes of memory held for partial input."""
        return len(self._buf) + _TOKEN_COST * len(self._tokens)

    def resume(self) -> list[object | FramingError]:
        """Continue with buffered input (see :attr:`pending`)."""
        out: list[object | FramingError] = []
        self._out = out
        self._stalled = False
        self._run()
        self._compact()
        if self._eof and not self._stalled:
            out += self.feed(b"")
        return out

    def feed(self, data: bytes) -> list[object | FramingError]:
        """Consume ``data`` (``b""`` = end of input); return complete items."""
        out: list[object | FramingError] = []
        self._out = out
        if not data:
            if self.pending:  # finish the buffered input first
                self._eof = True
                return out
            if self._exact:
                self._lexer.flush(self._buf, self._pos, self)
            self.reset()
            return out
        self._buf += data
        self._window.invalidate()
        if self._stalled:
            return out  # earlier input is still waiting for resume()
        self._run()
        self._compact()
        return out

    # ---- the driver -------------------------------------------------------

    def _run(self) -> None:
        buf = self._buf
        n = len(buf)
        budget_end = min(n, self._pos + self._slice)
        if self._speculating:
            budget_end = min(n, self._scanner.pos + self._slice)
        while self._pos < n:
            if self._pos >= budget_end:
                self._stalled = True
                return
            if self._exact:
                self._window.invalidate()
                self._pos, idle = self._lexer.run(buf, self._pos, self, stop_when_idle=True,
                                                  end=budget_end)
                if not idle:
                    self._stalled = budget_end < n
                    return
                self._exact = False
                continue
            scanner = self._scanner
            if not self._speculating:
                pos = _WS_RUN.match(buf, self._pos, budget_end).end()  # type: ignore[union-attr]
                self._pos = pos
                if pos >= budget_end:
                    self._stalled = pos < n
                    return
                if pos >= n:
                    return
                if buf[pos] not in b"{[" or not self._fast:
                    self._exact = True
                    continue
                if self._whole:
                    end, value = self._window.decode_at(buf, pos, self._max_bytes, self._max_tokens,
                                                        self._slice)
                    if end >= 0:
                        self._out.append(value)
                        self._pos = end
                        continue
                    if end == BAIL:
                        self._exact = True
                        continue
                scanner.begin(pos)
                self._speculating = True
            scan_end = min(n, max(budget_end, scanner.pos + 1))
            end = scanner.scan(buf, self._max_bytes, scan_end)
            if end == NEED_MORE:
                self._stalled = scan_end < n
                return
            self._speculating = False
            if end != BAIL and scanner.tokens > self._max_tokens:
                # The span lexes cleanly, so QEMU's first error is the token
                # count; the rest of the message is discarded (see above).
                self._out.append(FramingError(_COUNT_DESC))
                self._pos = end
                continue
            if end != BAIL:
                ok, value = fast_decode(bytes(buf[scanner.start:end]), self._max_tokens)
                if ok:
                    self._out.append(value)
                    self._pos = end
                    continue
            self._exact = True  # re-lex exactly from the span start
            # The budget was measured from the scan position: restart it.
            budget_end = min(n, self._pos + self._slice)

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
        return not self._tokens and not self._discard

    def _emit_error(self, desc: str, limit: bool = False) -> None:
        self._out.append(FramingError(desc))
        if limit and self._brace + self._bracket > 0:
            self._discard = self._brace + self._bracket
        self._tokens = []
        self._size = self._brace = self._bracket = 0

    def _skip(self, kind: int) -> bool:
        """Discard mode: swallow ``kind``; False ends it (lexical error)."""
        if kind == ERROR:
            self._discard = 0
            return False
        if kind == LCURLY or kind == LSQUARE:
            self._discard += 1
        elif kind == RCURLY or kind == RSQUARE:
            self._discard -= 1
        return True

    def token(self, kind: int, text: bytes) -> None:
        if self._discard and self._skip(kind):
            return
        if kind >= ERROR:
            if kind == OVERSIZE:
                self._emit_error(_SIZE_DESC, True)
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
            return self._emit_error(_SIZE_DESC, True)
        if len(self._tokens) + 1 > self._max_tokens:
            return self._emit_error(_COUNT_DESC, True)
        if self._brace + self._bracket > self._max_depth:
            return self._emit_error(_DEPTH_DESC, True)
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
