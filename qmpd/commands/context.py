"""What a command handler can reach: the daemon state and its own session."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from qmpd.events import EventBus

if TYPE_CHECKING:
    from qmpd.block.fdsets import FdSets, PassedFds
    from qmpd.block.graph import BlockGraph
    from qmpd.commands.objects import ObjectStore
    from qmpd.jobs.manager import JobManager
    from qmpd.machine import Machine

__all__ = ["CommandContext", "DaemonConfig", "DaemonState", "NbdControl", "OFFERED_CAPABILITIES", "SessionControl"]

#: Capabilities qmpd offers in its greeting (and accepts in qmp_capabilities).
OFFERED_CAPABILITIES = ("oob",)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Start-up settings visible to commands."""

    #: The QEMU version qmpd claims (greeting and ``query-version``).
    qemu_version: tuple[int, int, int] = (7, 2, 0)
    #: The ``package`` string of the greeting and ``query-version``.
    package: str = ""
    #: ``--name``: answered by ``query-name``.
    name: str | None = None
    #: ``-S``: start in the ``prelaunch`` run state.
    prelaunch: bool = False
    #: ``--state-dir``: where persistent bitmaps of raw images live (None: off).
    state_dir: str | None = None
    #: ``--state-flush-interval``: seconds before fine bits are stored lazily.
    state_flush_interval: float = 5.0
    #: ``--state-write-lease``: seconds qmpd's write lease reaches ahead.
    state_write_lease: float = 2.0
    #: ``--state-keep-transient-bitmaps``: keep raw nodes' non-persistent bitmaps too.
    state_keep_transient: bool = False

    def version_info(self) -> dict[str, Any]:
        """:return: the VersionInfo of ``query-version`` and the greeting."""
        major, minor, micro = self.qemu_version
        return {
            "qemu": {"micro": micro, "minor": minor, "major": major},
            "package": self.package,
        }

    def version_text(self) -> str:
        """:return: the version as HMP ``info version`` prints it (``7.2.0`` + package)."""
        major, minor, micro = self.qemu_version
        return f"{major}.{minor}.{micro}{self.package}"

    def greeting(self) -> dict[str, Any]:
        """:return: the QMP greeting."""
        return {"QMP": {"version": self.version_info(), "capabilities": list(OFFERED_CAPABILITIES)}}


class SessionControl(Protocol):
    """The connection-level operations a handler may ask for."""

    @property
    def negotiating(self) -> bool:
        """True until ``qmp_capabilities`` succeeded."""

    def negotiate(self, oob: bool) -> None:
        """Switch the connection to command mode after this reply."""


def _stdout(text: str) -> None:
    """Write ``text`` to stdout at once (the VM log of QEMU's harness)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
class NbdControl(Protocol):
    """The NBD server as the commands drive it (``qmpd.nbd.server``)."""

    async def start(self, addr: dict[str, Any], *, max_connections: int = 0,
                    tls_creds: str | None = None, tls_authz: str | None = None) -> None:
        """nbd-server-start with a flat SocketAddress."""

    async def stop(self) -> None:
        """nbd-server-stop."""

    def add(self, **kwargs: Any) -> None:
        """block-export-add type=nbd / nbd-server-add."""

    def delete(self, export_id: str, mode: str = "safe") -> None:
        """block-export-del / nbd-server-remove."""

    def query(self) -> list[dict[str, Any]]:
        """query-block-exports."""


@dataclass
class DaemonState:
    """The daemon's global state, shared by every connection."""

    config: DaemonConfig
    events: EventBus
    #: Asks the daemon to shut down with a SHUTDOWN ``reason``.
    request_shutdown: Any = None
    block: BlockGraph | None = None
    jobs: JobManager | None = None
    machine: Machine | None = None
    #: The NBD server (set up by the daemon).
    nbd: NbdControl | None = None
    #: Objects made by object-add (set up by the daemon).
    objects: ObjectStore = None  # type: ignore[assignment]
    #: Names of every advertised command (frozen registry).
    command_names: tuple[str, ...] = ()
    #: Where qemu-io's output goes (QEMU prints it on its stdout).
    console: Any = field(default=_stdout)
    #: Cached ``query-qmp-schema`` answer.
    introspection: list[dict[str, Any]] = field(default_factory=list)
    #: Random identity of this daemon run (``__org.qmpd_query-instance``).
    boot_id: str = ""
    #: Start time, seconds since the epoch (wall clock).
    start_time: float = 0.0
    #: Descriptor sets of ``add-fd`` (the block layer's opener consults them).
    fdsets: FdSets | None = None


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
    #: Descriptors the client passed with SCM_RIGHTS (None: a connection
    #: that cannot pass descriptors, e.g. TCP or WebSocket).
    fds: PassedFds | None = None
