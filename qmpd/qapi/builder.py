"""Turn loader expressions into a checked :class:`~qmpd.qapi.schema.Schema`.

Two passes, as QEMU's ``scripts/qapi/schema.py``: first every definition is
registered by name (so references may point forward), then references are
resolved and the rules checked.  Every error names ``file:line``.
"""

from __future__ import annotations

import re
from typing import Callable

from qmpd.errors import SchemaError
from qmpd.qapi.loader import Expression, QAPIValue, SourceInfo
from qmpd.qapi.schema import (
    INT_RANGES, AlternateType, ArrayType, BuiltinType, CommandDef, EnumMember,
    EnumType, EventDef, Member, ObjectType, QAPIType, Schema, Variant, Variants,
)

__all__ = ["build"]

_BUILTINS = ["str", "number", "bool", "null", "any", *INT_RANGES]
_KEYS: dict[str, set[str]] = {
    "enum": {"enum", "data", "prefix", "features", "if"},
    "struct": {"struct", "data", "base", "features", "if"},
    "union": {"union", "data", "base", "discriminator", "features", "if"},
    "alternate": {"alternate", "data", "features", "if"},
    "command": {"command", "data", "returns", "boxed", "allow-oob", "allow-preconfig",
                "success-response", "gen", "coroutine", "features", "if"},
    "event": {"event", "data", "boxed", "features", "if"},
    "pragma": {"pragma"},
}
_NAME_RE = re.compile(r"(x-)?[a-z][a-z0-9-]*$")
_TYPE_RE = re.compile(r"[A-Z][A-Za-z0-9]*$")
#: A downstream extension's prefix, ``__RFQDN_`` (QEMU's qapi-code-gen.rst):
#: the name rules apply to what follows it.
_DOWNSTREAM_RE = re.compile(r"__[a-z0-9][a-z0-9.-]*_")


def _strip_downstream(name: str) -> str:
    m = _DOWNSTREAM_RE.match(name)
    return name[m.end():] if m else name


def _meta(e: Expression) -> str:
    for meta in _KEYS:
        if meta in e.expr:
            return meta
    raise e.info.error("expression must have one of " + ", ".join(repr(k) for k in _KEYS))


def _features(v: QAPIValue | None, info: SourceInfo) -> list[str]:
    out: list[str] = []
    for f in v if isinstance(v, list) else ([] if v is None else [v]):
        name = f.get("name") if isinstance(f, dict) else f
        if not isinstance(name, str):
            raise info.error("'features' must be a list of names")
        out.append(name)
    return out


