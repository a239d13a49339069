"""``key=value`` option strings typed by the schema (``--blockdev`` and co).

QEMU's command line spells a QAPI object as dotted keys::

    driver=raw,node-name=drive0,file.driver=file,file.filename=/img.raw,read-only=on

:func:`parse_keyval` builds the nested dict of strings (a comma inside a
value is written twice; ``a.0=x,a.1=y`` makes a list), and
:func:`coerce` turns the strings into the JSON types the schema expects
(booleans ``on``/``off``, integers with size suffixes for ``size``), the way
QEMU's keyval input visitor does.  JSON text (``{...}``) bypasses both.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from qmpd.errors import GenericError

if TYPE_CHECKING:   # imported where used: the command line splits options without the schema
    from qmpd.qapi.schema import QAPIType

__all__ = ["parse_keyval", "coerce", "parse_option_value", "split_items"]

_SUFFIX = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([bkmgtpe]?)$", re.IGNORECASE)


def split_items(text: str) -> list[str]:
    """Split on commas; ``,,`` stands for a literal comma."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return items


def parse_keyval(text: str) -> dict[str, Any]:
    """Parse dotted ``key=value`` pairs into nested dicts/lists of strings.

    :raise GenericError: on malformed input.
    """
    root: dict[str, Any] = {}
    for item in split_items(text):
        if "=" not in item:
            raise GenericError(f"Expected '=' after parameter '{item}'")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise GenericError(f"Invalid parameter '{key}'")
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GenericError(f"Parameter '{key}' conflicts with another parameter")
            node = child
        if parts[-1] in node:
            raise GenericError(f"Parameter '{key}' is set more than once")
        node[parts[-1]] = value
    result: dict[str, Any] = _lists(root)
    return result


def _lists(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {k: _lists(v) for k, v in value.items()}
    if converted and all(k.isdigit() for k in converted):
        indices = sorted(int(k) for k in converted)
        if indices == list(range(len(indices))):
            return [converted[str(i)] for i in indices]
    return converted


def _int(path: str, type_name: str, text: str) -> int:
    if type_name == "size":
        m = _SIZE_RE.match(text)
        if not m:
            raise GenericError(f"Parameter '{path}' expects size")
        number = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
        return int(number * _SUFFIX[m.group(2).lower() or "b"])
    # QEMU's keyval visitor parses every integer as int64 or uint64 first.
    wide = "uint64" if type_name.startswith("uint") else "int"
    try:
        value = int(text, 0)
    except ValueError:
        raise GenericError(f"Parameter '{path}' expects {wide}") from None
    from qmpd.qapi.schema import INT_RANGES

    lo, hi = INT_RANGES[type_name]
    if not lo <= value <= hi:
        raise GenericError(f"Parameter '{path}' expects {type_name}_t" if type_name not in ("int", "uint64")
                           else f"Parameter '{path}' expects {wide}")
    return value


def _bool(path: str, text: str) -> bool:
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise GenericError(f"Parameter '{path}' expects 'on' or 'off'")


def coerce(value: Any, qtype: QAPIType, path: str = "") -> Any:
    """Type keyval strings by ``qtype``; unknown keys are left for validation."""
    from qmpd.qapi.schema import INT_RANGES, AlternateType, ArrayType, BuiltinType, EnumType, ObjectType

    if isinstance(qtype, AlternateType):
        for v in qtype.variants:
            if isinstance(value, dict) == isinstance(v.type, ObjectType):
                return coerce(value, v.type, path)
        return value
    if isinstance(qtype, ObjectType):
        if not isinstance(value, dict):
            return value
        out = dict(value)
        members = {m.name: m for m in qtype.members}
        if qtype.variants is not None:
            tag = out.get(qtype.variants.tag.name)
            try:
                branch = qtype.variants.lookup(tag) if isinstance(tag, str) else None
            except KeyError:
                branch = None
            if branch is not None and isinstance(branch.type, ObjectType):
                members.update({m.name: m for m in branch.type.members})
        for key, item in out.items():
            if key in members:
                out[key] = coerce(item, members[key].type, f"{path}.{key}" if path else key)
        return out
    if isinstance(qtype, ArrayType):
        if isinstance(value, list):
            return [coerce(v, qtype.element, f"{path}[{i}]") for i, v in enumerate(value)]
        return value
    if not isinstance(value, str) or isinstance(qtype, EnumType):
        return value
    if isinstance(qtype, BuiltinType):
        if qtype.name in INT_RANGES:
            return _int(path, qtype.name, value)
        if qtype.name == "bool":
            return _bool(path, value)
        if qtype.name == "number":
            try:
                return float(value)
            except ValueError:
                raise GenericError(f"Parameter '{path}' expects a number") from None
    return value


def parse_option_value(text: str, qtype: QAPIType) -> Any:
    """JSON text as is, else keyval typed by ``qtype``."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            raise GenericError(f"JSON parse error: {err.msg}") from err
    return coerce(parse_keyval(text), qtype)
