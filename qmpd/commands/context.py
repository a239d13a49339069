"""What a command handler can reach: the daemon state and its own session."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from qmpd.events import EventBus

if TYPE_CHECKING:
    from qmpd.block.graph import BlockGraph
    from qmpd.jobs.manager import JobManager

__all__ = ["CommandContext", "DaemonConfig", "DaemonState", "SessionControl"]


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Start-up settings visible to commands."""

    #: The QEMU version qmpd claims (greeting and ``query-version``).
    qemu_version: tuple[int, int, int] = (7, 2, 0)
    #: The ``package`` string of the greeting and ``query-version``.
    package: str = ""
    #: ``--name``: answered by ``query-name``.
    name: str | None = None


class SessionControl(Protocol):
    """The connection-level operations a handler may ask for."""

    @property
    def negotiating(self) -> bool:
        """True until ``qmp_capabilities`` succeeded."""

    def negotiate(self, oob: bool) -> None:
        """Switch the connection to command mode after this reply."""


@dataclass
class DaemonState:
    """The daemon's global state, shared by every connection."""

    config: DaemonConfig
    events: EventBus
    #: Asks the daemon to shut down with a SHUTDOWN ``reason``.
    request_shutdown: Any = None
    block: BlockGraph | None = None
    jobs: JobManager | None = None
    #: Names of every advertised command (frozen registry).
    command_names: tuple[str, ...] = ()
    #: Cached ``query-qmp-schema`` answer.
    introspection: list[dict[str, Any]] = field(default_factory=list)


def _stay_attached() -> None:
    """The default :attr:`CommandContext.detach`: keep the command lock."""


@dataclass(slots=True)
class CommandContext:
    """Passed to every handler."""

    state: DaemonState
    session: SessionControl
    #: ``detach()`` lets other clients' commands that touch no block state
    #: run while this handler does long I/O (``qemu-io``); commands that do
    #: touch block state keep waiting until the handler has finished.
    detach: Callable[[], None] = _stay_attached
