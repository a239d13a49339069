"""The VM run state: ``-S`` (prelaunch), ``stop``/``cont``, ``query-status``.

qmpd runs no guest, so the run state is a table and two verbs.  QEMU 7.2's
rules, as observed (tests/transcripts/machine_runstate.qmp)::

    prelaunch --cont--> running   RESUME
    running   --stop--> paused    STOP
    paused    --cont--> running   RESUME
    io-error  --cont--> running   RESUME (I/O status of every backend reset)
    cont when running, stop when not running: nothing, no event

``query-status``'s ``running`` is true only in ``running``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmpd.events import EventBus

__all__ = ["RunState", "STOP", "RESUME"]

STOP = "STOP"
RESUME = "RESUME"

#: States ``cont`` starts the VM from.
_STARTABLE = frozenset({"prelaunch", "paused", "io-error", "debug", "suspended", "running"})


class RunState:
    """The run state and its transitions.

    :param events: where STOP and RESUME go.
    :param prelaunch: start in ``prelaunch`` (``-S``) instead of ``running``.
    """

    def __init__(self, events: EventBus, *, prelaunch: bool = False) -> None:
        self.events = events
        self.status = "prelaunch" if prelaunch else "running"
        #: Called when ``cont`` leaves ``io-error`` (resets I/O status).
        self.on_cont: list[Callable[[], None]] = []

    @property
    def running(self) -> bool:
        return self.status == "running"

    def info(self) -> dict[str, Any]:
        """:return: query-status' StatusInfo."""
        return {"status": self.status, "running": self.running}

    def stop(self, reason: str = "paused") -> None:
        """``stop`` (or an error action): only a running VM stops, with STOP."""
        if self.status != "running":
            return
        self.status = reason
        self.events.emit(STOP)

    def cont(self) -> None:
        """``cont``: RESUME (nothing when already running).

        :raise ValueError: in a state ``cont`` cannot leave (``shutdown``...).
        """
        if self.status not in _STARTABLE:
            raise ValueError(self.status)
        if self.status == "running":
            return
        for hook in self.on_cont:
            hook()
        self.status = "running"
        self.events.emit(RESUME)
