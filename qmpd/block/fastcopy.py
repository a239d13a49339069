"""File-level helpers of block-copy's fast path (see :mod:`qmpd.block.copy`).

A node whose driver chain answers :meth:`~qmpd.block.drivers.base.BlockDriver.file_window`
down to an image file (``raw`` over ``file``, ``file``; any driver that is
a window of one file), without blkdebug, is a window of that file;
block-copy may then copy between the files directly and must do by hand
what the node request path would have done after a write
(:func:`mark_written`, or :func:`write_direct` with the range lock and
before-write hooks as well).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.node import BlockNode

if TYPE_CHECKING:
    from qmpd.block.io import ImageFile

__all__ = ["FileView", "file_view", "mark_written", "write_direct", "mark_read"]


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
