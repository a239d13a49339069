"""Driver ``copy-before-write``: the point-in-time filter of backup (spec 4.6).

A :class:`CopyBeforeWrite` sits above a source node for a backup job's
lifetime, or as a ``blockdev-add``-ed fleecing filter (:func:`open_cbw`:
``file`` = the disk, ``target`` = the fleece node, as qmpbackup does).
Before any write, write-zeroes or effective discard changes a cluster of the
source whose copy-bitmap bit is still set, the old cluster is copied to the
target with :meth:`~qmpd.block.copy.BlockCopy.copy_range`; if that copy
fails (or outlasts ``cbw-timeout``) the write fails too
(``break-guest-write``), or, with ``break-snapshot``, the write goes
through and copy-before-write stops for good.

Where the copy hooks in:

* the backup job's filter (**documented choice, differs from QEMU**): a
  before-write hook on the *source* node, so writes addressed to the bare
  source node name are preserved as well as writes through the filter
  (QEMU refuses the former with a permission error while a backup runs,
  spec §10).  The filter only forwards to the source, so a write through
  it passes the hook exactly once and is never copied twice.
* a ``blockdev-add``-ed filter (as QEMU 7.2): a hook on the *filter* node;
  writes addressed to the source node directly bypass copy-before-write.
  Its copy bitmap starts all set, or as ``bitmap`` (at cluster
  granularity); only those clusters are ever copied.

Internal bitmaps follow QEMU 7.2 up to 9.0 (spec 4.10): on the filter a
*done* bitmap (clusters processed by copy-before-write) and, newer, an
*access* bitmap (all set for the job; a copy of the initial copy bitmap for
a ``blockdev-add``-ed filter); the copy bitmap lives on the source node.
All three are anonymous and disabled (``recording: false``)::

    backup-top: [{count 67108864}, {count 458752}]        access, done
    drive0:     [{count 0, recording false}, successor..., bitmap0...]
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qmpd.bitmap import BitmapError, BitmapNotFound, DirtyBitmap
from qmpd.bitmap.errors import sizes_differ
from qmpd.block.copy import DEFAULT_CLUSTER, BlockCopy
from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverSpec, OpenContext
from qmpd.block.errors import BlockIOError, NodeOpenError
from qmpd.block.node import BlockNode, HookHandle
from qmpd.tasks import TaskGroup

if TYPE_CHECKING:
    from qmpd.block.graph import BlockGraph

__all__ = ["CopyBeforeWrite", "SPEC", "insert_filter", "open_cbw", "remove_filter"]

logger = logging.getLogger(__name__)

DRIVER_NAME = "copy-before-write"


class CopyBeforeWrite(BaseDriver):
    """The filter's driver: forwards to ``source``; owns the hook and the
    filter-side bitmaps once :meth:`activate` ran.

    :param copy: the block-copy state whose copy bitmap decides what to copy.
    :param break_snapshot: ``on-cbw-error: break-snapshot``.
    :param standalone: opened by ``blockdev-add`` (module docstring): hook
        the filter node, not the source; the access bitmap starts as the
        copy bitmap.
    :param timeout: ``cbw-timeout`` in seconds (0: none); a copy taking
        longer fails the write (or breaks the snapshot) with ETIMEDOUT and
        finishes in the background.
    """

    name = DRIVER_NAME
    is_filter = True

    def __init__(
        self,
        source: BlockNode,
        copy: BlockCopy,
        *,
        break_snapshot: bool = False,
        standalone: bool = False,
        timeout: float = 0,
    ) -> None:
        self.source = source
        self.copy = copy
        self.break_snapshot = break_snapshot
        self.standalone = standalone
        self.timeout = timeout
        #: Copies still running after their write timed out.
        self.late_copies: set[asyncio.Future[None]] = set()
        #: Every copy started under a timeout (also one whose request was
        #: cancelled); settle() awaits them all.
        self._copies = TaskGroup("cbw", log_failures=False)
        #: A copy failed under ``break-snapshot``: the snapshot is invalid.
        self.snapshot_error: BlockIOError | None = None
        self.done_bitmap: DirtyBitmap | None = None
        self.access_bitmap: DirtyBitmap | None = None
        self._hook: HookHandle | None = None
        self._node: BlockNode | None = None

    # ------------------------------------------------------------ life cycle

    def activate(self, node: BlockNode) -> None:
        """Create the filter's internal bitmaps on ``node`` (the filter node)
        and start copying before writes to the source (standalone: to the
        filter)."""
        self._node = node
        cluster, size = self.copy.cluster_size, self.source.length
        self.done_bitmap = node.bitmaps.create_anonymous(cluster, disabled=True, size=size)
        self.access_bitmap = node.bitmaps.create_anonymous(cluster, disabled=True, size=size)
        if self.standalone:
            self.access_bitmap.hbitmap.merge_from(self.copy.bits)
            self._hook = node.add_before_write_hook(self._before_write)
        else:
            self.access_bitmap.hbitmap.fill()
            self._hook = self.source.add_before_write_hook(self._before_write)

    def node_opened(self, node: BlockNode) -> None:
        """blockdev-add built the filter node: :meth:`activate` it."""
        self.activate(node)

    def deactivate(self) -> None:
        """Stop copying and drop the internal bitmaps (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._node is not None:
            for bm in (self.done_bitmap, self.access_bitmap):
                if bm is not None and bm in self._node.bitmaps:
                    self._node.bitmaps.remove(bm)
        self.done_bitmap = self.access_bitmap = None

    async def _before_write(self, node: BlockNode, offset: int, length: int) -> None:
        if self.snapshot_error is not None:
            return
        try:
            await self._copy(offset, length)
        except BlockIOError as exc:
            if not self.break_snapshot:
                raise
            logger.warning("copy-before-write failed; snapshot broken: %s", exc)
            self.snapshot_error = exc
            return
        if self.done_bitmap is not None:
            c = self.copy.cluster_size
            start = offset - offset % c
            end = min(-(-(offset + length) // c) * c, self.done_bitmap.size)
            if end > start:
                self.done_bitmap.hbitmap.set(start, end - start)

    async def _copy(self, offset: int, length: int) -> None:
        if not self.timeout:
            await self.copy.copy_range(offset, length)
            return
        task = self._copies.spawn(self.copy.copy_range(offset, length), name="cbw-copy")
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except TimeoutError:
            # The copy goes on in the background (as QEMU's); its outcome
            # only shows in the copy bitmap.  settle() awaits it before the
            # node goes away.
            self.late_copies.add(task)
            task.add_done_callback(self._late_done)
            raise BlockIOError(errno.ETIMEDOUT) from None

    def _late_done(self, task: asyncio.Future[None]) -> None:
        self.late_copies.discard(task)
        _consume(task)

    async def settle(self) -> None:
        """Wait for the copies that outlived their request's timeout."""
        await self._copies.wait()

    # ------------------------------------------------------------ requests

    @property
    def length(self) -> int:
        return self.source.length

    @property
    def filename(self) -> str:
        return self.source.driver.filename

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.source.read(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.source.write(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.source.write_zeroes(offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.source.discard(offset, length)

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        return await self.source.block_status(offset, length)

    def actual_size(self) -> int | None:
        return self.source.driver.actual_size()

    def close(self) -> None:
        self.deactivate()
        bm = self.copy.copy_bitmap
        if bm in self.source.bitmaps:
            self.source.bitmaps.remove(bm)


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("timed-out copy-before-write failed: %s", task.exception())


# ---------------------------------------------------------------- blockdev-add


async def open_cbw(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Opener of ``blockdev-add`` driver ``copy-before-write`` (QEMU 7.2):
    ``file``, ``target`` (BlockdevRef), ``bitmap`` {node, name},
    ``on-cbw-error``, ``cbw-timeout``.  Checks in QEMU's order: the
    children, the bitmap's node (``"Node '%s' not found"``) and name
    (``"Dirty bitmap '%s' not found"``), then the merge into the copy
    bitmap (busy/inconsistent/size, prefixed ``"Cannot create
    block-copy-state: Failed to merge bitmap '%s' to internal
    copy-bitmap: "``).  The target may differ in size from ``file``.
    """
    source = await ctx.open_child(options["file"], "file")
    target = await ctx.open_child(options["target"], "target")
    bitmap: DirtyBitmap | None = None
    ref = options.get("bitmap")
    if ref is not None:
        bitmap = ctx.lookup_node(str(ref["node"])).bitmaps.find(str(ref["name"]))
        if bitmap is None:
            raise BitmapNotFound(str(ref["name"]))
    copy_bitmap = source.bitmaps.create_anonymous(DEFAULT_CLUSTER, disabled=True)
    if bitmap is None:
        copy_bitmap.hbitmap.fill()
    else:
        try:
            bitmap.check(readonly=False)
            if bitmap.size != copy_bitmap.size:
                raise sizes_differ(copy_bitmap.size, bitmap.size)
        except BitmapError as exc:
            source.bitmaps.remove(copy_bitmap)
            raise NodeOpenError(
                "Cannot create block-copy-state: Failed to merge bitmap "
                f"'{bitmap.name}' to internal copy-bitmap: {exc.desc}"
            ) from exc
        copy_bitmap.hbitmap.merge_from(bitmap.hbitmap)
    driver = CopyBeforeWrite(
        source,
        BlockCopy(source, target, copy_bitmap, cluster_size=DEFAULT_CLUSTER, skip_hole_zeroing=False),
        break_snapshot=options.get("on-cbw-error") == "break-snapshot",
        standalone=True,
        timeout=float(options.get("cbw-timeout") or 0),
    )
    return driver, {"file": source, "target": target}


#: ``blockdev-add`` driver ``copy-before-write``.
SPEC = DriverSpec(open_cbw, is_format=CopyBeforeWrite.is_format)


# ---------------------------------------------------------------- graph surgery


def insert_filter(
    graph: BlockGraph, source: BlockNode, driver: CopyBeforeWrite, node_name: str | None
) -> BlockNode:
    """Build the filter node above ``source``, re-point ``source``'s parents
    to it and register it (spec 4.6).  Nothing changes if this raises.

    :param node_name: ``filter-node-name``, or None for a ``#block...`` name.
    :raise NodeNameError: the node-name rules of blockdev-add.
    """
    if node_name is not None:
        graph.check_node_name(node_name)
    name = node_name if node_name is not None else graph.generate_name()
    node = BlockNode(
        name,
        driver,
        children={"file": source},
        auto_named=node_name is None,
        owned_by_monitor=False,
    )
    graph.add_node(node)
    graph.replace_node(source, node)
    driver.activate(node)
    return node


def remove_filter(graph: BlockGraph, node: BlockNode) -> None:
    """Undo :func:`insert_filter`: stop copying, give the filter's parents
    back to the source and drop the filter, synchronously and without
    flushing (a flush would raise blkdebug events QEMU does not raise)."""
    driver = node.driver
    assert isinstance(driver, CopyBeforeWrite)
    driver.deactivate()
    graph.replace_node(node, driver.source)
    graph.unregister(node)
