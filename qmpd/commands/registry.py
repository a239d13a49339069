"""The command registry: ``@command`` decorators, frozen at start-up.

Handlers are coroutines ``async def h(ctx, args) -> value`` registered under
the verbatim QAPI name.  ``args`` is the generated pydantic model of the
command's arguments (see :mod:`qmpd.qapi.models`); the return value must be
JSON-able (``None`` answers ``{}``).  The daemon freezes the registry and
checks it against the schema before it serves anything: every registered
name must be a schema command, and only registered commands are advertised.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from qmpd.commands.context import CommandContext

__all__ = ["CommandSpec", "Registry", "REGISTRY", "command", "Handler"]

Handler = Callable[["CommandContext", Any], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One registered command."""

    name: str
    handler: Handler
    allow_oob: bool = False


class Registry:
    """A table of commands that refuses changes once frozen."""

    def __init__(self) -> None:
        self._specs: dict[str, CommandSpec] = {}
        self._frozen = False

    def command(self, name: str, *, allow_oob: bool = False) -> Callable[[H], H]:
        """Decorator registering ``handler`` as command ``name``.

        :raise RuntimeError: on a duplicate name or after :meth:`freeze`.
        """

        def register(handler: H) -> H:
            if self._frozen:
                raise RuntimeError(f"registry is frozen; cannot add {name!r}")
            if name in self._specs:
                raise RuntimeError(f"command {name!r} registered twice")
            self._specs[name] = CommandSpec(name, handler, allow_oob)
            return handler

        return register

    def freeze(self) -> None:
        """Refuse further registrations."""
        self._frozen = True

    def __getitem__(self, name: str) -> CommandSpec:
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def oob_commands(self) -> frozenset[str]:
        """Names of the commands flagged ``allow-oob``."""
        return frozenset(n for n, s in self._specs.items() if s.allow_oob)


#: The registry the command modules register into.
REGISTRY = Registry()
command = REGISTRY.command
