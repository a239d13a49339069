"""File-level helpers of block-copy's fast path (see :mod:`qmpd.block.copy`).

A node whose driver chain answers :meth:`~qmpd.block.drivers.base.BlockDriver.file_window`
down to an image file (``raw`` over ``file``, ``file``; any driver that is
a window of one file), without blkdebug, is a window of that file;
block-copy may then copy between the files directly and must do by hand
what the node request path would have done after a write
(:func:`mark_written`, or :func:`write_direct` with the range lock and
before-write hooks as well).

A qcow2 node over such a file is a :class:`CopyEnd` too: its driver's
:meth:`~qmpd.block.drivers.base.BlockDriver.cluster_map` says where its
data clusters lie (:func:`copy_end`), and :func:`write_end` writes whole
clusters through the driver's allocation and crash ordering while the
data goes file to file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.node import BlockNode

if TYPE_CHECKING:
    # Annotations only: drivers/ imports every driver, and cbw imports
    # block-copy, which imports this module (an import cycle otherwise,
    # whichever of them comes first).
    from qmpd.block.drivers.base import ClusterMap, Extents
    from qmpd.block.io import ImageFile

__all__ = ["FileView", "file_view", "mark_written", "write_direct", "mark_read",
           "CopyEnd", "copy_end", "write_end", "pair_extents"]


@dataclass(frozen=True, slots=True)
class FileView:
    """A node that is a window of one image file: ``node offset + base``."""

    image: ImageFile
    base: int
    #: The chain from the node down to the file node, with each node's base.
    chain: tuple[tuple[BlockNode, int], ...]


def file_view(node: BlockNode, *, for_write: bool) -> FileView | None:
    """:return: the file behind ``node`` (asking each driver's
    ``file_window()``), or None."""
    chain: list[tuple[BlockNode, int]] = []
    base = 0
    cur = node
    while True:
        if cur.driver.has_events:
            return None
        if for_write and (cur.read_only or cur.detect_zeroes != "off" or cur.has_hooks):
            return None
        chain.append((cur, base))
        window = cur.driver.file_window()
        if window is None:
            return None
        base += window.offset
        if window.image is not None:
            return FileView(window.image, base, tuple(chain))
        if window.child is None:
            return None
        cur = window.child


def mark_written(view: FileView, offset: int, nbytes: int) -> None:
    """What the node path does after a write: generation and bitmaps."""
    for node, base in view.chain:
        node.record_write(base + offset, nbytes)


async def write_direct(
    view: FileView, ranges: Sequence[tuple[int, int]], io: Callable[[], Awaitable[None]]
) -> None:
    """Run ``io`` (a write of ``ranges`` straight to ``view.image``) with the
    top node's range lock and before-write hooks, then record the write on
    every node of the chain (see :meth:`BlockNode.write_around`)."""
    await view.chain[0][0].write_around(ranges, io, below=view.chain[1:])


def mark_read(view: FileView, nbytes: int) -> None:
    """What the node path counts for a read: bytes read on every node."""
    for node, _ in view.chain:
        node.bytes_read += nbytes


@dataclass(frozen=True, slots=True)
class CopyEnd:
    """One end of a file-to-file copy: the node and the file holding its
    data, either as a window (``clusters`` None: node offset ``x`` is
    ``data``'s offset ``x``) or through the driver's cluster mapping."""

    node: BlockNode
    #: The file holding the data (a window end: the node's own view).
    data: FileView
    clusters: ClusterMap | None

    async def extents(self, offset: int, length: int) -> Extents | None:
        """:return: ``(node offset, offset in data, n)`` of a range that is
        all data here, or None (some of it is not: copy it through nodes)."""
        if self.clusters is None:
            return [(offset, offset, length)]
        return await self.clusters.map_data(offset, length)

    def mark_read(self, nbytes: int) -> None:
        """Count a read of ``nbytes`` on the node and the nodes below."""
        if self.clusters is not None:
            self.node.bytes_read += nbytes
        mark_read(self.data, nbytes)


def copy_end(node: BlockNode, *, for_write: bool) -> CopyEnd | None:
    """:return: ``node`` as a file window, or as a mapped node (qcow2)
    directly over a file window, or None."""
    view = file_view(node, for_write=for_write)
    if view is not None:
        return CopyEnd(node, view, None)
    if node.driver.has_events:
        return None
    if for_write and (node.read_only or node.detect_zeroes != "off" or node.has_hooks):
        return None
    clusters = node.driver.cluster_map()
    if clusters is None:
        return None
    data = file_view(clusters.file, for_write=for_write)
    if data is None:
        return None
    return CopyEnd(node, data, clusters)


async def write_end(end: CopyEnd, ranges: Sequence[tuple[int, int]],
                    fill: Callable[[Extents], Awaitable[None]]) -> None:
    """Write ``ranges`` of ``end``'s node with the request path's
    bookkeeping (:func:`write_direct`); ``await fill(extents)`` puts the
    data at the offsets in ``end.data`` the driver allocated (whole clusters
    of a mapped end; the caller checks the alignment)."""
    if end.clusters is None:
        await write_direct(end.data, ranges, lambda: fill([(o, o, n) for o, n in ranges]))
        return
    data = end.data

    async def filled(extents: Extents) -> None:
        try:
            await fill(extents)
        finally:
            for _, at, n in extents:
                mark_written(data, at, n)

    write_mapped = end.clusters.write_mapped
    await end.node.write_around(ranges, lambda: write_mapped(ranges, filled))


def pair_extents(src: Extents, dst: Extents) -> list[tuple[int, int, int]]:
    """Match two extent lists covering the same node ranges in the same
    order.  :return: ``(source offset, target offset, n)``, merged where
    both sides continue contiguously.

    >>> pair_extents([(0, 100, 30)], [(0, 500, 10), (10, 700, 20)])
    [(100, 500, 10), (110, 700, 20)]
    """
    out: list[tuple[int, int, int]] = []
    i = j = 0
    s_at, d_at = (src[0][1], src[0][2]) if src else (0, 0), (dst[0][1], dst[0][2]) if dst else (0, 0)
    while i < len(src) and j < len(dst):
        n = min(s_at[1], d_at[1])
        a, b = s_at[0], d_at[0]
        if out and out[-1][0] + out[-1][2] == a and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((a, b, n))
        s_at = (a + n, s_at[1] - n)
        d_at = (b + n, d_at[1] - n)
        if not s_at[1]:
            i += 1
            if i < len(src):
                s_at = (src[i][1], src[i][2])
        if not d_at[1]:
            j += 1
            if j < len(dst):
                d_at = (dst[j][1], dst[j][2])
    return out
