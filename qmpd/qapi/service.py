"""The schema as the daemon uses it: one object, loaded once at start-up.

::

    svc = SchemaService.load()
    names = svc.check_registry(set(registry))     # SchemaError on unknown names
    state.introspection = svc.introspection(names)  # cached per name set
    args = svc.build_arguments("block-dirty-bitmap-add", {"node": "n", "name": "b"})
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmpd.errors import SchemaError
from qmpd.qapi.introspect import introspect
from qmpd.qapi.schema import Schema, default_schema_dir, load_schema
from qmpd.qapi.validate import ArgumentValidator

if TYPE_CHECKING:
    from pydantic import BaseModel  # imported with the first model, not at start-up

__all__ = ["SchemaService"]


class SchemaService:
    """Schema, validator and introspection, bundled for :mod:`qmpd.server`."""

    def __init__(self, schema: Schema, validator: ArgumentValidator) -> None:
        self.schema = schema
        self.validator = validator
        self._introspection: dict[frozenset[str], list[dict[str, Any]]] = {}

    @classmethod
    def load(cls, schema_dir: Path | None = None) -> SchemaService:
        """Load ``schema/qmpd.json`` and the checked-in JSON Schema (cached).

        :raise SchemaError: if the QAPI files are broken.
        """
        return _load(schema_dir or default_schema_dir())

    def check_registry(self, registered: set[str]) -> list[str]:
        """:return: the registered command names, sorted.

        :raise SchemaError: if a registered name is not a schema command.
        """
        unknown = sorted(registered - set(self.schema.commands))
        if unknown:
            raise SchemaError("commands registered but not in the schema: " + ", ".join(unknown))
        return sorted(registered)

    def introspection(self, commands: set[str] | list[str] | frozenset[str]) -> list[dict[str, Any]]:
        """:return: the ``query-qmp-schema`` answer listing only *commands* (cached)."""
        key = frozenset(commands)
        if key not in self._introspection:
            self._introspection[key] = introspect(self.schema, key)
        return self._introspection[key]

    def validate_arguments(self, command: str, arguments: dict[str, Any]) -> None:
        """:raise GenericError: QEMU's text for invalid arguments.
        :raise CommandNotFound: unknown command."""
        self.validator.validate(command, arguments)

    def build_arguments(self, command: str, arguments: dict[str, Any]) -> BaseModel:
        """Validate *arguments*, then build the command's argument model.

        :raise GenericError: QEMU's text for invalid arguments.
        :raise CommandNotFound: unknown command.
        """
        return self.validator.parse(command, arguments)


@lru_cache(maxsize=4)
def _load(schema_dir: Path) -> SchemaService:
    schema = load_schema(schema_dir / "qmpd.json")
    doc = json.loads((schema_dir / "qmpd.schema.json").read_text(encoding="utf-8"))
    return SchemaService(schema, ArgumentValidator(schema, doc))
