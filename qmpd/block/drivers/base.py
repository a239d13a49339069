"""The :class:`BlockDriver` protocol every driver implements.

A driver is the per-node part of a request: the node (``qmpd.block.node``)
does the generic work (bounds, range locks, before-write hooks, bitmap
dirtying, blkdebug ``pwritev*`` events, flush generations) and then calls
its driver, which either touches a file through ``qmpd.block.io`` or forwards
to a child :class:`~qmpd.block.node.BlockNode`.

Drivers are opened by the :class:`DriverSpec` registered in
``qmpd.block.drivers.DRIVERS`` under their QAPI driver name.

Capabilities.  Besides the requests, a driver answers a few questions the
generic code asks instead of recognising drivers by name or class.  All are
optional (:class:`BaseDriver` has the defaults):

=====================  ==============================================  =========
capability             meaning                                         default
=====================  ==============================================  =========
``is_format``          a format driver (raw, qcow2) over a ``file``    False
                       child; :attr:`DriverSpec.is_format` says the
                       same before opening (QEMU opens the ``file``
                       child before naming the node)
``is_protocol``        a protocol driver (file, null-co, blkdebug)     False
``is_filter``          data passes through to the primary child        False
``dirty_flag()``       ImageInfo ``dirty-flag``: the image's dirty     None
                       bit, or None when QEMU's bdrv_get_info() fails
                       (no ``dirty-flag`` listed; a filter's node then
                       asks its filtered child)
``file_window()``      a :class:`FileWindow`: the node's bytes are a   None
                       window of one image file (directly, or via a
                       child node), so block-copy may copy file to file
``cluster_map()``      a :class:`ClusterMap`: the node's data lies in  None
                       whole clusters of its ``file`` child that the
                       driver maps (qcow2), so block-copy may copy
                       file to file through the mapping
``block_status()``     ``(is_data, n)``: data or zeroes, as read       all data
                       through this node (layers below included)
``is_allocated()``     ``(allocated, n)``: provided by this layer      all here
                       (True) or by a backing child below (False)
=====================  ==============================================  =========

A qcow2 driver, for instance: ``is_format = True``; its opener returns the
backing node as child ``"backing"`` (:attr:`BlockNode.backing`);
``dirty_flag()`` reads the header's dirty bit; ``block_status`` answers for
the whole chain and ``is_allocated`` tells its own clusters from the
backing file's; ``file_window()`` stays None (clusters are not a window)
unless the layout is raw-like; ``cluster_map()`` maps its data clusters.

Every write that changes a node's data ends in
:meth:`BlockNode.record_write <qmpd.block.node.BlockNode.record_write>`
(write generation, dirty bitmaps), whether it went through the request
path or around it (block-copy's fast path, via
:meth:`BlockNode.write_around <qmpd.block.node.BlockNode.write_around>`).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qmpd.block.errors import BlockIOError

if TYPE_CHECKING:
    from qmpd.block.io import IOPool
    from qmpd.block.io import ImageFile
    from qmpd.block.node import BlockNode

__all__ = ["BlockDriver", "DriverOpener", "DriverSpec", "FileWindow", "FormatDetails", "OpenContext",
           "BaseDriver", "Breakpoints", "ClusterMap", "Extents"]


class Breakpoints(Protocol):
    """qemu-io's ``break``/``remove_break``/``resume``/``wait_break`` on a
    driver that can hold requests (blkdebug).  Errors are ``BlockIOError``."""

    def add_breakpoint(self, event: str, tag: str) -> None:
        """Hold the next request raising ``event`` under ``tag``."""

    def remove_breakpoint(self, tag: str) -> None:
        """Drop ``tag``'s breakpoints and release its held requests."""

    def resume(self, tag: str) -> None:
        """Release the requests held under ``tag``."""

    async def wait_suspended(self, tag: str) -> None:
        """Return once a request is held under ``tag``."""


@dataclass(frozen=True, slots=True)
class FileWindow:
    """Answer of :meth:`BlockDriver.file_window`: the node's bytes
    ``[0, length)`` are bytes ``[offset, offset + length)`` of ``image``
    (a driver over a file) or of the ``child`` node (a driver that only
    shifts offsets, like ``raw``), which is then asked in turn."""

    #: Where the node's byte 0 lies in the file or child.
    offset: int
    #: The image file itself, or None when ``child`` is set.
    image: ImageFile | None = None
    #: The child node holding the window, or None when ``image`` is set.
    child: BlockNode | None = None


