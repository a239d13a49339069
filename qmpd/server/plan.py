"""The start-up plan: what the command line asks the daemon to build.

The CLI (``qmpd.cli``) turns QEMU's or qemu-storage-daemon's options into
one :class:`StartupPlan`; :meth:`qmpd.server.daemon.Daemon.apply_plan`
executes it in QEMU's order (``-blockdev`` nodes, then ``-drive``s, then
``-device``s), and :meth:`~qmpd.server.daemon.Daemon.start` opens the
listeners and connects the client-mode sockets.  Each failure names the
option as QEMU does: ``-drive file=/x: Could not open '/x': ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpd.server.listeners import Connector

__all__ = ["StartupPlan", "StartupError"]


@dataclass
class StartupPlan:
    """Start-up actions, each with its option text (for error messages)."""

    blockdevs: list[str] = field(default_factory=list)
    drives: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    #: Client-mode QMP monitors (``-chardev socket,server=off`` + ``-mon``).
    connectors: list[Connector] = field(default_factory=list)
    #: Client-mode chardev's option text, per connector (error messages).
    connector_options: list[str] = field(default_factory=list)
    #: ``-qtest unix:path=...``: connect and hold.
    qtest: Connector | None = None
    qtest_option: str = ""


class StartupError(Exception):
    """A start-up option failed: ``"{option}: {message}"``."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}" if option else message)
        self.option = option
        self.message = message
