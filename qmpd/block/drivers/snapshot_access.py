"""Driver ``snapshot-access``: the point-in-time view of a copy-before-write filter.

``blockdev-add driver=snapshot-access file=CBW`` (QEMU 7.0+, libvirt's
pull-mode backup) exposes the disk as it was when the ``copy-before-write``
filter ``CBW`` was added: a cluster the filter already copied is read from
its target, any other from the disk itself (unchanged so far, since every
write through the filter copies first)::

    disk  : AAAA BBBB CCCC          after a guest write of XXXX to cluster 1
    target: .... BBBB ....          (copied before the write)
    snap  : AAAA BBBB CCCC          cluster 1 from the target, others from disk

As QEMU 7.2 (block/snapshot-access.c, block/copy-before-write.c):

* reads of clusters outside the filter's *access* bitmap (not in its
  ``bitmap``, or discarded here) fail with EACCES, and so does every read
  once a copy failed under ``on-cbw-error: break-snapshot``;
* ``discard`` drops whole clusters from the view: they leave the access
  bitmap, are no longer copied before writes, and the target's copy is
  discarded;
* writes and write-zeroes fail with ENOTSUP; flush does nothing;
* block status answers from the target or the disk, like reads.

The node is a valid backup source and may hold dirty bitmaps.  Deliberate
difference: QEMU 7.2 accepts a ``file`` that is not a copy-before-write
node (and crashes on the first read); qmpd refuses it at open with
``"'NAME' is not a copy-before-write node"``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverSpec, OpenContext
from qmpd.block.drivers.cbw import CopyBeforeWrite
from qmpd.block.errors import BlockIOError, NodeOpenError
from qmpd.block.node import BlockNode

__all__ = ["SPEC", "SnapshotAccess", "open_snapshot_access"]

DRIVER_NAME = "snapshot-access"


class SnapshotAccess(BaseDriver):
    """Reads the snapshot kept by ``cbw`` (the filter node's driver)."""

    name = DRIVER_NAME

    def __init__(self, filter_node: BlockNode, cbw: CopyBeforeWrite) -> None:
        self.filter_node = filter_node
        self.cbw = cbw

    @property
    def length(self) -> int:
        return self.cbw.length

    @property
    def filename(self) -> str:
        return self.cbw.filename

    def full_options(self) -> dict[str, Any]:
        return {"driver": self.name, "file": self.filter_node.node_name}

    def actual_size(self) -> int | None:
        return self.cbw.actual_size()

    # ------------------------------------------------------------ view

    def _cluster(self) -> int:
        return self.cbw.copy.cluster_size

    def _check_access(self, offset: int, length: int) -> None:
        """:raise BlockIOError: EACCES if broken or outside the access bitmap."""
        if self.cbw.snapshot_error is not None:
            raise BlockIOError(errno.EACCES)
        access = self.cbw.access_bitmap
        if access is None or access.hbitmap.next_clean(offset, offset + length) >= 0:
            raise BlockIOError(errno.EACCES)

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """:return: ``(offset, n, from_target)`` runs covering the range."""
        done = self.cbw.done_bitmap
        end = offset + length
        if done is None:
            return [(offset, length, False)]
        hb = done.hbitmap
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            copied = hb.get(pos)
            nxt = hb.next_clean(pos, end) if copied else hb.next_dirty(pos, end)
            stop = end if nxt < 0 else nxt
            out.append((pos, stop - pos, copied))
            pos = stop
        return out

    async def pread(self, offset: int, length: int) -> bytes:
        self._check_access(offset, length)
        parts: list[bytes] = []
        for pos, n, from_target in self._runs(offset, length):
            node = self.cbw.copy.target if from_target else self.cbw.source
            parts.append(await node.read(pos, n))
        data = b"".join(parts)
        # A copy may have broken the snapshot while we read the disk.
        if self.cbw.snapshot_error is not None:
            raise BlockIOError(errno.EACCES)
        return data

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        self._check_access(offset, length)
        pos, n, from_target = self._runs(offset, length)[0]
        node = self.cbw.copy.target if from_target else self.cbw.source
        return await node.block_status(pos, n)

    # ------------------------------------------------------------ changes

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def pdiscard(self, offset: int, length: int) -> None:
        """Drop the whole clusters inside the range from the snapshot."""
        c = self._cluster()
        start = -(-offset // c) * c
        end = min((offset + length) // c * c, self.length)
        if offset + length >= self.length:
            end = self.length
        if end <= start:
            return
        if self.cbw.access_bitmap is not None:
            self.cbw.access_bitmap.hbitmap.reset(start, end - start)
        self.cbw.copy.bits.reset(start, end - start)
        target = self.cbw.copy.target
        if end <= target.length:
            await target.discard(start, end - start)


async def open_snapshot_access(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Opener of ``blockdev-add`` driver ``snapshot-access`` (``file``: the
    copy-before-write node, by name or inline)."""
    child = await ctx.open_child(options["file"], "file")
    if not isinstance(child.driver, CopyBeforeWrite):
        raise NodeOpenError(f"'{child.node_name}' is not a copy-before-write node")
    return SnapshotAccess(child, child.driver), {"file": child}


SPEC = DriverSpec(open_snapshot_access, is_format=SnapshotAccess.is_format)
