"""Driver ``copy-before-write``: the point-in-time filter of backup (spec 4.6).

A :class:`CopyBeforeWrite` sits above a source node for a backup job's
lifetime (or as a ``blockdev-add``-ed fleecing filter).  Before any write,
write-zeroes or effective discard changes a cluster of the source whose
copy-bitmap bit is still set, the old cluster is copied to the target with
:meth:`~qmpd.block.copy.BlockCopy.copy_range`; if that copy fails the write
fails too (``break-guest-write``), or, with ``break-snapshot``, the write
goes through and copy-before-write stops for good.  (Only the backup job
creates the filter; ``blockdev-add`` of this driver is not supported.)

**Documented choice (differs from QEMU):** the copy runs in a before-write
hook on the *source* node, so writes addressed to the bare source node name
are preserved as well as writes through the filter (QEMU refuses the former
with a permission error while a backup runs, spec §10).  The filter itself
only forwards to the source, so a write through the filter passes the hook
exactly once and is never copied twice.

Internal bitmaps follow QEMU 7.2 up to 9.0 (spec 4.10): on the filter a
*done* bitmap (clusters processed by copy-before-write) and, newer, an
*access* bitmap (all set); the copy bitmap lives on the source node.  All
three are anonymous and disabled (``recording: false``)::

    backup-top: [{count 67108864}, {count 458752}]        access, done
    drive0:     [{count 0, recording false}, successor..., bitmap0...]
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmpd.bitmap import DirtyBitmap
from qmpd.block.copy import BlockCopy
from qmpd.block.drivers.base import BaseDriver
from qmpd.block.errors import BlockIOError
from qmpd.block.node import BlockNode, HookHandle

if TYPE_CHECKING:
    from qmpd.block.graph import BlockGraph

__all__ = ["CopyBeforeWrite", "insert_filter", "remove_filter", "unregister_node"]

logger = logging.getLogger(__name__)

DRIVER_NAME = "copy-before-write"


class CopyBeforeWrite(BaseDriver):
    """The filter's driver: forwards to ``source``; owns the hook and the
    filter-side bitmaps once :meth:`activate` ran.

    :param copy: the block-copy state whose copy bitmap decides what to copy.
    :param break_snapshot: ``on-cbw-error: break-snapshot``.
    """

    name = DRIVER_NAME
    is_filter = True

    def __init__(self, source: BlockNode, copy: BlockCopy, *, break_snapshot: bool = False) -> None:
        self.source = source
        self.copy = copy
        self.break_snapshot = break_snapshot
        #: A copy failed under ``break-snapshot``: the snapshot is invalid.
        self.snapshot_error: BlockIOError | None = None
        self.done_bitmap: DirtyBitmap | None = None
        self.access_bitmap: DirtyBitmap | None = None
        self._hook: HookHandle | None = None
        self._node: BlockNode | None = None

    # ------------------------------------------------------------ life cycle

    def activate(self, node: BlockNode) -> None:
        """Create the filter's internal bitmaps on ``node`` (the filter node)
        and start copying before writes to the source."""
        self._node = node
        cluster, size = self.copy.cluster_size, self.source.length
        self.done_bitmap = node.bitmaps.create_anonymous(cluster, disabled=True, size=size)
        self.access_bitmap = node.bitmaps.create_anonymous(cluster, disabled=True, size=size)
        self.access_bitmap.hbitmap.fill()
        self._hook = self.source.add_before_write_hook(self._before_write)

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
            await self.copy.copy_range(offset, length)
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
    node.detach_children()
    unregister_node(graph, node)


def unregister_node(graph: BlockGraph, node: BlockNode) -> None:
    """Drop a childless node from ``graph`` now; close it.

    ``BlockGraph.remove_node`` is a coroutine because it flushes; a
    read-only, childless node has nothing to flush, so the coroutine ends
    at its first step and is driven here without the event loop.
    """
    node.read_only = True
    coro = graph.remove_node(node)
    try:
        coro.send(None)
    except StopIteration:
        return
    # Not expected: the node is already out of the graph (the first step
    # unregisters it); close it here rather than leave a suspended coroutine.
    coro.close()
    logger.error("remove_node(%s) suspended; closed synchronously", node.node_name)
    node.close()
