"""Dirty bitmaps (layer L1: pure, no asyncio, no wire dicts).

:mod:`.hbitmap` holds the bits, :mod:`.dirty` QEMU's per-node bitmap model
(flags, successors, checks, merge), :mod:`.errors` the QEMU error texts.
"""

from qmpd.bitmap.dirty import DEFAULT_GRANULARITY, BitmapList, DirtyBitmap, merge
from qmpd.bitmap.errors import (
    BitmapBusy,
    BitmapError,
    BitmapInconsistent,
    BitmapNotFound,
    BitmapReadonly,
)
from qmpd.bitmap.hbitmap import HBitmap

__all__ = [
    "DEFAULT_GRANULARITY",
    "BitmapBusy",
    "BitmapError",
    "BitmapInconsistent",
    "BitmapList",
    "BitmapNotFound",
    "BitmapReadonly",
    "DirtyBitmap",
    "HBitmap",
    "merge",
]
