"""Walk a JSON value the way QEMU's QObject input visitor does.

:func:`first_error` returns the message of the first error QEMU would
report for a value of a QAPI type, or ``None`` when the value is valid.
The order is QEMU's: an object's members in declaration order (base
members first, then the union branch selected by the tag), recursing
depth-first; an object's unexpected keys are reported after all its
members, in the order GLib's hash table iterates them (see
:mod:`qmpd.qapi.ghash`).

Wording (``full`` = dotted path, ``bare`` = member name, ``null`` in lists):

* missing / unexpected: ``Parameter 'full' is missing|unexpected``
* wrong JSON type: ``Invalid parameter type for 'full', expected: integer``
  (``boolean``, ``string``, ``number``, ``null``, ``object``, ``array``)
* unsigned types given a non-integer: ``Parameter 'full' expects uint64``
* out of range: ``Parameter 'bare' expects uint32_t`` (``int8_t``...)
* enum: ``Parameter 'bare' does not accept value 'v'``
* alternate: ``Invalid parameter type for 'bare', expected: AlternateName``
"""

from __future__ import annotations

from typing import Any

from qmpd.qapi.ghash import first_remaining_key
from qmpd.qapi.schema import (
    INT_RANGES, AlternateType, ArrayType, BuiltinType, EnumType, ObjectType, QAPIType,
)

__all__ = ["first_error", "normalize", "uses_wrapping"]

_U64 = 2**64
_JSON_NAMES = {"str": "string", "bool": "boolean", "number": "number", "null": "null"}


class _Invalid(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_error(full: str, expected: str) -> _Invalid:
    return _Invalid(f"Invalid parameter type for '{full}', expected: {expected}")


def _join(full: str, name: str) -> str:
    return f"{full}.{name}" if full else name


def _check_int(name: str, value: object, full: str, bare: str) -> int:
    lo, hi = INT_RANGES[name]
    if name.startswith("u") or name == "size":
        if not _is_int(value) or not -(2**63) <= value < _U64:  # type: ignore[operator]
            raise _Invalid(f"Parameter '{full}' expects uint64")
        wrapped = value % _U64  # type: ignore[operator]
        if wrapped > hi:
            raise _Invalid(f"Parameter '{bare}' expects {name}_t")
        return int(wrapped)
    if not _is_int(value) or not -(2**63) <= value < 2**63:  # type: ignore[operator]
        raise _type_error(full, "integer")
    assert isinstance(value, int)
    if not lo <= value <= hi:
        raise _Invalid(f"Parameter '{bare}' expects {name}_t")
    return value


def _visit(typ: QAPIType, value: Any, full: str, bare: str) -> Any:
    """Check *value*; :return: it with unsigned wrap applied.  :raise _Invalid:"""
    if isinstance(typ, BuiltinType):
        if typ.name in INT_RANGES:
            return _check_int(typ.name, value, full, bare)
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "null": value is None, "any": True}[typ.name]
        if not ok:
            raise _type_error(full, _JSON_NAMES[typ.name])
        return value
    if isinstance(typ, EnumType):
        if not isinstance(value, str):
            raise _type_error(full, "string")
        if value not in typ.values:
            raise _Invalid(f"Parameter '{bare}' does not accept value '{value}'")
        return value
    if isinstance(typ, ArrayType):
        if not isinstance(value, list):
            raise _type_error(full, "array")
        return [_visit(typ.element, v, f"{full}[{i}]", "null") for i, v in enumerate(value)]
    if isinstance(typ, AlternateType):
        return _visit(_pick_alternative(typ, value, bare), value, full, bare)
    assert isinstance(typ, ObjectType)
    if not isinstance(value, dict):
        raise _type_error(full, "object")
    return _visit_members(typ, value, full)


def _pick_alternative(typ: AlternateType, value: Any, bare: str) -> QAPIType:
    for v in typ.variants:
        jt = v.type.json_type()
        if ((jt == "string" and isinstance(value, str))
                or (jt == "object" and isinstance(value, dict))
                or (jt == "boolean" and isinstance(value, bool))
                or (jt == "null" and value is None)
                or (jt == "int" and _is_int(value))
                or (jt == "number" and isinstance(value, (int, float))
                    and not isinstance(value, bool))):
            return v.type
    raise _type_error(bare, typ.name)


def _visit_members(typ: ObjectType, value: dict[str, Any], full: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    members = list(typ.members)
    i = 0
    while i < len(members):
        m = members[i]
        i += 1
        path = _join(full, m.name)
        if m.name not in value:
            if not m.optional:
                raise _Invalid(f"Parameter '{path}' is missing")
            continue
        out[m.name] = _visit(m.type, value[m.name], path, m.name)
        if typ.variants and m is typ.variants.tag:
            branch = typ.variants.lookup(out[m.name]).type
            assert isinstance(branch, ObjectType)
            members += branch.members
    if len(out) != len(value):
        key = first_remaining_key(list(value), list(out))
        raise _Invalid(f"Parameter '{_join(full, key)}' is unexpected")
    return out


def first_error(typ: ObjectType, arguments: dict[str, Any]) -> str | None:
    """:return: QEMU's message for the first error in *arguments*, or ``None``."""
    try:
        _visit(typ, arguments, "", "")
    except _Invalid as err:
        return err.msg
    return None


def normalize(typ: QAPIType, value: Any) -> Any:
    """:return: a valid *value* with negative unsigned integers wrapped to 2**64 + v.

    :raise ValueError: if *value* is not valid.
    """
    try:
        return _visit(typ, value, "", "")
    except _Invalid as err:
        raise ValueError(err.msg) from None


def uses_wrapping(typ: QAPIType, seen: set[str] | None = None) -> bool:
    """:return: whether any unsigned 64-bit integer is reachable from *typ*."""
    seen = set() if seen is None else seen
    if typ.name in seen:
        return False
    seen.add(typ.name)
    if isinstance(typ, BuiltinType):
        return typ.name in ("uint64", "size")
    if isinstance(typ, ArrayType):
        return uses_wrapping(typ.element, seen)
    if isinstance(typ, AlternateType):
        return any(uses_wrapping(v.type, seen) for v in typ.variants)
    if isinstance(typ, ObjectType):
        members = [m.type for m in typ.members]
        members += [v.type for v in typ.variants.variants] if typ.variants else []
        return any(uses_wrapping(t, seen) for t in members)
    return False
