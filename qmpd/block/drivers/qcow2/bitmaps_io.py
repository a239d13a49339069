"""Persistent bitmaps in a qcow2 image: the I/O half of
:mod:`.bitmaps_ext`, in QEMU's order (block/qcow2-bitmap.c).

Everything goes through the narrow :class:`BitmapIO` interface, so the
driver plugs in its own reads, writes and cluster allocator.  Nothing here
frees clusters or rewrites the header: the driver writes its refcounts, then
the header with the new extension (:attr:`StoreResult.ext`), and only then
frees :attr:`StoreResult.free` -- a crash in between leaks clusters at
worst.  Errors are :class:`~.bitmaps_ext.BitmapError` with QEMU 7.2's texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from qmpd.block.drivers.qcow2.bitmaps_ext import (
    FLAG_AUTO, MAX_BITMAPS, MAX_DIRECTORY_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE, TABLE_OFFSET_MASK,
    BitmapError, BitmapsExt, DirEntry, assemble, bitmap_bytes, check_constraints,
    dir_entry_size, encode_directory, encode_table, parse_directory, parse_table, split_data,
)

__all__ = [
    "BitmapIO", "MemBitmap", "StoreResult", "load_bitmaps", "load_bitmap", "store_bitmap",
    "store_directory", "bitmap_clusters", "rewrite_directory", "store_all", "remove",
]


class BitmapIO(Protocol):
    """What the bitmap code needs from the open image."""

    @property
    def cluster_size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def allocate(self, nbytes: int) -> int:
        """:return: the host offset of ``nbytes`` (rounded up to clusters)
        of newly referenced, contiguous clusters."""
        ...


async def load_bitmaps(io: BitmapIO, ext: BitmapsExt, disk_size: int) -> list[DirEntry]:
    """:return: the directory the extension points at (QEMU's checks)."""
    if ext.directory_size == 0:
        raise BitmapError("Requested bitmap directory size is zero")
    if ext.directory_size > MAX_DIRECTORY_SIZE:
        raise BitmapError("Requested bitmap directory size is too big")
    buf = await io.read(ext.directory_offset, ext.directory_size)
    return parse_directory(buf, ext.nb_bitmaps, io.cluster_size, disk_size)


async def load_bitmap(io: BitmapIO, e: DirEntry, disk_size: int) -> bytes | None:
    """:return: the bitmap's data (:func:`bitmap_bytes` long), or None when
    it is ``in_use`` (QEMU skips the data and makes it inconsistent).
    :raise BitmapError: QEMU's texts for an unreadable table or a table of
    the wrong size."""
    if e.in_use:
        return None
    cs = io.cluster_size
    try:
        table = parse_table(await io.read(e.table_offset, e.table_size * 8), cs)
    except BitmapError as exc:
        raise BitmapError("Could not read bitmap_table table from image for bitmap "
                          f"'{e.name}': {exc.text}") from None
    nbytes = bitmap_bytes(disk_size, e.granularity_bits)
    if -(-nbytes // cs) != e.table_size:
        raise BitmapError(f"Could not read bitmap '{e.name}' from image: Invalid argument")
    clusters = {}
    for entry in table:
        off = entry & TABLE_OFFSET_MASK
        if off and off not in clusters:
            clusters[off] = await io.read(off, cs)
    return assemble(table, clusters, nbytes, cs)


async def store_bitmap(io: BitmapIO, name: str, data: bytes, disk_size: int,
                       granularity_bits: int, flags: int) -> DirEntry:
    """Write the bitmap's data clusters, then its table.

    :param data: the little-endian bits (:func:`bitmap_bytes` long).
    :param flags: ``FLAG_AUTO`` for an enabled bitmap (QEMU stores never
        more than that; set ``FLAG_IN_USE`` in the entry while open).
    :return: the directory entry to pass to :func:`store_directory`.
    """
    cs = io.cluster_size
    nbytes = bitmap_bytes(disk_size, granularity_bits)
    tb_size = -(-nbytes // cs)
    if tb_size > MAX_TABLE_SIZE or tb_size * cs > MAX_PHYS_SIZE:
        raise BitmapError(f"Bitmap '{name}' is too big")
    table = [0] * tb_size
    for i, chunk in enumerate(split_data(data[:nbytes], cs)):
        if chunk is not None:
            off = await io.allocate(cs)
            await io.write(off, chunk)
            table[i] = off
    raw = encode_table(table)
    toff = await io.allocate(len(raw))
    await io.write(toff, raw + bytes((-len(raw)) % cs))
    return DirEntry(name, toff, tb_size, flags, granularity_bits)


async def store_directory(io: BitmapIO, entries: Sequence[DirEntry]) -> BitmapsExt:
    """Write a new directory (in newly allocated clusters).

    :return: the extension to put into the header; the caller then sets the
        ``bitmaps`` autoclear bit, rewrites the header and only then frees
        the old directory and tables (:func:`bitmap_clusters`).
    """
    if len(entries) > MAX_BITMAPS:
        raise BitmapError("Too many persistent bitmaps")
    raw = encode_directory(entries)
    off = await io.allocate(len(raw))
    await io.write(off, raw)
    return BitmapsExt(len(entries), len(raw), off)


async def bitmap_clusters(io: BitmapIO, e: DirEntry) -> list[tuple[int, int]]:
    """:return: (host offset, bytes) of what ``e`` references: its data
    clusters, then its table; the caller frees them."""
    cs = io.cluster_size
    table = parse_table(await io.read(e.table_offset, e.table_size * 8), cs)
    out = [(t & TABLE_OFFSET_MASK, cs) for t in table if t & TABLE_OFFSET_MASK]
    out.append((e.table_offset, e.table_size * 8))
    return out


# --- whole operations, in QEMU's order -------------------------------------

async def rewrite_directory(io: BitmapIO, ext: BitmapsExt, entries: Sequence[DirEntry]) -> None:
    """Rewrite the directory in place (same names, so the same size), as
    QEMU sets ``in_use`` at open: the caller clears the ``bitmaps``
    autoclear bit in the header first, and sets it again after this."""
    raw = encode_directory(entries)
    if len(raw) != ext.directory_size or len(entries) != ext.nb_bitmaps or not ext.directory_offset:
        raise BitmapError("Can't update bitmap directory: Invalid argument")
    await io.write(ext.directory_offset, raw)


@dataclass(frozen=True, slots=True)
class MemBitmap:
    """A persistent bitmap in memory, to store."""

    name: str
    granularity: int
    enabled: bool
    #: The little-endian bits (:func:`bitmap_bytes` long).
    data: bytes


@dataclass(frozen=True, slots=True)
class StoreResult:
    #: The new extension for the header, or None: no bitmaps (clear the
    #: ``bitmaps`` autoclear bit and drop the extension).
    ext: BitmapsExt | None
    entries: list[DirEntry]
    #: (host offset, bytes) to free once the new header is written.
    free: list[tuple[int, int]]


async def store_all(io: BitmapIO, ext: BitmapsExt | None, existing: Sequence[DirEntry],
                    bitmaps: Sequence[MemBitmap], disk_size: int) -> StoreResult:
    """QEMU's qcow2_store_persistent_dirty_bitmaps (close, inactivation):
    the directory keeps its order, bitmaps not in it are appended in the
    order given (QEMU: newest first), flags become ``auto`` or nothing.

    :param existing: the directory as on disk (``in_use`` while open).
    :param bitmaps: the persistent, consistent, writable bitmaps.
    :raise BitmapError: QEMU's texts; nothing on disk refers to what was
        written before the error (at worst leaked clusters).
    """
    cs = io.cluster_size
    entries = list(existing)
    index = {e.name: i for i, e in enumerate(entries)}
    nb = len(entries)
    dsize = ext.directory_size if ext is not None else 0
    dropped: list[DirEntry] = []
    for b in bitmaps:
        try:
            check_constraints(b.name, b.granularity, disk_size, cs)
        except BitmapError as exc:
            raise BitmapError(f"Bitmap '{b.name}' doesn't satisfy the constraints: "
                              f"{exc.text}") from None
        i = index.get(b.name)
        if i is None:
            nb += 1
            if nb > MAX_BITMAPS:
                raise BitmapError("Too many persistent bitmaps")
            dsize += dir_entry_size(len(b.name.encode()))
            if dsize > MAX_DIRECTORY_SIZE:
                raise BitmapError("Bitmap directory is too large")
            index[b.name] = len(entries)
            entries.append(DirEntry(b.name, 0, 0, 0, b.granularity.bit_length() - 1))
        else:
            if not entries[i].in_use:
                raise BitmapError(f"Bitmap '{b.name}' already exists in the image")
            dropped.append(entries[i])
    for b in bitmaps:
        gbits = b.granularity.bit_length() - 1
        entries[index[b.name]] = await store_bitmap(io, b.name, b.data, disk_size, gbits,
                                                    FLAG_AUTO if b.enabled else 0)
    free: list[tuple[int, int]] = []
    if ext is not None:
        free.append((ext.directory_offset, ext.directory_size))
    for e in dropped:
        free.extend(await _clusters_or_leak(io, e))
    new_ext = await store_directory(io, entries) if entries else None
    return StoreResult(new_ext, entries, free)


async def remove(io: BitmapIO, ext: BitmapsExt, existing: Sequence[DirEntry],
                 name: str) -> StoreResult | None:
    """QEMU's qcow2_co_remove_persistent_dirty_bitmap.

    :return: None when ``name`` is not stored (not an error, as in QEMU);
        else the new directory (None when it was the last bitmap) and what
        to free after the header update: old directory, the bitmap's data
        clusters and table.
    """
    left = [e for e in existing if e.name != name]
    if len(left) == len(existing):
        return None
    gone = next(e for e in existing if e.name == name)
    new_ext = await store_directory(io, left) if left else None
    free = [(ext.directory_offset, ext.directory_size)] + await _clusters_or_leak(io, gone)
    return StoreResult(new_ext, left, free)


async def _clusters_or_leak(io: BitmapIO, e: DirEntry) -> list[tuple[int, int]]:
    """A table QEMU cannot read is not freed (its clusters leak)."""
    try:
        return await bitmap_clusters(io, e)
    except BitmapError:
        return []
