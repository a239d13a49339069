"""A new, empty qcow2 image as a list of writes (``blockdev-create``).

Laid out as ``qemu-img create`` does: header in cluster 0, refcount table in
cluster 1, the first refcount block in cluster 2, then the L1 table.  Worked
example (1 GiB, 64 KiB clusters, version 3)::

    >>> img = new_image(1 << 30)
    >>> [(off, len(data)) for off, data in img.writes]
    [(131072, 65536), (65536, 512), (196608, 16), (0, 512)]
    >>> img.length                       # 3 clusters plus the 16-byte L1
    196624

With ``preallocation="metadata"`` every L2 table is allocated too, and each
entry points at a (sparse) data cluster, as QEMU's metadata preallocation
does; the file length then covers the whole disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpd.block.drivers.qcow2.alloc import RefcountState
from qmpd.block.drivers.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS, V2_HEADER_LENGTH, V3_HEADER_LENGTH, Header, encode_header,
)
from qmpd.block.drivers.qcow2.refcount import RefcountBlock
from qmpd.block.drivers.qcow2.tables import Geometry, pack_entries, standard_entry

__all__ = ["NewImage", "new_image"]


@dataclass(frozen=True, slots=True)
class NewImage:
    #: (file offset, bytes), in the order to write them (header last).
    writes: list[tuple[int, bytes]]
    #: File length to truncate to.
    length: int


def new_image(size: int, *, cluster_bits: int = 16, refcount_order: int = 4, version: int = 3,
              backing_file: str | None = None, backing_format: str | None = None,
              lazy_refcounts: bool = False, preallocate_metadata: bool = False) -> NewImage:
    """:return: the writes that make an empty image of ``size`` bytes."""
    g = Geometry(cluster_bits)
    cs = g.cluster_size
    rbits = 1 << refcount_order
    block = RefcountBlock.empty(cs, rbits)
    rs = RefcountState(cluster_bits, rbits, table=[2 * cs], blocks={0: block},
                       table_offset=cs, table_clusters=1)
    for c in range(3):
        rs.update(c, 1)
    rs.mark_block_new(0)
    l1_size = g.l1_entries_for(size)
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    l1_off = rs.allocate_contiguous(l1_clusters) << cluster_bits
    l1 = [0] * l1_size
    data_writes: list[tuple[int, bytes]] = []
    end = l1_off + l1_size * 8
    if preallocate_metadata:
        nclusters = -(-size // cs)
        for li in range(l1_size):
            l2_off = rs.allocate_contiguous(1) << cluster_bits
            l1[li] = standard_entry(l2_off)
            first = li * g.l2_entries
            n = min(g.l2_entries, nclusters - first)
            entries: list[int] = []
            left = n
            while left:
                start, count = rs.allocate(left)
                entries.extend(standard_entry((start + k) << cluster_bits) for k in range(count))
                end = max(end, (start + count) << cluster_bits)
                left -= count
            table = entries + [0] * (g.l2_entries - n)
            data_writes.append((l2_off, pack_entries(table)))
            end = max(end, l2_off + cs)
    h = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
               l1_table_offset=l1_off, refcount_order=refcount_order,
               header_length=V3_HEADER_LENGTH if version >= 3 else V2_HEADER_LENGTH,
               backing_file=backing_file, backing_format=backing_format)
    if lazy_refcounts:
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS
    writes: list[tuple[int, bytes]] = []
    while rs.pending():
        w = rs.take_writes()
        writes.extend(w.blocks)
        writes.extend(w.table)
    h.refcount_table_offset = rs.table_offset
    h.refcount_table_clusters = rs.table_clusters
    writes.extend(data_writes)
    if l1_size:
        writes.append((l1_off, pack_entries(l1)))
    header = encode_header(h)
    writes.append((0, header + bytes((-len(header)) % 512)))
    length = max([end] + [off + len(data) for off, data in writes])
    return NewImage(writes, length)