class _Builder:
    def __init__(self, exprs: list[Expression]) -> None:
        self.exprs = exprs
        self.types: dict[str, QAPIType] = {n: BuiltinType(n) for n in _BUILTINS}
        self.defs: dict[str, Expression] = {}
        self.pragmas: dict[str, object] = {}
        self.fixups: list[Callable[[], None]] = []

    # -- helpers -------------------------------------------------------

    def resolve(self, ref: QAPIValue, info: SourceInfo, what: str) -> QAPIType:
        if isinstance(ref, list):
            if len(ref) != 1 or not isinstance(ref[0], str):
                raise info.error(f"{what}: array type must name exactly one element type")
            return ArrayType(self.resolve(ref[0], info, what))
        if not isinstance(ref, str):
            raise info.error(f"{what}: type must be a name or [name]")
        if ref not in self.types:
            raise info.error(f"{what} uses unknown type '{ref}'")
        return self.types[ref]

    def members(self, data: QAPIValue, info: SourceInfo, owner: str) -> list[Member]:
        if not isinstance(data, dict):
            raise info.error(f"'data' of '{owner}' must be an object")
        out: list[Member] = []
        for key, spec in data.items():
            optional, name = key.startswith("*"), key.lstrip("*")
            feats: list[str] = []
            if isinstance(spec, dict):
                feats = _features(spec.get("features"), info)
                if "type" not in spec:
                    raise info.error(f"member '{name}' of '{owner}' lacks 'type'")
                spec = spec["type"]
            self.check_name(name, info, owner, "member-name-exceptions")
            out.append(Member(name, self.resolve(spec, info, f"member '{name}' of '{owner}'"),
                              optional, feats))
        return out

    def check_name(self, name: str, info: SourceInfo, owner: str, pragma: str) -> None:
        exceptions = self.pragma_list(pragma)
        if not _NAME_RE.match(_strip_downstream(name)) and owner not in exceptions and name not in exceptions:
            raise info.error(f"name of '{owner}' member '{name}' should be lower-case"
                             if pragma == "member-name-exceptions"
                             else f"name '{name}' should be lower-case")

    def pragma_list(self, pragma: str) -> list[str]:
        value = self.pragmas.get(pragma, [])
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def implicit(self, name: str, data: QAPIValue, info: SourceInfo, owner: str) -> ObjectType:
        obj = ObjectType(name, info, [])
        self.types[name] = obj
        self.fixups.append(lambda: obj.local_members.extend(self.members(data, info, owner)))
        return obj

    # -- pass 1: register names ----------------------------------------

    def declare(self, e: Expression) -> None:
        meta, info = _meta(e), e.info
        extra = set(e.expr) - _KEYS[meta]
        if extra:
            raise info.error(f"{meta} has unknown key(s) " + ", ".join(sorted(extra)))
        if meta == "pragma":
            prag = e.expr["pragma"]
            if not isinstance(prag, dict):
                raise info.error("value of 'pragma' must be an object")
            self.pragmas.update(prag)
            return
        name = e.expr[meta]
        if not isinstance(name, str):
            raise info.error(f"'{meta}' requires a string name")
        if name in self.defs or name in self.types:
            raise info.error(f"'{name}' is already defined")
        self.defs[name] = e
        feats = _features(e.expr.get("features"), info)
        if meta in ("struct", "union", "alternate", "enum") and not _TYPE_RE.match(_strip_downstream(name)):
            raise info.error(f"name of {meta} '{name}' should use CamelCase")
        if meta == "enum":
            self.types[name] = EnumType(name, info, self.enum_members(e), feats)
        elif meta in ("struct", "union"):
            self.types[name] = ObjectType(name, info, [], features=feats)
        elif meta == "alternate":
            self.types[name] = AlternateType(name, info, [], feats)

    def enum_members(self, e: Expression) -> list[EnumMember]:
        data = e.expr.get("data")
        if not isinstance(data, list):
            raise e.info.error("'data' of enum must be an array")
        out: list[EnumMember] = []
        for v in data:
            name = v.get("name") if isinstance(v, dict) else v
            if not isinstance(name, str):
                raise e.info.error("enum values must be strings or {'name': ...}")
            if name in (m.name for m in out):
                raise e.info.error(f"enum value '{name}' is duplicated")
            feats = _features(v.get("features"), e.info) if isinstance(v, dict) else []
            out.append(EnumMember(name, feats))
        return out

    # -- pass 2: define ------------------------------------------------

    def define_object(self, e: Expression, obj: ObjectType) -> None:
        info, owner = e.info, obj.name
        base = e.expr.get("base")
        if isinstance(base, dict):
            obj.base = self.implicit(f"q_obj_{obj.name}-base", base, info, owner)
        elif base is not None:
            b = self.resolve(base, info, owner)
            if not isinstance(b, ObjectType) or b.variants:
                raise info.error(f"base of '{owner}' must be a struct")
            obj.base = b
        if "union" in e.expr:
            self.fixups.append(lambda: self.define_variants(e, obj))
        else:
            obj.local_members = self.members(e.expr.get("data", {}), info, owner)

    def define_variants(self, e: Expression, obj: ObjectType) -> None:
        info, tag_name = e.info, e.expr.get("discriminator")
        if obj.base is None or not isinstance(tag_name, str):
            raise info.error(f"union '{obj.name}' needs 'base' and 'discriminator'")
        tag = obj.base.member(tag_name)
        if tag is None:
            raise info.error(f"discriminator '{tag_name}' is not a member of 'base'")
        if tag.optional or not isinstance(tag.type, EnumType):
            raise info.error(f"discriminator member '{tag_name}' must be a mandatory enum")
        data = e.expr.get("data")
        if not isinstance(data, dict):
            raise info.error(f"'data' of union '{obj.name}' must be an object")
        variants: list[Variant] = []
        for case, ref in data.items():
            if case not in tag.type.values:
                raise info.error(f"branch '{case}' is not a value of {tag.type.name}")
            t = self.resolve(ref, info, f"branch '{case}'")
            if not isinstance(t, ObjectType) or t.variants:
                raise info.error(f"branch '{case}' of '{obj.name}' must be a struct")
            variants.append(Variant(case, t))
        for value in tag.type.values:     # QEMU pads unlisted cases with q_empty
            if value not in data:
                variants.append(Variant(value, self.types["q_empty"]))
        obj.variants = Variants(tag, variants)

    def define_alternate(self, e: Expression, alt: AlternateType) -> None:
        data = e.expr.get("data")
        if not isinstance(data, dict) or not data:
            raise e.info.error(f"'data' of alternate '{alt.name}' must be a non-empty object")
        seen: dict[str, str] = {}
        for case, ref in data.items():
            t = self.resolve(ref, e.info, f"alternative '{case}'")
            jt = "object" if isinstance(t, ObjectType) else t.json_type()
            if isinstance(t, (ArrayType, AlternateType)) or jt == "value":
                raise e.info.error(f"alternative '{case}' of '{alt.name}' has an invalid type")
            if jt in seen:
                raise e.info.error(f"alternative '{case}' can't be told from '{seen[jt]}'")
            seen[jt] = case
            alt.variants.append(Variant(case, t))

    def arg_type(self, e: Expression, name: str, kind: str) -> ObjectType | None:
        data = e.expr.get("data")
        if data is None:
            return None
        if isinstance(data, dict):
            return self.implicit(f"q_obj_{name}-arg", data, e.info, name)
        t = self.resolve(data, e.info, f"{kind} '{name}'")
        if not isinstance(t, ObjectType) or (t.variants and e.expr.get("boxed") is not True):
            raise e.info.error(f"'data' of {kind} '{name}' must be a struct"
                               " (or a union when 'boxed')")
        return t

    def build(self) -> Schema:
        self.types["q_empty"] = ObjectType("q_empty", None, [])
        for e in self.exprs:
            self.declare(e)
        commands: dict[str, CommandDef] = {}
        events: dict[str, EventDef] = {}
        entities: list[CommandDef | EventDef] = []
        for name, e in self.defs.items():
            t = self.types.get(name)
            if isinstance(t, ObjectType):
                self.define_object(e, t)
            elif isinstance(t, AlternateType):
                self.define_alternate(e, t)
            elif "command" in e.expr:
                c = self.command(e, name)
                commands[name] = c
                entities.append(c)
            elif "event" in e.expr:
                ev = EventDef(name, e.info, self.arg_type(e, name, "event"),
                              e.expr.get("boxed") is True, _features(e.expr.get("features"), e.info))
                events[name] = ev
                entities.append(ev)
        for fix in self.fixups:
            fix()
        self.check_clashes()
        return Schema(self.types, commands, events, entities, self.pragmas)

    def command(self, e: Expression, name: str) -> CommandDef:
        self.check_name(name, e.info, "command", "command-name-exceptions")
        ret = e.expr.get("returns")
        ret_type = None if ret is None else self.resolve(ret, e.info, f"command '{name}'")
        elem = ret_type.element if isinstance(ret_type, ArrayType) else ret_type
        if ret_type is not None and not isinstance(elem, ObjectType) \
                and name not in self.pragma_list("command-returns-exceptions"):
            raise e.info.error(f"command '{name}' cannot return '{ret_type.name}'")
        return CommandDef(
            name, e.info, self.arg_type(e, name, "command"), ret_type,
            boxed=e.expr.get("boxed") is True, allow_oob=e.expr.get("allow-oob") is True,
            success_response=e.expr.get("success-response", True) is not False,
            features=_features(e.expr.get("features"), e.info))

    def check_clashes(self) -> None:
        for t in self.types.values():
            if not isinstance(t, ObjectType):
                continue
            names = [m.name for m in t.members]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise (t.info or SourceInfo("<builtin>", 0)).error(
                    f"'{t.name}' has duplicate member(s) " + ", ".join(sorted(dup)))
            for v in t.variants.variants if t.variants else []:
                assert isinstance(v.type, ObjectType)
                clash = set(names) & {m.name for m in v.type.members}
                if clash:
                    raise (t.info or SourceInfo("<builtin>", 0)).error(
                        f"branch '{v.name}' of '{t.name}' redefines " + ", ".join(sorted(clash)))


def build(exprs: list[Expression]) -> Schema:
    """Build and check a schema from *exprs* (from :func:`qmpd.qapi.loader.load`).

    :raise SchemaError: on unknown keys or types, bad unions, clashes, bad names.
    """
    try:
        return _Builder(exprs).build()
    except SchemaError:
        raise
    except (TypeError, AttributeError) as err:   # malformed values deep in an expression
        raise SchemaError(f"malformed schema: {err}") from err
