"""qcow2's bitmaps extension: persistent dirty bitmaps in the image
(QEMU's docs/interop/qcow2.txt, "Bitmaps extension" and "Bitmaps").

Three structures, all big-endian:

* the header extension (type ``0x23852875``, 24 bytes): ``nb_bitmaps``,
  ``bitmap_directory_size``, ``bitmap_directory_offset``;
* the bitmap directory: one variable-length entry per bitmap (table offset
  and size, flags ``in_use``/``auto``/``extra_data_compatible``, type 1,
  granularity bits, extra data, name, padded to 8 bytes);
* per bitmap a bitmap table: one u64 per cluster of bitmap data; ``0`` reads
  as all zeroes, ``1`` as all ones, otherwise the host offset of a data
  cluster holding the bits.

The bits are the bitmap's little-endian serialisation (what
:meth:`qmpd.bitmap.hbitmap.HBitmap.to_bytes_le` returns): bit ``i`` (disk
bytes ``i << granularity_bits`` onwards) is bit ``i % 8`` of byte ``i // 8``.
Worked example (64 KiB clusters, a 1 GiB disk, 64 KiB granularity: 16384
bits = 2048 bytes, one data cluster)::

    >>> table_entries(1 << 30, 16, 65536)
    1
    >>> e = DirEntry("b0", table_offset=0x50000, table_size=1, flags=FLAG_AUTO,
    ...              granularity_bits=16)
    >>> d = encode_directory([e]); len(d)                 # 24 + 2, padded
    32
    >>> parse_directory(d, 1, 65536, 1 << 30)[0].name
    'b0'

Pure functions raise :class:`BitmapError` with QEMU 7.2's texts.  The I/O
half is :mod:`.bitmaps_io`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

__all__ = [
    "MAX_BITMAPS", "MAX_DIRECTORY_SIZE", "MAX_NAME_SIZE", "MAX_TABLE_SIZE", "MAX_PHYS_SIZE",
    "MIN_GRANULARITY_BITS", "MAX_GRANULARITY_BITS", "FLAG_IN_USE", "FLAG_AUTO",
    "FLAG_EXTRA_DATA_COMPATIBLE", "TYPE_DIRTY_TRACKING", "TABLE_ALL_ONES", "EXT_LENGTH",
    "BitmapError", "BitmapsExt", "DirEntry",
    "parse_ext", "encode_ext", "dir_entry_size", "parse_directory", "encode_directory",
    "check_entry", "table_entries", "bitmap_bytes", "cluster_coverage", "parse_table",
    "encode_table", "check_constraints", "can_store_new", "assemble", "split_data",
    "with_flags",
]

#: QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c).
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
#: Flags QEMU 7.2 refuses on load (it knows in_use and auto only).
RESERVED_FLAGS = 0xFFFF_FFFC
TYPE_DIRTY_TRACKING = 1

#: QEMU's warnings at open when the ``bitmaps`` autoclear bit is clear
#: (then every stored bitmap is inconsistent), followed by LEAKED_HINT.
WARN_AUTOCLEAR_V2 = ("This qcow2 v2 image contains bitmaps, but they may have been modified by "
                     "a program without persistent bitmap support; so now they must all be "
                     "considered inconsistent")
WARN_AUTOCLEAR_V3 = ("a program lacking bitmap support modified this file, so all bitmaps are "
                     "now considered inconsistent")
LEAKED_HINT = "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."

TABLE_ALL_ONES = 1
TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
TABLE_RESERVED_MASK = 0xFF00_0000_0000_01FE

EXT_LENGTH = 24
_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


class BitmapError(Exception):
    """Bitmaps QEMU refuses; ``str()`` is QEMU 7.2's text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass(frozen=True, slots=True)
