"""Every handler is annotated with its command's generated argument model,
so mypy checks the members it reads.

The command modules import the models only under ``TYPE_CHECKING`` (the
models are created on first use, which keeps start-up short); the
annotation is resolved here against :mod:`qmpd.qapi.models` and must be
the very class the validator uses for that command."""

from __future__ import annotations

import sys
import typing
from typing import Any

from qmpd.commands import handlers  # noqa: F401  (registers the handlers)
from qmpd.commands.registry import REGISTRY
from qmpd.qapi import models
from qmpd.qapi.models import COMMAND_ARGS


class _ModelsNamespace(dict[str, Any]):
    """The handler's module first, then the generated models (created on lookup)."""

    def __init__(self, module_globals: dict[str, Any]) -> None:
        super().__init__(module_globals)

    def __missing__(self, name: str) -> Any:
        try:
            return getattr(models, name)
        except AttributeError:
            raise KeyError(name) from None


def test_every_handler_takes_its_model() -> None:
    wrong = {}
    for name in REGISTRY:
        handler = REGISTRY[name].handler
        ns = _ModelsNamespace(vars(sys.modules[handler.__module__]))
        hints = typing.get_type_hints(handler, localns=ns)
        if hints.get("args") is not COMMAND_ARGS[name]:
            wrong[name] = hints.get("args")
    assert len(REGISTRY) == len(COMMAND_ARGS) and wrong == {}


def test_importing_the_commands_creates_no_model() -> None:
    """Start-up pays for no model: a fresh interpreter that imports the
    daemon (command tables included) has created none and has not even
    imported pydantic."""
    import subprocess

    code = ("import sys, qmpd.server.daemon, qmpd.cli.main, qmpd.commands.handlers\n"
            "from qmpd.qapi import models\n"
            "made = [n for n in models._FACTORIES if n in vars(models)]\n"
            "print(len(made), 'pydantic.main' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"], out.stdout
