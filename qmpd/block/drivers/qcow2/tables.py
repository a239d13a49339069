"""L1 and L2 table entries (docs/interop/qcow2.txt, "Cluster mapping").

Guest offset -> (L1 index, L2 index) -> L2 entry -> host cluster.  With
64 KiB clusters an L2 table holds 8192 entries and covers 512 MiB.  Worked
example (cluster_bits 16)::

    >>> g = Geometry(16)
    >>> g.split(0x2001_0000)                    # guest 512 MiB + 64 KiB
    (1, 1)                                      # L1 index 1, L2 index 1
    >>> e = standard_entry(0x50000, copied=True)
    >>> hex(e)
    '0x8000000000050000'
    >>> decode(e, g)
    Mapping(kind=<Kind.NORMAL: 1>, host=327680, copied=True, csize=0)
    >>> decode(ZERO_FLAG, g).kind               # v3 zero cluster, no host cluster
    <Kind.ZERO: 2>
    >>> from qmpd.block.drivers.qcow2.compress import encode_descriptor
    >>> decode(encode_descriptor(0x70010, 700, g.cluster_bits), g)
    Mapping(kind=<Kind.COMPRESSED: 3>, host=458768, copied=False, csize=1008)

A compressed entry stores the host byte offset and the number of 512-byte
sectors after the first one; ``csize`` is the byte count that may hold the
compressed stream (from ``host`` to the end of the last sector).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COPIED", "COMPRESSED", "ZERO_FLAG", "OFFSET_MASK", "Kind", "Mapping", "Geometry",
    "standard_entry", "decode", "unpack_table", "pack_entries",
    "compressed_host_clusters", "same_run", "data_hosts",
]

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
#: Bits 9-55: a cluster-aligned host offset (L1 entries, standard L2 entries).
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
#: Reserved bits of a standard L2 entry (1-8 and 56-61) and of an L1 entry.
L2_RESERVED = 0x3F00_0000_0000_01FE
L1_RESERVED = 0x7F00_0000_0000_01FF


class Kind(enum.IntEnum):
    """What a guest cluster is."""

    UNALLOCATED = 0   #: read from the backing file, or zeroes
    NORMAL = 1        #: data at ``host``
    ZERO = 2          #: reads as zeroes (``host`` may be a preallocation, or 0)
    COMPRESSED = 3    #: compressed stream at ``host``


@dataclass(frozen=True, slots=True)
class Mapping:
    kind: Kind
    host: int
    copied: bool
    csize: int


class Geometry:
    """Sizes derived from ``cluster_bits`` (no extended L2 entries)."""

    __slots__ = ("cluster_bits", "cluster_size", "l2_bits", "l2_entries", "csize_shift",
                 "csize_mask", "coffset_mask")

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_bits = cluster_bits - 3
        self.l2_entries = 1 << self.l2_bits
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    def split(self, guest: int) -> tuple[int, int]:
        """:return: (L1 index, L2 index) of the cluster holding ``guest``."""
        cluster = guest >> self.cluster_bits
        return cluster >> self.l2_bits, cluster & (self.l2_entries - 1)

    def l1_entries_for(self, size: int) -> int:
        """:return: the L1 size a ``size``-byte disk needs."""
        per_l1 = self.cluster_size * self.l2_entries
        return -(-size // per_l1)


def standard_entry(host: int, *, copied: bool = True, zero: bool = False) -> int:
    """:return: an L2 entry for a normal cluster at ``host`` (or a
    preallocated zero cluster when ``zero``)."""
    return (host & OFFSET_MASK) | (COPIED if copied and host else 0) | (ZERO_FLAG if zero else 0)


def decode(entry: int, g: Geometry) -> Mapping:
    """:return: what an L2 entry maps (reserved bits are the caller's check)."""
    if entry & COMPRESSED:
        host = entry & g.coffset_mask
        nb = ((entry >> g.csize_shift) & g.csize_mask) + 1
        return Mapping(Kind.COMPRESSED, host, False, nb * 512 - (host & 511))
    host = entry & OFFSET_MASK
    if entry & ZERO_FLAG:
        return Mapping(Kind.ZERO, host, bool(entry & COPIED), 0)
    if host == 0:
        return Mapping(Kind.UNALLOCATED, 0, False, 0)
    return Mapping(Kind.NORMAL, host, bool(entry & COPIED), 0)


def compressed_host_clusters(m: Mapping, cluster_bits: int) -> range:
    """:return: host cluster indexes a compressed mapping touches (each
    holds one reference for it)."""
    first = m.host >> cluster_bits
    last = (m.host + m.csize - 1) >> cluster_bits
    return range(first, last + 1)


def unpack_table(buf: bytes | bytearray | memoryview) -> list[int]:
    """:return: the big-endian u64 entries of an L1/L2 table."""
    return list(struct.unpack(f">{len(buf) // 8}Q", buf))


def pack_entries(entries: list[int]) -> bytes:
    """:return: ``entries`` as big-endian u64."""
    return struct.pack(f">{len(entries)}Q", *entries)


#: Below this many entries a Python loop beats numpy's set-up.
_VECTOR_MIN = 48


def same_run(table: bytes | bytearray, index: int, count: int, first: int, cs: int) -> int:
    """:return: how many of the ``count`` entries of ``table`` from
    ``index`` map as the entry ``first`` (the one before them) does: the
    same kind, and for data the next host cluster each (COPIED may differ).

    >>> t = pack_entries([standard_entry(0x10000), standard_entry(0x20000), 0])
    >>> same_run(t, 1, 2, standard_entry(0x10000), 0x10000)
    1
    """
    kind = decode(first, _G16).kind  # the kind needs no geometry-specific field
    if count < _VECTOR_MIN:
        k = 0
        for e in struct.unpack_from(f">{count}Q", table, index * 8):
            if _differs(e, first + (k + 1) * cs, kind):
                break
            k += 1
        return k
    arr = np.frombuffer(table, dtype=">u8", count=count, offset=index * 8)
    if kind == Kind.NORMAL:
        expect = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(cs) + np.uint64(first)
        bad = ((arr ^ expect) & np.uint64(~COPIED & 0xFFFF_FFFF_FFFF_FFFF)) != 0
    elif kind == Kind.ZERO:
        bad = ((arr & np.uint64(ZERO_FLAG)) == 0) | ((arr & np.uint64(COMPRESSED)) != 0)
    else:
        bad = (arr & np.uint64(OFFSET_MASK | ZERO_FLAG | COMPRESSED)) != 0
    hit = int(np.argmax(bad))
    return hit if bad[hit] else count


def _differs(e: int, expect: int, kind: Kind) -> bool:
    if kind == Kind.NORMAL:
        return bool((e ^ expect) & ~COPIED)
    if kind == Kind.ZERO:
        return not e & ZERO_FLAG or bool(e & COMPRESSED)
    return bool(e & (OFFSET_MASK | ZERO_FLAG | COMPRESSED))


def data_hosts(table: bytes | bytearray, index: int, count: int, cs: int) -> list[int] | None:
    """:return: the host offsets of ``count`` entries from ``index`` when
    all are data clusters at aligned offsets (not compressed, zero or
    unallocated), else None.

    >>> data_hosts(pack_entries([standard_entry(0x30000), standard_entry(0x10000)]), 0, 2, 0x10000)
    [196608, 65536]
    >>> data_hosts(pack_entries([standard_entry(0x30000), ZERO_FLAG]), 0, 2, 0x10000) is None
    True
    """
    out = []
    for e in struct.unpack_from(f">{count}Q", table, index * 8):
        host = e & OFFSET_MASK
        if e & (COMPRESSED | ZERO_FLAG) or not host or host & (cs - 1):
            return None
        out.append(host)
    return out


_G16 = Geometry(16)
