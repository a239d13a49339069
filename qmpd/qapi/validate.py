"""Argument validation: JSON Schema decides, a QAPI-order walk words the error.

:class:`ArgumentValidator` compiles one jsonschema validator per command
(against the checked-in ``schema/qmpd.schema.json``).  Valid arguments cost
one ``is_valid`` call.  Invalid ones are walked the way QEMU's QObject input
visitor walks them (members in declaration order, base first; nested objects
depth-first, each object's unexpected keys reported after its members) to
find the first error QEMU would report, in QEMU's words::

    v = ArgumentValidator()
    v.validate("blockdev-add", {"driver": "raw", "node-name": "n", "file": {"driver": "file"}})
    # GenericError: Parameter 'file.filename' is missing

Paths are ``a.b`` and ``list[3]``; range, enum and alternate messages use
the bare member name (``null`` inside lists), as QEMU does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmpd.errors import CommandNotFound, GenericError
from qmpd.qapi import models
from qmpd.qapi.jsonschema import command_ref, qapi_validator_class
from qmpd.qapi.schema import ObjectType, Schema, default_schema_dir, load_schema
from qmpd.qapi.walk import first_error, normalize, uses_wrapping

if TYPE_CHECKING:
    from pydantic import BaseModel  # imported with the first model, not at start-up

__all__ = ["ArgumentValidator"]


class ArgumentValidator:
    """Validates and builds the arguments of every command of a schema.

    :param schema: the QAPI schema (default: :func:`load_schema`).
    :param json_schema: the JSON Schema document (default: the checked-in
        ``schema/qmpd.schema.json``).
    """

    def __init__(self, schema: Schema | None = None,
                 json_schema: dict[str, Any] | None = None) -> None:
        self.schema = schema or load_schema()
        if json_schema is None:
            path = default_schema_dir() / "qmpd.schema.json"
            json_schema = json.loads(Path(path).read_text(encoding="utf-8"))
        self._defs = json_schema["$defs"]
        self._validators: dict[str, Any] = {}
        empty = self.schema.empty_object
        #: commands for which ``{}`` is valid (no member is required and the
        #: arguments are no union): checked without building a validator,
        #: so the first commands (``qmp_capabilities``, queries) do not wait
        #: for jsonschema
        self._empty_ok = {c.name for c in self.schema.commands.values()
                          if not (c.arg_type or empty).variants
                          and all(m.optional for m in (c.arg_type or empty).members)}
        self._wraps = {c.name for c in self.schema.commands.values()
                       if c.arg_type is not None and uses_wrapping(c.arg_type)}

    def arg_type(self, command: str) -> ObjectType:
        """:return: the command's argument type.  :raise CommandNotFound: unknown command."""
        try:
            cmd = self.schema.commands[command]
        except KeyError:
            raise CommandNotFound(f"The command {command} has not been found") from None
        return cmd.arg_type or self.schema.empty_object

    def json_validator(self, command: str) -> Any:
        """:return: the (cached) jsonschema validator of the command's arguments."""
        v = self._validators.get(command)
        if v is None:
            root = _inline(self._defs, self._defs[command_ref(command)], ())
            v = qapi_validator_class()({"$defs": self._defs, **root})
            self._validators[command] = v
        return v

    def validate(self, command: str, arguments: dict[str, Any]) -> None:
        """Check *arguments* of *command*.

        :raise CommandNotFound: if the schema has no such command.
        :raise GenericError: with QEMU's text for the first error QEMU would report.
        """
        if command in self._empty_ok and not arguments:
            return
        arg_type = self.arg_type(command)
        if self.json_validator(command).is_valid(arguments):
            return
        msg = first_error(arg_type, arguments)
        if msg is None:                      # the walker missed what jsonschema saw
            err = next(iter(self.json_validator(command).iter_errors(arguments)))
            path = ".".join(str(p) for p in err.absolute_path)
            msg = f"Invalid parameter '{path}'" if path else "Invalid parameters"
        raise GenericError(msg)

    def normalize(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """:return: valid *arguments* with negative unsigned values wrapped (2**64 + v),
            as the command would see them in QEMU.  A copy only when needed."""
        if command not in self._wraps or not _has_negative(arguments):
            return arguments
        out = normalize(self.arg_type(command), arguments)
        assert isinstance(out, dict)
        return out

    def build(self, command: str, arguments: dict[str, Any]) -> BaseModel:
        """:return: the argument model of *command* for already validated *arguments*."""
        return models.COMMAND_ARGS[command].model_validate(self.normalize(command, arguments))

    def parse(self, command: str, arguments: dict[str, Any]) -> BaseModel:
        """:meth:`validate`, then :meth:`build`.

        :raise CommandNotFound: unknown command.
        :raise GenericError: invalid arguments (QEMU's text).
        """
        self.validate(command, arguments)
        return self.build(command, arguments)


def _inline(defs: dict[str, Any], node: Any, stack: tuple[str, ...]) -> Any:
    """Copy *node* with ``$ref``s replaced by their targets, except recursive ones.

    jsonschema resolves references slowly; an inlined schema validates several
    times faster.  References back into a definition being expanded stay.
    """
    if isinstance(node, list):
        return [_inline(defs, n, stack) for n in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and len(node) == 1:
        key = ref[len("#/$defs/"):]
        if stack.count(key) >= 2:          # unroll recursion once, then refer
            return node
        return _inline(defs, defs[key], (*stack, key))
    return {k: _inline(defs, v, stack) for k, v in node.items()}


def _has_negative(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_negative(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_negative(v) for v in value)
    return isinstance(value, int) and value < 0
