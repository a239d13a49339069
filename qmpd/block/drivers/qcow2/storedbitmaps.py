"""Persistent dirty bitmaps of an open qcow2 image: the driver's glue over
:mod:`bitmaps_io` (load at open, set ``in_use``, store at close).

Crash order (QEMU's): at a read-write open the ``bitmaps`` autoclear bit
is cleared and the header written, the directory is rewritten in place
with ``in_use`` set, then the bit is set again.  To store, new data
clusters, tables and directory are written (refcounts first, by
:meth:`Qcow2Image.allocate_metadata`), then the header, and only then are
the old clusters freed: a crash leaks clusters at worst.
"""

from __future__ import annotations

from qmpd.block.drivers.qcow2 import bitmaps_io as bio
from qmpd.block.drivers.qcow2.bitmaps_ext import (
    FLAG_IN_USE, BitmapError, BitmapsExt, DirEntry, with_flags,
)
from qmpd.block.drivers.qcow2.header import AUTOCLEAR_BITMAPS
from qmpd.block.drivers.qcow2.image import Qcow2Image

__all__ = ["ImageBitmapIO", "open_bitmaps", "store_bitmaps"]


class ImageBitmapIO:
    """:class:`bitmaps_io.BitmapIO` on a :class:`Qcow2Image`."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image, self.cluster_size = image, image.g.cluster_size

    async def read(self, off: int, n: int) -> bytes:
        return bytes(await self.image.file.read(off, n))

    async def write(self, off: int, data: bytes) -> None:
        await self.image.write_metadata(off, data)

    async def allocate(self, nbytes: int) -> int:
        return await self.image.allocate_metadata(-(-nbytes // self.cluster_size), "bitmap")


def _ext(image: Qcow2Image) -> BitmapsExt | None:
    h = image.header
    if h.bitmaps_ext is None or not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    return BitmapsExt.of(h.bitmaps_ext)


async def open_bitmaps(image: Qcow2Image,
                       writable: bool) -> tuple[list[DirEntry], list[bytes | None]]:
    """:return: the directory as on disk afterwards (``in_use`` set when
    ``writable``) and each bitmap's bits (None: in use, inconsistent)."""
    ext = _ext(image)
    if ext is None:
        return [], []
    io = ImageBitmapIO(image)
    entries = await bio.load_bitmaps(io, ext, image.size)
    bits = [await bio.load_bitmap(io, e, image.size) for e in entries]
    if writable and entries:
        h = image.header
        h.autoclear_features &= ~AUTOCLEAR_BITMAPS
        await image.rewrite_header()
        await image.file.flush()
        entries = with_flags(entries, FLAG_IN_USE)
        await bio.rewrite_directory(io, ext, entries)
        await image.file.flush()
        h.autoclear_features |= AUTOCLEAR_BITMAPS
        await image.rewrite_header()
        await image.file.flush()
    return entries, bits


async def store_bitmaps(image: Qcow2Image, on_disk: list[DirEntry], keep: set[str],
                        bitmaps: list[bio.MemBitmap]) -> list[DirEntry]:
    """Store ``bitmaps`` (newest first, as QEMU), keep the on-disk entries
    named in ``keep`` (the inconsistent ones) and drop the others.

    :return: the new directory.
    """
    async with image.lock:
        io = ImageBitmapIO(image)
        ext = _ext(image)
        stored = {b.name for b in bitmaps}
        existing = [e for e in on_disk if e.name in keep or e.name in stored]
        gone: list[tuple[int, int]] = []
        for e in on_disk:
            if e.name not in keep and e.name not in stored:
                try:
                    gone += await bio.bitmap_clusters(io, e)
                except BitmapError:
                    pass  # unreadable table: leaked, as QEMU
        res = await bio.store_all(io, ext, existing, bitmaps, image.size)
        await image.file.flush()
        h = image.header
        if res.ext is not None:
            h.bitmaps_ext = res.ext.as_tuple()
            h.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            h.bitmaps_ext = None
            h.autoclear_features &= ~AUTOCLEAR_BITMAPS
        await image.rewrite_header()
        await image.file.flush()
        cs = image.g.cluster_size
        for off, n in res.free + gone:
            await image.free_metadata(off, -(-n // cs))
        return res.entries
