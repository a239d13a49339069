"""The bitmaps extension: bitmap directory entries and bitmap tables, as
pure functions over bytes (docs/interop/qcow2.txt, "Bitmaps").

A bitmap is stored as a bitmap table (one u64 per cluster of bitmap data:
0 = all zeroes, 1 = all ones, else the data cluster's offset) and a
directory entry naming it.  Bit ``i`` covers guest bytes
``[i*granularity, (i+1)*granularity)`` and is bit ``i % 8`` of byte
``i // 8``.  Worked example (64 KiB clusters, a 1 GiB disk, granularity
64 KiB: 16384 bits = 2 KiB of data, so one table entry)::

    >>> e = DirEntry("bitmap0", granularity_bits=16, flags=FLAG_AUTO, table_offset=0x50000,
    ...              table_size=1)
    >>> raw = encode_directory([e])
    >>> len(raw)                        # 24 fixed bytes + "bitmap0", padded to 8
    32
    >>> decode_directory(raw, 1)[0].name
    'bitmap0'
    >>> table_entries(1 << 30, 16, 65536)
    1
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["DirEntry", "FLAG_IN_USE", "FLAG_AUTO", "FLAG_EXTRA_COMPAT", "BitmapFormatError",
           "encode_directory", "decode_directory", "table_entries", "data_bytes",
           "MAX_BITMAPS", "MAX_NAME", "MAX_DIRECTORY"]

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_COMPAT = 1 << 2
#: QEMU's limits (QCOW2_MAX_BITMAPS, BDRV_BITMAP_MAX_NAME_SIZE, QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
MAX_BITMAPS = 65535
MAX_NAME = 1023
MAX_DIRECTORY = 64 << 20

_FIXED = struct.Struct(">QIIBBHI")


class BitmapFormatError(Exception):
    """A bitmap directory that cannot be right (QEMU refuses the open)."""


@dataclass(slots=True)
class DirEntry:
    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int
    type: int = 1
    extra: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)


def encode_directory(entries: list[DirEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        name = e.name.encode()
        out += _FIXED.pack(e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits,
                           len(name), len(e.extra))
        out += e.extra + name
        out += bytes((-len(out)) % 8)
    return bytes(out)


def decode_directory(raw: bytes, count: int) -> list[DirEntry]:
    """:raise BitmapFormatError: truncated or malformed entries."""
    out: list[DirEntry] = []
    pos = 0
    for _ in range(count):
        if pos + _FIXED.size > len(raw):
            raise BitmapFormatError("Bitmap directory is truncated")
        toff, tsize, flags, typ, gbits, nlen, xlen = _FIXED.unpack_from(raw, pos)
        pos += _FIXED.size
        if pos + xlen + nlen > len(raw):
            raise BitmapFormatError("Bitmap directory is truncated")
        extra = bytes(raw[pos:pos + xlen])
        name = bytes(raw[pos + xlen:pos + xlen + nlen]).decode("utf-8", "replace")
        pos += xlen + nlen
        pos += (-pos) % 8
        out.append(DirEntry(name, gbits, flags, toff, tsize, typ, extra))
    return out


def data_bytes(disk_size: int, granularity_bits: int) -> int:
    """:return: bytes of bitmap data for a disk (whole bytes of bits)."""
    nbits = -(-disk_size // (1 << granularity_bits))
    return -(-nbits // 8)


def table_entries(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """:return: the bitmap table size (clusters of bitmap data)."""
    return -(-data_bytes(disk_size, granularity_bits) // cluster_size)
