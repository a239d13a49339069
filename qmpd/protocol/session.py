"""The QMP session state machine, sans-I/O.

A :class:`Session` turns parsed input messages into work items, in input
order:

* :class:`Reply` — an answer the session could give by itself (parse errors,
  malformed requests, unknown commands); send it as is.
* :class:`Call` — a well-formed request for a command of the current table;
  the driver validates the arguments, runs the command and builds the reply
  with :meth:`Session.success` or :meth:`Session.failure`.

The checks follow QEMU's ``qmp-dispatch.c`` order (spec §1.5): object
check, ``id`` remembered, members inspected in their own order, missing
``execute``, unknown command, ``exec-oob`` for a command that is not
``allow-oob``.  Two command tables exist, as in QEMU's monitor: while
negotiating only ``qmp_capabilities`` is known and every other name gets
CommandNotFound with the "Expecting capabilities negotiation" text.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from qmpd.protocol.framing import FramingError

__all__ = ["Call", "Reply", "Session", "SessionState", "NEGOTIATION_COMMAND"]

NEGOTIATION_COMMAND = "qmp_capabilities"
_NEGOTIATION_TABLE = frozenset({NEGOTIATION_COMMAND})
_NO_ID = object()


class SessionState(enum.Enum):
    """Where a connection is in its life."""

    #: Greeting sent; only ``qmp_capabilities`` is accepted.
    NEGOTIATING = "negotiating"
    #: Negotiation done; the full command table is in use.
    COMMAND = "command"


@dataclass(frozen=True, slots=True)
class Reply:
    """A message the session answered by itself."""

    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """A request the driver must execute."""

    name: str
    arguments: dict[str, Any]
    #: The request's ``id``, or the module's private no-id marker.
    id: object
    oob: bool


def _error(error_class: str, desc: str, msg_id: object = _NO_ID) -> dict[str, Any]:
    # QEMU writes the id first in error replies and last in success replies.
    error = {"class": error_class, "desc": desc}
    if msg_id is _NO_ID:
        return {"error": error}
    return {"id": msg_id, "error": error}


class Session:
    """One connection's negotiation state and request checker.

    :param commands: names of the command table used after negotiation.
    :param oob_commands: the subset flagged ``allow-oob``.
    """

    __slots__ = ("state", "oob_enabled", "_commands", "_oob_commands")

    def __init__(self, commands: Collection[str], oob_commands: Collection[str] = ()) -> None:
        self.state = SessionState.NEGOTIATING
        self.oob_enabled = False
        self._commands = frozenset(commands)
        self._oob_commands = frozenset(oob_commands)

    def negotiated(self, oob: bool, commands: Collection[str] | None = None,
                   oob_commands: Collection[str] | None = None) -> None:
        """Switch to command mode (after a successful ``qmp_capabilities``).

        :param commands: the command table from now on, when it was not
            known at construction (a daemon that greets before it has loaded
            its commands; the table is used only in command mode).
        :param oob_commands: its ``allow-oob`` subset.
        """
        self.state = SessionState.COMMAND
        self.oob_enabled = oob
        if commands is not None:
            self._commands = frozenset(commands)
        if oob_commands is not None:
            self._oob_commands = frozenset(oob_commands)

    def handle(self, item: object) -> Reply | Call:
        """Check one parsed input item; :return: the work it asks for."""
        if isinstance(item, FramingError):
            return Reply(_error("GenericError", item.desc))
        if not isinstance(item, dict):
            return Reply(_error("GenericError", "QMP input must be a JSON object"))
        msg_id = item.get("id", _NO_ID)
        name: str | None = None
        cmd_key: str | None = None
        arguments: dict[str, Any] = {}
        for key, value in item.items():
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    return Reply(_error("GenericError", f"QMP input member '{key}' must be a string", msg_id))
                if cmd_key is not None:
                    desc = f"QMP input member '{key}' clashes with '{cmd_key}'"
                    return Reply(_error("GenericError", desc, msg_id))
                cmd_key, name = key, value
            elif key == "arguments":
                if not isinstance(value, dict):
                    desc = "QMP input member 'arguments' must be an object"
                    return Reply(_error("GenericError", desc, msg_id))
                arguments = value
            elif key != "id":
                return Reply(_error("GenericError", f"QMP input member '{key}' is unexpected", msg_id))
        if name is None:
            return Reply(_error("GenericError", "QMP input lacks member 'execute'", msg_id))
        if self.state is SessionState.NEGOTIATING:
            if name not in _NEGOTIATION_TABLE:
                desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
                return Reply(_error("CommandNotFound", desc, msg_id))
        elif name not in self._commands:
            return Reply(_error("CommandNotFound", f"The command {name} has not been found", msg_id))
        oob = cmd_key == "exec-oob"
        if oob and name not in self._oob_commands:
            return Reply(_error("GenericError", f"The command {name} does not support OOB", msg_id))
        return Call(name, arguments, msg_id, oob)

    @staticmethod
    def success(call: Call, value: Any) -> dict[str, Any]:
        """:return: the success reply to ``call``."""
        msg: dict[str, Any] = {"return": {} if value is None else value}
        if call.id is not _NO_ID:
            msg["id"] = call.id
        return msg

    @staticmethod
    def failure(call: Call, error_class: str, desc: str) -> dict[str, Any]:
        """:return: the error reply to ``call``."""
        return _error(error_class, desc, call.id)
