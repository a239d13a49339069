"""Read QAPI schema files into expressions that remember where they came from.

The QAPI language is QEMU's: a sequence of JSON-like objects, strings in
single quotes, ``#`` comments to the end of the line, ``true``/``false``,
and no numbers or ``null``.  ``{ 'include': 'other.json' }`` splices the
other file in place (relative to the including file, each file once)::

    { 'enum': 'Colour', 'data': [ 'red', 'green' ] }   # -> Expression(
                                                       #   {'enum': 'Colour', ...},
                                                       #   SourceInfo('x.json', 1))

Any syntax error raises :class:`~qmpd.errors.SchemaError` whose message
starts with ``file:line:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from qmpd.errors import SchemaError

__all__ = ["SourceInfo", "Expression", "QAPIValue", "load", "parse_text"]

#: A parsed QAPI value: objects keep their key order.
QAPIValue = Union[str, bool, list["QAPIValue"], dict[str, "QAPIValue"]]

_PUNCT = "{}[],:"
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "/": "/", "n": "\n", "t": "\t"}


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Where an expression starts."""

    #: File name as given (relative to the top file's directory when included).
    file: str
    #: 1-based line number.
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def error(self, msg: str) -> SchemaError:
        """:return: a SchemaError prefixed with this location."""
        return SchemaError(f"{self}: {msg}")


@dataclass(frozen=True, slots=True)
class Expression:
    """One top-level definition (``struct``, ``command``, ``pragma``, ...)."""

    expr: dict[str, QAPIValue]
    info: SourceInfo


class _Parser:
    """A recursive-descent parser over one file's text."""

    def __init__(self, text: str, fname: str) -> None:
        self.text = text
        self.fname = fname
        self.pos = 0
        self.line = 1
        self.tok = ""
        self.val: QAPIValue = ""
        self.tok_line = 1
        self.advance()

    def error(self, msg: str) -> SchemaError:
        return SchemaError(f"{self.fname}:{self.tok_line}: {msg}")

    def advance(self) -> None:
        """Move to the next token; ``""`` means end of input."""
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            self.tok_line = self.line
            self.pos += 1
            if ch == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif ch == "\n":
                self.line += 1
            elif ch in " \t\r":
                continue
            elif ch in _PUNCT:
                self.tok = ch
                return
            elif ch == "'":
                self.tok, self.val = "'", self._string()
                return
            elif text.startswith("true", self.pos - 1):
                self.pos += 3
                self.tok, self.val = "b", True
                return
            elif text.startswith("false", self.pos - 1):
                self.pos += 4
                self.tok, self.val = "b", False
                return
            else:
                raise self.error(f"stray '{ch}'")
        self.tok_line = self.line
        self.tok = ""

    def _string(self) -> str:
        out: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("missing terminating \"'\"")
            ch = text[self.pos]
            self.pos += 1
            if ch == "'":
                return "".join(out)
            if ch == "\\":
                esc = text[self.pos : self.pos + 1]
                if esc not in _ESCAPES:
                    raise self.error(f"unknown escape \\{esc}")
                self.pos += 1
                ch = _ESCAPES[esc]
            out.append(ch)

    def value(self) -> QAPIValue:
        tok = self.tok
        if tok == "{":
            return self.obj()
        if tok == "[":
            return self.array()
        if tok in ("'", "b"):
            val = self.val
            self.advance()
            return val
        raise self.error("expected value" if tok else "expected value, got end of input")

    def obj(self) -> dict[str, QAPIValue]:
        self.advance()
        out: dict[str, QAPIValue] = {}
        if self.tok == "}":
            self.advance()
            return out
        while True:
            if self.tok != "'":
                raise self.error("expected string or '}'")
            key = self.val
            assert isinstance(key, str)
            if key in out:
                raise self.error(f"duplicate key '{key}'")
            self.advance()
            if self.tok != ":":
                raise self.error("expected ':'")
            self.advance()
            out[key] = self.value()
            if self.tok == "}":
                self.advance()
                return out
            if self.tok != ",":
                raise self.error("expected ',' or '}'")
            self.advance()

    def array(self) -> list[QAPIValue]:
        self.advance()
        out: list[QAPIValue] = []
        if self.tok == "]":
            self.advance()
            return out
        while True:
            out.append(self.value())
            if self.tok == "]":
                self.advance()
                return out
            if self.tok != ",":
                raise self.error("expected ',' or ']'")
            self.advance()

    def top_level(self) -> list[Expression]:
        exprs: list[Expression] = []
        while self.tok:
            if self.tok != "{":
                raise self.error("expected '{' at top level")
            info = SourceInfo(self.fname, self.tok_line)
            exprs.append(Expression(self.obj(), info))
        return exprs


def parse_text(text: str, fname: str = "<string>") -> list[Expression]:
    """Parse one file's text; ``include`` expressions are returned as is.

    :raise SchemaError: on a syntax error.
    """
    return _Parser(text, fname).top_level()


def load(path: str | Path, sources: list[Path] | None = None) -> list[Expression]:
    """Parse *path* and, in place, every file it includes.

    :param sources: if given, receives every file read (resolved), in order.
    :return: the expressions in definition order, includes expanded.
    :raise SchemaError: on syntax errors, unreadable files or include loops.
    """
    top = Path(path)
    out: list[Expression] = []
    seen: dict[Path, None] = {}
    _load_into(top, top.name, top.parent, out, seen, [])
    if sources is not None:
        sources.extend(seen)
    return out


def _load_into(
    path: Path, shown: str, root: Path, out: list[Expression], seen: dict[Path, None], stack: list[Path]
) -> None:
    real = path.resolve()
    try:
        text = real.read_text(encoding="utf-8")
    except OSError as err:
        raise SchemaError(f"{shown}: can't read: {err.strerror}") from err
    stack.append(real)
    seen[real] = None
    for expr in parse_text(text, shown):
        if "include" not in expr.expr:
            out.append(expr)
            continue
        name = expr.expr["include"]
        if len(expr.expr) != 1 or not isinstance(name, str):
            raise expr.info.error("invalid 'include' directive")
        child = (path.parent / name).resolve()
        if child in stack:
            raise expr.info.error(f"inclusion loop for {name}")
        if child in seen:
            continue
        try:
            child_shown = str(child.relative_to(root.resolve()))
        except ValueError:
            child_shown = str(child)
        _load_into(child, child_shown, root, out, seen, stack)
    stack.pop()
