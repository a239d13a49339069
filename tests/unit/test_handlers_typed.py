"""Every handler is annotated with its command's generated argument model,
so mypy checks the members it reads."""

from __future__ import annotations

import typing

from qmpd import commands  # noqa: F401  (registers the handlers)
from qmpd.commands.registry import REGISTRY
from qmpd.qapi.models import COMMAND_ARGS


def test_every_handler_takes_its_model() -> None:
    wrong = {}
    for name in REGISTRY:
        hints = typing.get_type_hints(REGISTRY[name].handler)
        if hints.get("args") is not COMMAND_ARGS[name]:
            wrong[name] = hints.get("args")
    assert len(REGISTRY) == len(COMMAND_ARGS) and wrong == {}
