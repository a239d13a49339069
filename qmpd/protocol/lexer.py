"""QEMU's JSON lexer (``qobject/json-lexer.c``) as a resumable state machine.

The lexer walks the same deterministic automaton as QEMU, but each looping
state (string body, digit run, keyword, whitespace, error recovery) swallows
its whole run with one compiled regular expression, so Python only runs per
token, never per byte.  The state survives between calls: a token may be
split across any number of :meth:`Lexer.run` calls without being re-scanned.

Token kinds are small ints; the ``sink`` receives ``(kind, text)`` where
``text`` is the raw token bytes (strings keep their quotes).
"""

from __future__ import annotations

import re
from typing import Protocol

__all__ = [
    "LCURLY", "RCURLY", "LSQUARE", "RSQUARE", "COLON", "COMMA",
    "STRING", "INTEGER", "FLOAT", "KEYWORD", "ERROR", "OVERSIZE",
    "Lexer", "Sink", "run_end",
]

LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA = range(6)
STRING, INTEGER, FLOAT, KEYWORD = range(6, 10)
#: A lexical error; the text is the partial token including the bad byte.
ERROR = 10
#: A single token grew beyond the size limit (QEMU's lexer-side check).
OVERSIZE = 11

_STRUCT = {ord("{"): LCURLY, ord("}"): RCURLY, ord("["): LSQUARE,
           ord("]"): RSQUARE, ord(":"): COLON, ord(","): COMMA}
#: Shared (kind, text) pairs for the one-byte structural tokens.
STRUCT_TOKENS = {c: (k, bytes((c,))) for c, k in _STRUCT.items()}

# Lexer states.  Everything from _DQ on is "inside a token".
_START, _RECOVERY = 0, 1
_DQ, _DQ_ESC, _SQ, _SQ_ESC = 2, 3, 4, 5
_ZERO, _DIGITS, _SIGN, _MANTISSA, _MANT_DIGITS = 6, 7, 8, 9, 10
_EXP_E, _EXP_SIGN, _EXP_DIGITS, _KEYWORD = 11, 12, 13, 14

_TERMINAL = {_ZERO: INTEGER, _DIGITS: INTEGER, _MANT_DIGITS: FLOAT,
             _EXP_DIGITS: FLOAT, _KEYWORD: KEYWORD}

_FIRST: dict[int, int] = {ord('"'): _DQ, ord("'"): _SQ, ord("0"): _ZERO, ord("-"): _SIGN}
_FIRST.update({c: _DIGITS for c in b"123456789"})
_FIRST.update({c: _KEYWORD for c in b"abcdefghijklmnopqrstuvwxyz"})

_DIGIT = frozenset(b"0123456789")
_WS_RUN = re.compile(rb"[ \t\r\n]*+")
# Recovery skips everything but structural chars, controls other than TAB, 0xFE/0xFF.
_RECOVER_RUN = re.compile(rb"[^\x00-\x08\x0a-\x1f{}\[\]:,\xfe\xff]*+")
_DQ_RUN = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*+')
_SQ_RUN = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*+")
_DIGIT_RUN = re.compile(rb"[0-9]*+")
_LOWER_RUN = re.compile(rb"[a-z]*+")
_RUNS = {_DIGITS: _DIGIT_RUN, _MANT_DIGITS: _DIGIT_RUN, _EXP_DIGITS: _DIGIT_RUN,
         _KEYWORD: _LOWER_RUN}


def run_end(pattern: re.Pattern[bytes], buf: bytearray, pos: int, end: int | None = None) -> int:
    """End of ``pattern``'s (always successful, possibly empty) match at ``pos``
    (not beyond ``end``; shared with :mod:`qmpd.protocol.fastpath`)."""
    match = pattern.match(buf, pos) if end is None else pattern.match(buf, pos, end)
    assert match is not None
    return match.end()


class Sink(Protocol):
    """Receiver of tokens (the message streamer)."""

    def token(self, kind: int, text: bytes) -> None: ...  # pragma: no cover

    @property
    def idle(self) -> bool: ...  # pragma: no cover


