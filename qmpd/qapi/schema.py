"""A typed, checked, in-memory QAPI schema.

Entities are built by :mod:`qmpd.qapi.builder`; this module defines them and
the lookups.  Object types are stored with their *local* members and an
optional base; :attr:`ObjectType.members` flattens base members first, as
QEMU's visitors do.  A union is an object type with :attr:`ObjectType.variants`.
Inline argument objects become implicit types named like QEMU's
(``q_obj_<command>-arg``, ``q_obj_<Union>-base``, ``q_empty``)::

    schema = load_schema()
    cmd = schema.command("block-dirty-bitmap-add")
    [m.name for m in cmd.arg_type.members]   # ['node', 'name', 'granularity', ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from qmpd.qapi.loader import SourceInfo

__all__ = [
    "QAPIType", "BuiltinType", "EnumMember", "EnumType", "ArrayType", "Member",
    "Variant", "Variants", "ObjectType", "AlternateType", "CommandDef",
    "EventDef", "Schema", "INT_RANGES", "default_schema_dir", "load_schema",
]

#: Inclusive value ranges of QAPI's integer builtins (before uint wrapping).
INT_RANGES: dict[str, tuple[int, int]] = {
    "int": (-(2**63), 2**63 - 1),
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "size": (0, 2**64 - 1),
}

_JSON_TYPES = {"str": "string", "number": "number", "bool": "boolean",
               "null": "null", "any": "value"}


class QAPIType:
    """Base class of every type."""

    name: str
    info: SourceInfo | None

    def json_type(self) -> str:
        """:return: the JSON type of values of this type (QEMU's names)."""
        raise NotImplementedError


@dataclass(eq=False)
class BuiltinType(QAPIType):
    """``str``, ``int``, ``uint32``, ``size``, ``bool``, ``number``, ``null``, ``any``..."""

    name: str
    info: SourceInfo | None = None

    def json_type(self) -> str:
        return "int" if self.name in INT_RANGES else _JSON_TYPES[self.name]


@dataclass(eq=False)
class EnumMember:
    name: str
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class EnumType(QAPIType):
    name: str
    info: SourceInfo | None
    members: list[EnumMember]
    features: list[str] = field(default_factory=list)

    @property
    def values(self) -> list[str]:
        return [m.name for m in self.members]

    def json_type(self) -> str:
        return "string"


@dataclass(eq=False)
class ArrayType(QAPIType):
    """``[T]``; named ``TList`` as in QEMU."""

    element: QAPIType
    info: SourceInfo | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.element.name + "List"

    def json_type(self) -> str:
        return "array"


@dataclass(eq=False)
class Member:
    name: str
    type: QAPIType
    optional: bool = False
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Variant:
    """A union branch (``case`` -> object type) or an alternative."""

    name: str
    type: QAPIType


@dataclass(eq=False)
class Variants:
    tag: Member
    variants: list[Variant]

    def lookup(self, case: str) -> Variant:
        for v in self.variants:
            if v.name == case:
                return v
        raise KeyError(case)


@dataclass(eq=False)
class ObjectType(QAPIType):
    """A struct, a union (with :attr:`variants`) or an implicit object."""

    name: str
    info: SourceInfo | None
    local_members: list[Member]
    base: ObjectType | None = None
    variants: Variants | None = None
    features: list[str] = field(default_factory=list)

    @property
    def implicit(self) -> bool:
        return self.name.startswith("q_")

    @property
    def members(self) -> list[Member]:
        base = self.base.members if self.base else []
        return base + self.local_members

    def member(self, name: str) -> Member | None:
        for m in self.members:
            if m.name == name:
                return m
        return None

    def json_type(self) -> str:
        return "object"


@dataclass(eq=False)
class AlternateType(QAPIType):
    name: str
    info: SourceInfo | None
    variants: list[Variant]
    features: list[str] = field(default_factory=list)

    def json_type(self) -> str:
        return "value"


@dataclass(eq=False)
class CommandDef:
    name: str
    info: SourceInfo
    arg_type: ObjectType | None
    ret_type: QAPIType | None
    boxed: bool = False
    allow_oob: bool = False
    success_response: bool = True
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class EventDef:
    name: str
    info: SourceInfo
    arg_type: ObjectType | None
    boxed: bool = False
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Schema:
    """Every entity, in definition order (the order introspection uses)."""

    types: dict[str, QAPIType]
    commands: dict[str, CommandDef]
    events: dict[str, EventDef]
    #: commands and events interleaved in definition order.
    entities: list[CommandDef | EventDef]
    pragmas: dict[str, object] = field(default_factory=dict)

    def lookup_type(self, name: str) -> QAPIType:
        """:raise KeyError: if there is no such type."""
        return self.types[name]

    def command(self, name: str) -> CommandDef:
        """:raise KeyError: if there is no such command."""
        return self.commands[name]

    def event(self, name: str) -> EventDef:
        """:raise KeyError: if there is no such event."""
        return self.events[name]

    @property
    def empty_object(self) -> ObjectType:
        t = self.types["q_empty"]
        assert isinstance(t, ObjectType)
        return t

    def named_types(self) -> list[QAPIType]:
        """:return: user-defined and implicit types in definition order."""
        return [t for t in self.types.values() if not isinstance(t, (BuiltinType, ArrayType))]


def default_schema_dir() -> Path:
    """:return: the QAPI definitions: ``qmpd/schema``, a link to the top-level
    ``schema/`` in a checkout, and a copy of it in an installed wheel."""
    return Path(__file__).resolve().parent.parent / "schema"


@lru_cache(maxsize=4)
def load_schema(top: Path | None = None) -> Schema:
    """Load and check the QAPI files (cached per path).

    :param top: top file; default ``schema/qmpd.json``.
    :raise SchemaError: on any syntax or semantic error.
    """
    from qmpd.qapi.builder import build
    from qmpd.qapi.exprcache import load_cached

    return build(load_cached(top or default_schema_dir() / "qmpd.json"))