#: ``(node offset, offset in the mapped file, n)`` extents, ascending.
Extents = list[tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class ClusterMap:
    """Answer of :meth:`BlockDriver.cluster_map`: the node's data lies in
    whole clusters of the ``file`` child at offsets the driver maps.

    ``await map_data(offset, length)`` returns the extents holding
    ``[offset, offset + length)`` when all of it is data of this node's own
    clusters, else None.  ``await write_mapped(ranges, fill)`` writes whole
    clusters of ``ranges`` with the driver's crash ordering: it allocates
    and maps them, awaits ``fill(extents)`` (the caller puts the data at
    those file offsets and records the file writes), then commits the
    mapping; ``ValueError`` when a range is not cluster aligned."""

    file: BlockNode
    cluster_size: int
    map_data: Callable[[int, int], Awaitable[Extents | None]]
    write_mapped: Callable[[Sequence[tuple[int, int]], Callable[[Extents], Awaitable[None]]],
                           Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FormatDetails:
    """Answer of :meth:`BlockDriver.format_details`: what an image format
    records about itself (ImageInfo's ``cluster-size``, backing file names
    and ``format-specific``; the views build the QAPI shapes)."""

    #: "qcow2".
    format: str
    cluster_size: int
    #: Image version as QEMU names it ("0.10", "1.1").
    compat: str
    lazy_refcounts: bool
    refcount_bits: int
    corrupt: bool
    extended_l2: bool
    #: "zlib" or "zstd".
    compression_type: str
    #: The backing file name as stored in the image, or None.
    backing_filename: str | None = None
    #: The backing format as stored in the image, or None.
    backing_format: str | None = None


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
    #: True for format drivers (raw, qcow2) over a ``file`` child.
    is_format: bool

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
        """:return: ``(is_data, n)`` for the first ``n`` (1..length) bytes:
        data, or reading as zeroes, through this node (backing included)."""

    async def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """:return: ``(allocated, n)`` for the first ``n`` (1..length) bytes:
        True when this layer provides them, False when they come from a
        backing child (QEMU's bdrv_is_allocated())."""

    def dirty_flag(self) -> bool | None:
        """ImageInfo ``dirty-flag``, or None when not reported."""

    def file_window(self) -> FileWindow | None:
        """The file window behind this node (see :class:`FileWindow`), or
        None when the node's bytes are not one window of one file."""

    def format_details(self) -> FormatDetails | None:
        """What the image format records (see :class:`FormatDetails`), or None."""

    def cluster_map(self) -> ClusterMap | None:
        """The mapping of this node's data clusters in its ``file`` child
        (see :class:`ClusterMap`), or None."""

    async def before_close(self) -> None:
        """Last writes before the node closes (qcow2 stores its persistent
        bitmaps); called by the graph with the children still open."""

    def debug_event(self, event: str) -> None:
        """A blkdebug event raised on this node (no-op for most drivers)."""

    def breakpoints(self) -> Breakpoints | None:
        """qemu-io's breakpoint commands, for drivers that can hold requests."""

    async def truncate(self, size: int) -> None:
        """Resize to ``size`` bytes (``block_resize``); :raise BlockIOError:
        ENOTSUP where the driver cannot."""

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
    is_format = False

    def breakpoints(self) -> Breakpoints | None:
        """No qemu-io breakpoint commands (blkdebug has them)."""
        return None

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """All data (QEMU's default for drivers without block status)."""
        return True, length

    async def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """Everything is this layer's own (no backing child)."""
        return True, length

    def dirty_flag(self) -> bool | None:
        """Not reported."""
        return None

    def file_window(self) -> FileWindow | None:
        """No file window."""
        return None

    def format_details(self) -> FormatDetails | None:
        """Not an image format with details."""
        return None

    def cluster_map(self) -> ClusterMap | None:
        """No mapped clusters."""
        return None

    async def before_close(self) -> None:
        """Nothing to write."""

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

    async def truncate(self, size: int) -> None:
        """Not supported unless the driver says otherwise."""
        raise BlockIOError(errno.ENOTSUP)

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
    #: The worker threads files are opened with (None: the shared pool).
    pool: IOPool | None = None
    #: ``emit_event(name, data)`` sends a QMP event (None: nobody listens).
    emit_event: Callable[[str, dict[str, Any]], None] | None = None


#: ``await opener(options, ctx)`` returns the open driver plus its children
#: by role, or raises ``NodeOpenError``/``NodeNotFound``/``NodeNameError``.
DriverOpener = Callable[
    [Mapping[str, Any], OpenContext],
    Awaitable[tuple[BlockDriver, dict[str, "BlockNode"]]],
]


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """A driver as ``blockdev-add`` knows it before opening a node."""

    #: Opens a node's driver from its options.
    open: DriverOpener
    #: A format driver: QEMU opens its ``file`` child before it names (and
    #: checks the name of) the node, so the child's errors come first.
    #: Equal to the driver class's :attr:`BlockDriver.is_format`.
    is_format: bool = False
