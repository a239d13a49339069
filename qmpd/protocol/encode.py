"""QMP output encoding, as QEMU's ``qobject/json-writer.c`` prints it.

Compact form (``": "`` and ``", "``), ASCII only: characters below 0x20
and from 0x7F on are ``\\uXXXX`` with upper-case hex (surrogate pairs above
the BMP), ``"`` ``\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t`` use short escapes.
One message per line, ending in CR LF.

Pretty form (``-mon ...,pretty=on``; ``json_writer_new(true)``): every
member or element on its own line, indented by four spaces per open
container, ``","`` ending each line but the last; an empty object or
array still opens and closes on two lines (``{`` / ``}`` at the closing
indentation).  The monitor turns each ``\n`` into CR LF and ends the
message with one more CR LF.

Deviations from QEMU, on purpose: floats are printed like Python's
``repr`` (shortest round-trip form) instead of ``%.17g``; infinities are
written ``1e999`` / ``-1e999`` (which JSON parsers, QEMU's included, read
back as infinity) instead of the invalid token ``inf``; NaN is written
``null``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["encode", "freeze"]

_dumps = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(", ", ": ")).encode
_escape = json.encoder.encode_basestring_ascii
_LOWER_U = re.compile(r"\\(?:\\|u([0-9a-f]{4}))")


def _upper_hex(match: re.Match[str]) -> str:
    digits = match.group(1)
    return "\\\\" if digits is None else "\\u" + digits.upper()


def _fix_hex(text: str) -> str:
    return _LOWER_U.sub(_upper_hex, text) if "\\u" in text else text


def _float(value: float) -> str:
    if math.isnan(value):
        return "null"
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value)


class _Lit(str):
    """Literal output text on the work stack of :func:`_slow`."""

    __slots__ = ()


def _slow(obj: object) -> str:
    """Iterative encoder: for NaN/infinity and nesting too deep for ``json``."""
    parts: list[str] = []
    # Work items are values to encode or literal text (_Lit).
    todo: list[Any] = [obj]
    while todo:
        item = todo.pop()
        if type(item) is _Lit:
            parts.append(item)
        elif isinstance(item, str):
            parts.append(_escape(item))
        elif item is None or item is True or item is False:
            parts.append("null" if item is None else "true" if item else "false")
        elif isinstance(item, int):
            parts.append(int.__repr__(item))
        elif isinstance(item, float):
            parts.append(_float(item))
        elif isinstance(item, dict):
            seq: list[Any] = [_Lit("}")]
            for index, (key, value) in enumerate(reversed(item.items())):
                seq.append(value)
                sep = ", " if index < len(item) - 1 else ""
                seq.append(_Lit(sep + _escape(str(key)) + ": "))
            seq.append(_Lit("{"))
            todo.extend(seq)
        elif isinstance(item, (list, tuple)):
            seq = [_Lit("]")]
            for index, value in enumerate(reversed(item)):
                seq.append(value)
                if index < len(item) - 1:
                    seq.append(_Lit(", "))
            seq.append(_Lit("["))
            todo.extend(seq)
        else:
            raise TypeError(f"cannot encode {type(item).__name__}")
    return "".join(parts)


def _pretty(obj: object) -> str:
    """QEMU's pretty form with CR LF line ends (iterative: any depth)."""
    parts: list[str] = []
    # Work items: (value, depth) to encode, or literal text (_Lit).
    todo: list[Any] = [(obj, 0)]
    while todo:
        item = todo.pop()
        if type(item) is _Lit:
            parts.append(item)
            continue
        value, depth = item
        if isinstance(value, dict):
            opener, closer, members = "{", "}", [(_escape(str(k)) + ": ", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            opener, closer, members = "[", "]", [("", v) for v in value]
        else:
            parts.append(_slow(value))
            continue
        inner = "\r\n" + " " * (4 * (depth + 1))
        seq: list[Any] = [_Lit("\r\n" + " " * (4 * depth) + closer)]
        for index in range(len(members) - 1, -1, -1):
            prefix, member = members[index]
            seq.append((member, depth + 1))
            seq.append(_Lit(("," if index else "") + inner + prefix))
        seq.append(_Lit(opener))
        todo.extend(seq)
    return "".join(parts)


#: Compact text of values that are never mutated (:func:`freeze`), by id;
#: the value is kept so that its id cannot be reused.
_frozen: dict[int, tuple[object, str]] = {}


def _compact(obj: object) -> str:
    try:
        text = _dumps(obj)
    except (ValueError, RecursionError):
        text = _slow(obj)
    return _fix_hex(text)


def freeze(value: object) -> None:
    """Promise that ``value`` (e.g. the ``query-qmp-schema`` answer, 44 KB
    of JSON) is never mutated again: a reply whose member *is* this object
    reuses its encoded text instead of encoding it again (same bytes)."""
    _frozen[id(value)] = (value, _compact(value))


def encode(obj: object, *, pretty: bool = False) -> bytes:
    """One QMP output message ending in ``\\r\\n``: QEMU's compact
    formatting on one line, or its pretty form (``pretty``)."""
    if pretty:
        return (_fix_hex(_pretty(obj)) + "\r\n").encode("ascii")
    if _frozen and type(obj) is dict:
        for value in obj.values():
            hit = _frozen.get(id(value))
            if hit is not None and hit[0] is value:
                return (_members(obj) + "\r\n").encode("ascii")
    return (_compact(obj) + "\r\n").encode("ascii")


def _members(obj: dict[Any, Any]) -> str:
    """``obj`` in the compact form, its frozen members from the cache (the
    same text ``json`` writes for a dict: ``{"k": v, ...}``)."""
    parts = []
    for key, value in obj.items():
        if type(key) is not str:
            return _compact(obj)
        hit = _frozen.get(id(value))
        text = hit[1] if hit is not None and hit[0] is value else _compact(value)
        parts.append(_fix_hex(_escape(key)) + ": " + text)
    return "{" + ", ".join(parts) + "}"
