"""The ``query-qmp-schema`` answer, built the way QEMU's ``introspect.py`` builds it.

Commands and events come first, in definition order; then every type they
use, in order of first use (a work queue that grows while it is walked).
All integer flavours are reported as the builtin ``int`` (and lists of them
as ``[int]``).  Names of commands, events, builtins and arrays are real;
every other type name is masked as a decimal string, numbered in order of
first use (``"0"`` is usually the empty object)::

    {"name": "query-status", "ret-type": "1", "meta-type": "command", "arg-type": "0"}
    {"name": "0", "members": [], "meta-type": "object"}

Keys are emitted in the order QEMU 7.2 puts them on the wire.  Pass a set of
command names to describe only those (the daemon passes its registry), so
types reachable only from other commands disappear too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qmpd.qapi.schema import (
    AlternateType, ArrayType, BuiltinType, EnumType, ObjectType, QAPIType, Schema,
)

__all__ = ["introspect"]

SchemaInfo = dict[str, Any]


class _Introspector:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.used: list[QAPIType] = []
        self.used_names: set[str] = set()
        self.masks: dict[str, str] = {}

    def mask(self, name: str) -> str:
        return self.masks.setdefault(name, str(len(self.masks)))

    def use(self, typ: QAPIType) -> str:
        if typ.json_type() == "int":
            typ = self.schema.lookup_type("int")
        elif isinstance(typ, ArrayType) and typ.element.json_type() == "int":
            typ = ArrayType(self.schema.lookup_type("int"))
        if typ.name not in self.used_names:
            self.used_names.add(typ.name)
            self.used.append(typ)
        if isinstance(typ, BuiltinType):
            return typ.name
        if isinstance(typ, ArrayType):
            return "[" + self.use(typ.element) + "]"
        return self.mask(typ.name)

    def entities(self, commands: set[str] | None) -> list[SchemaInfo]:
        out: list[SchemaInfo] = []
        empty = self.schema.empty_object
        for ent in self.schema.entities:
            if ent.name in self.schema.commands:
                cmd = self.schema.commands[ent.name]
                if commands is not None and cmd.name not in commands:
                    continue
                arg = self.use(cmd.arg_type or empty)
                ret = self.use(cmd.ret_type or empty)
                info: SchemaInfo = {"name": cmd.name, "ret-type": ret}
                if cmd.allow_oob:
                    info["allow-oob"] = True
                info.update({"meta-type": "command", "arg-type": arg})
            else:
                ev = self.schema.events[ent.name]
                info = {"name": ev.name, "meta-type": "event",
                        "arg-type": self.use(ev.arg_type or empty)}
            out.append(_with_features(info, ent.features))
        i = 0
        while i < len(self.used):        # the queue grows while we walk it
            out.append(self.type_info(self.used[i]))
            i += 1
        return out

    def type_info(self, typ: QAPIType) -> SchemaInfo:
        if isinstance(typ, BuiltinType):
            return {"name": typ.name, "json-type": typ.json_type(), "meta-type": "builtin"}
        if isinstance(typ, ArrayType):
            elem = self.use(typ.element)
            return {"name": f"[{elem}]", "element-type": elem, "meta-type": "array"}
        name = self.mask(typ.name)
        if isinstance(typ, EnumType):
            members = [_with_features({"name": m.name}, m.features) for m in typ.members]
            info = {"name": name, "members": members, "meta-type": "enum",
                    "values": typ.values}
        elif isinstance(typ, AlternateType):
            info = {"name": name, "members": [{"type": self.use(v.type)} for v in typ.variants],
                    "meta-type": "alternate"}
        else:
            assert isinstance(typ, ObjectType)
            info = {"name": name}
            members = [self.member(m.name, m.type, m.optional, m.features) for m in typ.members]
            if typ.variants:
                info["tag"] = typ.variants.tag.name
                info["variants"] = [{"case": v.name, "type": self.use(v.type)}
                                    for v in typ.variants.variants]
            info.update({"members": members, "meta-type": "object"})
        return _with_features(info, typ.features)

    def member(self, name: str, typ: QAPIType, optional: bool,
               features: list[str]) -> SchemaInfo:
        info: SchemaInfo = {"name": name}
        if optional:
            info["default"] = None
        info["type"] = self.use(typ)
        return _with_features(info, features)


def _with_features(info: SchemaInfo, features: list[str]) -> SchemaInfo:
    if features:
        info["features"] = list(features)
    return info


def introspect(schema: Schema, commands: Iterable[str] | None = None) -> list[SchemaInfo]:
    """Build the ``query-qmp-schema`` return value.

    :param commands: describe only these commands (``None``: all).  Events
        are always described; names that are not schema commands are ignored.
    :return: a list of SchemaInfo dicts, ready to be JSON-encoded.
    """
    return _Introspector(schema).entities(None if commands is None else set(commands))