class Lexer:
    """Resumable lexer state: the automaton state and the current token start."""

    __slots__ = ("state", "tok", "limit")

    def __init__(self, limit: int) -> None:
        self.state = _START
        #: Buffer index where the current token starts (valid inside a token).
        self.tok = 0
        #: A token longer than this is cut off with an OVERSIZE token.
        self.limit = limit

    @property
    def in_token(self) -> bool:
        return self.state >= _DQ

    @property
    def at_start(self) -> bool:
        return self.state == _START

    def reset(self) -> None:
        self.state = _START
        self.tok = 0

    def run(self, buf: bytearray, pos: int, sink: Sink, stop_when_idle: bool,
            end: int | None = None) -> tuple[int, bool]:
        """Lex ``buf[pos:end]`` (``end`` defaults to the buffer end; a token
        cut there resumes on the next call).

        :return: ``(pos, idle)``: where lexing stopped, and whether it stopped
            early at a clean point (start state, nothing queued) after having
            emitted something, as requested by ``stop_when_idle``.
        """
        n = len(buf) if end is None else end
        state = self.state
        tok = self.tok
        limit = self.limit
        emitted = False
        while True:
            if state == _START:
                pos = run_end(_WS_RUN, buf, pos, n)
                if emitted and stop_when_idle and sink.idle:
                    self.state, self.tok = state, tok
                    return pos, True
                if pos >= n:
                    break
                c = buf[pos]
                pair = STRUCT_TOKENS.get(c)
                pos += 1
                emitted = True
                if pair is not None:
                    sink.token(*pair)
                    continue
                tok = pos - 1
                state = _FIRST.get(c, -1)
                if state < 0:
                    sink.token(ERROR, bytes((c,)))
                    state = _RECOVERY
                continue
            if state == _RECOVERY:
                pos = run_end(_RECOVER_RUN, buf, pos, n)
                if pos >= n:
                    break
                state = _START  # the resync byte is looked at again
                continue
            if pos - tok > limit:
                # QEMU checks after every byte: cut exactly after limit+1 bytes.
                pos = tok + limit + 1
                sink.token(OVERSIZE, b"")
                state = _START
                emitted = True
                continue
            if state == _DQ or state == _SQ:
                pos = run_end((_DQ_RUN if state == _DQ else _SQ_RUN), buf, pos, n)
                if pos - tok > limit:
                    continue
                if pos >= n:
                    break
                c = buf[pos]
                pos += 1
                if c == 0x5C:  # backslash
                    state += 1
                    continue
                if c == (0x22 if state == _DQ else 0x27):
                    sink.token(STRING, bytes(buf[tok:pos]))
                    state = _START
                else:
                    sink.token(ERROR, bytes(buf[tok:pos]))
                    state = _RECOVERY
                emitted = True
                continue
            run = _RUNS.get(state)
            if run is not None:
                pos = run_end(run, buf, pos, n)
                if pos - tok > limit:
                    continue
            if pos >= n:
                break
            c = buf[pos]
            nxt = self._next(state, c)
            if nxt >= 0:  # consumed, still inside the token
                pos += 1
                state = nxt
                continue
            emitted = True
            if nxt == -1:  # terminal: the byte is looked at again
                sink.token(_TERMINAL[state], bytes(buf[tok:pos]))
                state = _START
            else:  # lexical error, the byte is part of the stray text
                pos += 1
                sink.token(ERROR, bytes(buf[tok:pos]))
                state = _RECOVERY
        self.state, self.tok = state, tok
        return pos, False

    @staticmethod
    def _next(state: int, c: int) -> int:
        """Transition of the single-step states: new state, -1 terminal, -2 error."""
        if state == _DQ_ESC or state == _SQ_ESC:
            return state - 1 if 0x20 <= c <= 0xFD else -2
        if state == _DIGITS:
            if c == 0x2E:
                return _MANTISSA
            return _EXP_E if c in (0x65, 0x45) else -1
        if state == _MANT_DIGITS:
            return _EXP_E if c in (0x65, 0x45) else -1
        if state == _EXP_DIGITS or state == _KEYWORD:
            return -1
        if state == _ZERO:
            if c == 0x2E:
                return _MANTISSA
            return -2 if c in _DIGIT else -1
        if state == _SIGN:
            if c == 0x30:
                return _ZERO
            return _DIGITS if c in _DIGIT else -2
        if state == _MANTISSA:
            return _MANT_DIGITS if c in _DIGIT else -2
        if state == _EXP_E:
            if c in (0x2B, 0x2D):
                return _EXP_SIGN
            return _EXP_DIGITS if c in _DIGIT else -2
        # _EXP_SIGN
        return _EXP_DIGITS if c in _DIGIT else -2

    def flush(self, buf: bytearray, pos: int, sink: Sink) -> None:
        """End of input: a pending number or keyword token is complete."""
        kind = _TERMINAL.get(self.state)
        if kind is not None:
            sink.token(kind, bytes(buf[self.tok:pos]))
        self.reset()
