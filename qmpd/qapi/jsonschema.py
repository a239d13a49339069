"""QAPI schema -> JSON Schema (draft 2020-12), written as a visitor.

``$defs`` holds one entry per named type, one per union branch
(``Union+case``: the base members plus the branch's, closed), one per
command's arguments (``command:<name>``) and one per event's data
(``event:<NAME>``).  Validate a command's arguments against
``{"$ref": "#/$defs/command:<name>"}`` with :data:`QAPIValidator`, whose
``integer`` type excludes floats and booleans, as QEMU's does.

Integers carry the ranges QEMU's input visitor accepts: unsigned types take
negative values that wrap (so ``uint64``/``size`` accept down to -2**63),
while the narrower unsigned types reject them after wrapping.
"""

from __future__ import annotations

from typing import Any

from functools import lru_cache

from qmpd.qapi.schema import (
    INT_RANGES, AlternateType, ArrayType, BuiltinType, EnumType, ObjectType,
    QAPIType, Schema,
)

__all__ = ["to_json_schema", "qapi_validator_class", "command_ref", "event_ref", "SCHEMA_ID"]

JSON = dict[str, Any]
SCHEMA_ID = "urn:qmpd:qapi"
_SIMPLE = {"str": {"type": "string"}, "bool": {"type": "boolean"},
           "number": {"type": "number"}, "null": {"type": "null"}, "any": {}}


def _is_int(checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@lru_cache(maxsize=1)
def qapi_validator_class() -> Any:
    """:return: the Draft 2020-12 validator class whose ``integer`` means a
    JSON integer literal.  ``jsonschema`` is imported on first use: it costs
    about 0.1 s of daemon start-up, and validators are built lazily anyway."""
    import jsonschema

    return jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft202012Validator,
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_int),
    )


def command_ref(name: str) -> str:
    """:return: the ``$defs`` key of a command's arguments."""
    return f"command:{name}"


def event_ref(name: str) -> str:
    """:return: the ``$defs`` key of an event's data."""
    return f"event:{name}"


def _ref(key: str) -> JSON:
    return {"$ref": f"#/$defs/{key}"}


def int_range(name: str) -> tuple[int, int]:
    """:return: the accepted (min, max) of an integer builtin, uint wrap included."""
    lo, hi = INT_RANGES[name]
    if name in ("uint64", "size"):
        lo = -(2**63)
    return lo, hi


class _Visitor:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.defs: JSON = {}

    def type_schema(self, typ: QAPIType) -> JSON:
        """A reference or inline schema for a value of *typ*."""
        if isinstance(typ, BuiltinType):
            if typ.name in INT_RANGES:
                lo, hi = int_range(typ.name)
                return {"type": "integer", "minimum": lo, "maximum": hi}
            return dict(_SIMPLE[typ.name])
        if isinstance(typ, ArrayType):
            return {"type": "array", "items": self.type_schema(typ.element)}
        if isinstance(typ, ObjectType) and typ.implicit:
            return self.visit_object(typ)
        return _ref(typ.name)

    def visit_enum(self, typ: EnumType) -> JSON:
        return {"type": "string", "enum": typ.values}

    def visit_alternate(self, typ: AlternateType) -> JSON:
        return {"anyOf": [self.type_schema(v.type) for v in typ.variants]}

    def closed_object(self, typ: ObjectType, extra: list[Any] | None = None,
                      tag: tuple[str, str] | None = None) -> JSON:
        props: JSON = {}
        required: list[str] = []
        for m in typ.members + (extra or []):
            props[m.name] = ({"const": tag[1]} if tag and m.name == tag[0]
                             else self.type_schema(m.type))
            if not m.optional:
                required.append(m.name)
        return {"type": "object", "properties": props, "required": required,
                "additionalProperties": False}

    def visit_object(self, typ: ObjectType) -> JSON:
        if not typ.variants:
            return self.closed_object(typ)
        tag = typ.variants.tag
        branches = []
        for v in typ.variants.variants:
            assert isinstance(v.type, ObjectType)
            key = f"{typ.name}+{v.name}"
            self.defs[key] = self.closed_object(typ, v.type.members, (tag.name, v.name))
            branches.append({"if": {"properties": {tag.name: {"const": v.name}},
                                    "required": [tag.name]},
                             "then": _ref(key)})
        return {"type": "object", "required": [tag.name],
                "properties": {tag.name: self.type_schema(tag.type)}, "allOf": branches}

    def visit_all(self) -> JSON:
        for typ in self.schema.named_types():
            if isinstance(typ, EnumType):
                self.defs[typ.name] = self.visit_enum(typ)
            elif isinstance(typ, AlternateType):
                self.defs[typ.name] = self.visit_alternate(typ)
            elif isinstance(typ, ObjectType) and not typ.implicit:
                self.defs[typ.name] = self.visit_object(typ)
        empty = self.schema.empty_object
        for cmd in self.schema.commands.values():
            self.defs[command_ref(cmd.name)] = self.type_schema(cmd.arg_type or empty)
        for ev in self.schema.events.values():
            self.defs[event_ref(ev.name)] = self.type_schema(ev.arg_type or empty)
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": SCHEMA_ID,
            "title": "qmpd QMP command arguments and event data",
            "$comment": "Generated by `python -m qmpd.qapi.gen` from schema/*.json; do not edit.",
            "$defs": self.defs,
        }


def to_json_schema(schema: Schema) -> JSON:
    """:return: the JSON Schema document for *schema* (see the module docstring)."""
    return _Visitor(schema).visit_all()
