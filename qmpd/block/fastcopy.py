"""File-level helpers of block-copy's fast path (see :mod:`qmpd.block.copy`).

A node that is a plain ``raw``-over-``file`` (or ``file``) chain without
blkdebug is a window of one image file; block-copy may then copy between
the files directly and must do by hand what the node request path would
have done after a write (:func:`mark_written`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpd.block.drivers.file import FileDriver
from qmpd.block.drivers.raw import RawDriver
from qmpd.block.io import ImageFile
from qmpd.block.node import BlockNode

__all__ = ["FileView", "file_view", "mark_written", "mark_read"]


@dataclass(frozen=True, slots=True)
class FileView:
    """A node that is a window of one image file: ``node offset + base``."""

    image: ImageFile
    base: int
    #: The chain from the node down to the file node, with each node's base.
    chain: tuple[tuple[BlockNode, int], ...]


def file_view(node: BlockNode, *, for_write: bool) -> FileView | None:
    """:return: the file behind a plain ``raw``/``file`` node, or None."""
    chain: list[tuple[BlockNode, int]] = []
    base = 0
    cur = node
    while True:
        if cur.driver.has_events:
            return None
        if for_write and (cur.read_only or cur.detect_zeroes != "off" or cur.has_hooks):
            return None
        chain.append((cur, base))
        drv = cur.driver
        if isinstance(drv, FileDriver):
            return FileView(drv.image, base, tuple(chain))
        if isinstance(drv, RawDriver):
            base += drv.offset
            cur = drv.file
            continue
        return None


def mark_written(view: FileView, offset: int, nbytes: int) -> None:
    """What the node path does after a write: generation and bitmaps."""
    for node, base in view.chain:
        node.write_gen += 1
        node.bytes_written += nbytes
        if node.bitmaps:
            node.bitmaps.mark_dirty(base + offset, nbytes)


def mark_read(view: FileView, nbytes: int) -> None:
    """What the node path counts for a read: bytes read on every node."""
    for node, _ in view.chain:
        node.bytes_read += nbytes