class BitmapsExt:
    """The header extension.  ``Header.bitmaps_ext`` (header.py) holds the
    same three numbers as a tuple: use :meth:`as_tuple`/:meth:`of`."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.nb_bitmaps, self.directory_size, self.directory_offset)

    @classmethod
    def of(cls, t: tuple[int, int, int]) -> BitmapsExt:
        return cls(*t)


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        """The bitmap is enabled (tracks writes)."""
        return bool(self.flags & FLAG_AUTO)

    @property
    def extra_data_compatible(self) -> bool:
        return bool(self.flags & FLAG_EXTRA_DATA_COMPATIBLE)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def info_flags(self) -> list[str]:
        """:return: the ``flags`` list ``qemu-img info`` prints."""
        return [n for f, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if self.flags & f]


# --- the header extension -------------------------------------------------

def parse_ext(data: bytes, cluster_size: int) -> BitmapsExt:
    """:return: the extension's fields.  :raise BitmapError: QEMU's open
    checks of the extension (qcow2_read_extensions), in its order."""
    if len(data) != EXT_LENGTH:
        raise BitmapError("bitmaps_ext: Invalid extension length")
    nb, reserved, dsize, doff = _EXT.unpack(data)
    if reserved != 0:
        raise BitmapError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise BitmapError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported "
                          f"maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise BitmapError("found bitmaps extension with zero bitmaps")
    if doff % cluster_size:
        raise BitmapError("bitmaps_ext: invalid bitmap directory offset")
    if dsize > MAX_DIRECTORY_SIZE:
        raise BitmapError(f"bitmaps_ext: bitmap directory size ({dsize}) exceeds the maximum "
                          f"supported size ({MAX_DIRECTORY_SIZE})")
    return BitmapsExt(nb, dsize, doff)


def encode_ext(ext: BitmapsExt) -> bytes:
    """:return: the 24 extension data bytes (without type and length)."""
    return _EXT.pack(ext.nb_bitmaps, 0, ext.directory_size, ext.directory_offset)


# --- the directory --------------------------------------------------------

def dir_entry_size(name_size: int, extra_data_size: int = 0) -> int:
    """:return: bytes an entry takes in the directory (padded to 8)."""
    return (_ENTRY.size + name_size + extra_data_size + 7) & ~7


def check_entry(e: DirEntry, cluster_size: int, disk_size: int) -> bool:
    """:return: whether ``e`` satisfies QEMU's constraints (check_dir_entry)."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
            or e.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & RESERVED_FLAGS or len(e.name.encode()) > MAX_NAME_SIZE
            or e.type != TYPE_DIRTY_TRACKING):
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return e.in_use or disk_size <= (phys * 8) << e.granularity_bits


def parse_directory(buf: bytes, nb_bitmaps: int, cluster_size: int, disk_size: int, *,
                    strict: bool = True) -> list[DirEntry]:
    """:return: the entries of a directory of ``len(buf)`` bytes, in order.

    :param strict: apply QEMU's load checks (no extra data, constraints);
        ``False`` parses any well-formed directory (extra data kept).
    :raise BitmapError: QEMU's bitmap_list_load texts.
    """
    if len(buf) == 0:
        raise BitmapError("Requested bitmap directory size is zero")
    if len(buf) > MAX_DIRECTORY_SIZE:
        raise BitmapError("Requested bitmap directory size is too big")
    out: list[DirEntry] = []
    pos = 0
    while pos < len(buf):
        if pos + _ENTRY.size > len(buf):
            raise BitmapError("Broken bitmap directory")
        if len(out) + 1 > nb_bitmaps:
            raise BitmapError("More bitmaps found than specified in header extension")
        toff, tsize, flags, btype, gbits, nsize, esize = _ENTRY.unpack_from(buf, pos)
        end = pos + dir_entry_size(nsize, esize)
        if end > len(buf):
            raise BitmapError("Broken bitmap directory")
        body = pos + _ENTRY.size
        raw_name = bytes(buf[body + esize:body + esize + nsize])
        name = raw_name.decode("utf-8", "replace")
        if strict and esize != 0:
            raise BitmapError("Bitmap extra data is not supported")
        e = DirEntry(name, toff, tsize, flags, gbits, btype, bytes(buf[body:body + esize]))
        if strict and not check_entry(e, cluster_size, disk_size):
            raise BitmapError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(e)
        pos = end
    if len(out) != nb_bitmaps:
        raise BitmapError("Less bitmaps found than specified in header extension")
    return out


def encode_directory(entries: Sequence[DirEntry]) -> bytes:
    """:return: the directory bytes.  :raise BitmapError: empty or larger
    than QEMU's limit (QEMU fails such a store with EINVAL)."""
    parts: list[bytes] = []
    for e in entries:
        name = e.name.encode()
        raw = _ENTRY.pack(e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits,
                          len(name), len(e.extra_data)) + e.extra_data + name
        parts.append(raw + bytes((-len(raw)) % 8))
    out = b"".join(parts)
    if not out or len(out) > MAX_DIRECTORY_SIZE:
        raise BitmapError("Bitmap directory is too large" if out else
                          "Requested bitmap directory size is zero")
    return out


# --- tables and data ------------------------------------------------------

