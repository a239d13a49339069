"""Persistent dirty bitmaps in a qcow2 image: load at open, mark in use,
store at close (QEMU's qcow2-bitmap.c behaviour, written from the spec).

Store order (crash-safe): new bitmap data clusters, then the new bitmap
tables, then the new directory, then the header (extension and the
``bitmaps`` autoclear bit), and only then the old directory, tables and
data are freed.  At a read-write open every stored bitmap is marked
``in_use`` in place, so a crash leaves them in use: the next open finds
them ``inconsistent``, as QEMU does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qmpd.block.drivers.qcow2.bitmaps import (
    FLAG_AUTO, FLAG_IN_USE, DirEntry, decode_directory, encode_directory, table_entries,
)
from qmpd.block.drivers.qcow2.header import AUTOCLEAR_BITMAPS
from qmpd.block.drivers.qcow2.image import Qcow2Image
from qmpd.block.drivers.qcow2.tables import OFFSET_MASK

__all__ = ["StoredBitmap", "load_bitmaps", "mark_in_use", "store_bitmaps"]


@dataclass(slots=True)
class StoredBitmap:
    name: str
    granularity: int
    enabled: bool
    in_use: bool
    #: ``ceil(nbits/8)`` bytes, bit i = bit i%8 of byte i//8 (empty when in use).
    data: bytes


def _directory(image: Qcow2Image) -> tuple[int, int, int] | None:
    h = image.header
    if h.bitmaps_ext is None or not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    return h.bitmaps_ext


async def _read_entries(image: Qcow2Image) -> list[DirEntry]:
    ext = _directory(image)
    if ext is None:
        return []
    nb, dsize, doff = ext
    raw = await image.file.read(doff, dsize) if dsize else b""
    return decode_directory(bytes(raw), nb)


async def load_bitmaps(image: Qcow2Image) -> list[StoredBitmap]:
    """:return: the image's bitmaps (data only for those not in use)."""
    out = []
    cs = image.g.cluster_size
    for e in await _read_entries(image):
        nbytes = -(-(-(-image.size // (1 << e.granularity_bits))) // 8)
        data = bytearray(nbytes)
        if not e.in_use and e.table_size:
            table = struct.unpack(f">{e.table_size}Q",
                                  await image.file.read(e.table_offset, e.table_size * 8))
            for i, entry in enumerate(table):
                start = i * cs
                n = min(cs, nbytes - start)
                if n <= 0:
                    break
                off = entry & OFFSET_MASK
                if off:
                    data[start:start + n] = await image.file.read(off, n)
                elif entry & 1:
                    data[start:start + n] = b"\xff" * n
        out.append(StoredBitmap(e.name, 1 << e.granularity_bits, e.auto, e.in_use, bytes(data)))
    return out


async def mark_in_use(image: Qcow2Image) -> None:
    """Set ``in_use`` on every stored bitmap, rewriting the directory in place."""
    ext = _directory(image)
    if ext is None:
        return
    entries = await _read_entries(image)
    for e in entries:
        e.flags |= FLAG_IN_USE
    await image.file.write(ext[2], encode_directory(entries))
    await image.file.flush()


async def store_bitmaps(image: Qcow2Image, bitmaps: list[StoredBitmap]) -> None:
    """Replace the image's bitmaps by ``bitmaps`` (see the module docstring)."""
    cs = image.g.cluster_size
    async with image.lock:
        old = await _read_entries(image)
        old_ext = _directory(image)
        # QEMU's directory order: bitmaps already in the image keep their
        # place, new ones follow in the order given (query order).
        rank = {e.name: i for i, e in enumerate(old)}
        bitmaps = sorted(bitmaps, key=lambda b: rank.get(b.name, len(rank)))
        entries: list[DirEntry] = []
        for bm in bitmaps:
            gbits = bm.granularity.bit_length() - 1
            n = table_entries(image.size, gbits, cs)
            table = [0] * n
            for i in range(n):
                chunk = bm.data[i * cs:(i + 1) * cs]
                if bm.in_use or not any(chunk):
                    continue
                off = await image.allocate_metadata(1, "bitmap data")
                await image.write_metadata(off, chunk)
                table[i] = off
            toff = 0
            if n:
                tclusters = -(-n * 8 // cs)
                toff = await image.allocate_metadata(tclusters, "bitmap table")
                await image.write_metadata(toff, struct.pack(f">{n}Q", *table))
            flags = (FLAG_AUTO if bm.enabled else 0) | (FLAG_IN_USE if bm.in_use else 0)
            entries.append(DirEntry(bm.name, gbits, flags, toff, n))
        h = image.header
        if entries:
            raw = encode_directory(entries)
            doff = await image.allocate_metadata(-(-len(raw) // cs), "bitmap directory")
            await image.write_metadata(doff, raw)
            await image.file.flush()
            h.bitmaps_ext = (len(entries), len(raw), doff)
            h.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            h.bitmaps_ext = None
            h.autoclear_features &= ~AUTOCLEAR_BITMAPS
        await image.rewrite_header()
        await image.file.flush()
        for e in old:
            if e.table_size:
                raw_table = await image.file.read(e.table_offset, e.table_size * 8)
                for entry in struct.unpack(f">{e.table_size}Q", raw_table):
                    if entry & OFFSET_MASK:
                        await image.free_metadata(entry & OFFSET_MASK, 1)
                await image.free_metadata(e.table_offset, -(-e.table_size * 8 // cs))
        if old_ext is not None and old_ext[1]:
            await image.free_metadata(old_ext[2], -(-old_ext[1] // cs))
