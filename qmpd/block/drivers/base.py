"""The :class:`BlockDriver` protocol every driver implements.

A driver is the per-node part of a request: the node (``qmpd.block.node``)
does the generic work (bounds, range locks, before-write hooks, bitmap
dirtying, blkdebug ``pwritev*`` events, flush generations) and then calls
its driver, which either touches a file through ``qmpd.block.io`` or forwards
to a child :class:`~qmpd.block.node.BlockNode`.

Drivers are opened by an :data:`DriverOpener` registered in
``qmpd.block.drivers.DRIVERS`` under their QAPI driver name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["BlockDriver", "DriverOpener", "OpenContext", "BaseDriver"]


class BlockDriver(Protocol):
    """What a node needs from its driver.  Offsets are node-relative and
    already checked against :attr:`length`."""

    #: QAPI driver name shown as ``drv`` ("raw", "file", "blkdebug", ...).
    name: str
    #: True for filters (blkdebug, copy-before-write): data passes through.
    is_filter: bool
    #: True if :meth:`debug_event` does anything (blkdebug); lets nodes skip it.
    has_events: bool
    #: True for QEMU protocol drivers (file, null-co, blkdebug): named before
    #: their children are opened (listing order, see ``qmpd.block.graph``).
    is_protocol: bool

    @property
    def length(self) -> int:
        """Size in bytes of what the node exposes."""

    @property
    def filename(self) -> str:
        """``file``/``image.filename`` of query output."""

    def full_options(self) -> dict[str, Any]:
        """The options a parent's ``json:`` filename nests for this node."""

    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes."""

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``."""

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make a range read as zeroes (``may_unmap``: a hole is fine)."""

    async def pdiscard(self, offset: int, length: int) -> None:
        """Discard a range (node-level ``discard`` policy already applied)."""

    async def flush_to_disk(self) -> None:
        """Make this node's own writes stable (children are flushed by the node)."""

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """:return: ``(is_data, n)`` for the first ``n`` (1..length) bytes."""

    def debug_event(self, event: str) -> None:
        """A blkdebug event raised on this node (no-op for most drivers)."""

    def actual_size(self) -> int | None:
        """Bytes allocated on disk, or None when unknown (no ``actual-size``)."""

    def node_opened(self, node: BlockNode) -> None:
        """Called once by the graph with the node built around this driver
        (before it is registered); :meth:`close` undoes whatever it did."""

    def close(self) -> None:
        """Release files; called once when the node goes away."""


class BaseDriver:
    """Defaults for the optional parts of :class:`BlockDriver`."""

    name = "?"
    is_filter = False
    has_events = False
    is_protocol = False

    def debug_event(self, event: str) -> None:
        """Ignore blkdebug events."""

    def full_options(self) -> dict[str, Any]:
        """The options QEMU's ``json:`` filenames nest for this node."""
        return {"driver": self.name, "filename": getattr(self, "filename")}

    def actual_size(self) -> int | None:
        """Unknown by default."""
        return None

    def node_opened(self, node: BlockNode) -> None:
        """Nothing to set up."""

    async def flush_to_disk(self) -> None:
        """Nothing of its own to flush."""

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class OpenContext:
    """What a driver opener gets besides its options."""

    #: Name of the node being opened (user-given or automatic).
    node_name: str
    #: Effective ``read-only``.
    read_only: bool
    #: Effective ``cache.direct`` (O_DIRECT for files).
    direct: bool
    #: ``await open_child(ref, role)`` opens an inline child (a mapping) or
    #: looks up a named node (a string) and returns it, not yet attached.
    open_child: Callable[[Any, str], Awaitable[BlockNode]]
    #: ``lookup_node(name)`` finds any registered node (e.g. a bitmap's);
    #: raises ``NodeNotFound`` ``"Node '%s' not found"``.
    lookup_node: Callable[[str], BlockNode]
    #: ``emit_event(name, data)`` sends a QMP event (None: nobody listens).
    emit_event: Callable[[str, dict[str, Any]], None] | None = None


#: ``await opener(options, ctx)`` returns the open driver plus its children
#: by role, or raises ``NodeOpenError``/``NodeNotFound``/``NodeNameError``.
DriverOpener = Callable[
    [Mapping[str, Any], OpenContext],
    Awaitable[tuple[BlockDriver, dict[str, "BlockNode"]]],
]