def bitmap_bytes(disk_size: int, granularity_bits: int) -> int:
    """:return: bytes of the serialised bitmap of a ``disk_size`` disk."""
    nbits = -(-disk_size // (1 << granularity_bits))
    return -(-nbits // 8)


def table_entries(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """:return: the bitmap table size (entries) QEMU writes."""
    return -(-bitmap_bytes(disk_size, granularity_bits) // cluster_size)


def cluster_coverage(cluster_size: int, granularity_bits: int) -> int:
    """:return: disk bytes one data cluster covers."""
    return (cluster_size * 8) << granularity_bits


def parse_table(buf: bytes, cluster_size: int) -> list[int]:
    """:return: the table's entries.  :raise BitmapError: an entry with
    reserved bits set, bit 0 next to an offset or an unaligned offset
    (QEMU's check_table_entry; the caller prefixes the bitmap)."""
    entries = list(struct.unpack(f">{len(buf) // 8}Q", buf[:len(buf) & ~7]))
    for e in entries:
        off = e & TABLE_OFFSET_MASK
        if e & TABLE_RESERVED_MASK or (off and (e & TABLE_ALL_ONES or off % cluster_size)):
            raise BitmapError("Invalid argument")
    return entries


def encode_table(entries: Sequence[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def split_data(data: bytes, cluster_size: int) -> list[bytes | None]:
    """:return: per table entry the cluster to write (zero-padded), or None
    where the chunk is all zeroes (entry 0), as QEMU's store_bitmap_data."""
    out: list[bytes | None] = []
    for pos in range(0, len(data), cluster_size):
        chunk = data[pos:pos + cluster_size]
        if chunk.count(0) == len(chunk):
            out.append(None)
        else:
            out.append(bytes(chunk) + bytes(cluster_size - len(chunk)))
    return out


def assemble(table: Sequence[int], clusters: dict[int, bytes], nbytes: int,
             cluster_size: int) -> bytes:
    """:return: ``nbytes`` of bitmap data from ``table`` and the data
    ``clusters`` (host offset -> cluster bytes) it points at."""
    out = bytearray(nbytes)
    for i, entry in enumerate(table):
        pos = i * cluster_size
        if pos >= nbytes:
            break
        n = min(cluster_size, nbytes - pos)
        off = entry & TABLE_OFFSET_MASK
        if off:
            out[pos:pos + n] = clusters[off][:n]
        elif entry & TABLE_ALL_ONES:
            out[pos:pos + n] = b"\xff" * n
    # Bits past the disk's end are not part of the bitmap.
    return bytes(out)


# --- QEMU's constraints on new persistent bitmaps -------------------------

def check_constraints(name: str, granularity: int, disk_size: int, cluster_size: int) -> None:
    """QEMU's check_constraints_on_bitmap.  :raise BitmapError: its text."""
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        raise BitmapError(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if gbits < MIN_GRANULARITY_BITS:
        raise BitmapError(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    nbytes = bitmap_bytes(disk_size, gbits)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        raise BitmapError("Too much space will be occupied by the bitmap. "
                          "Use larger granularity")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise BitmapError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")


def can_store_new(name: str, granularity: int, *, node: str, version: int, disk_size: int,
                  cluster_size: int, persistent_names: Iterable[str]) -> None:
    """QEMU 7.2's qcow2_co_can_store_new_dirty_bitmap (``block-dirty-bitmap-add``
    with ``persistent: true``), after the generic "Bitmap already exists".

    :param node: the device or node name QEMU prints.
    :param persistent_names: the node's persistent bitmaps now in memory.
    :raise BitmapError: "Can't make bitmap 'NAME' persistent in 'NODE': ...".
    """
    try:
        if version < 3:
            raise BitmapError("Cannot store dirty bitmaps in qcow2 v2 files")
        check_constraints(name, granularity, disk_size, cluster_size)
        nb, dsize = 1, dir_entry_size(len(name.encode()))
        for other in persistent_names:
            nb += 1
            dsize += dir_entry_size(len(other.encode()))
        if nb > MAX_BITMAPS:
            raise BitmapError("Maximum number of persistent bitmaps is already reached")
        if dsize > MAX_DIRECTORY_SIZE:
            raise BitmapError("Not enough space in the bitmap directory")
    except BitmapError as e:
        raise BitmapError(f"Can't make bitmap '{name}' persistent in '{node}': {e.text}") from None


def with_flags(entries: Sequence[DirEntry], set_bits: int = 0,
               clear_bits: int = 0) -> list[DirEntry]:
    """:return: ``entries`` with flags changed (e.g. ``FLAG_IN_USE`` set on
    every bitmap loaded at open)."""
    return [replace(e, flags=(e.flags | set_bits) & ~clear_bits) for e in entries]
