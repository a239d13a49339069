"""The mapping of one qcow2 write request, before anything is written.

:func:`plan_write` walks the request's L2 entries: clusters this image
owns alone (COPIED data clusters) are written in place, every other
cluster gets a new host cluster, allocated in memory for a whole run at
once (as QEMU's qcow2_alloc_host_offset), and the old mappings are
remembered to be freed once the new L2 entries are written.  The image
(:class:`~.image.Qcow2Image`) then writes refcounts and data, the L2
entries, L1 and the frees in that order.  Worked example (64 KiB
clusters; guest 0-128 KiB already in place at host 5*64 KiB, a write of
[64 KiB, 256 KiB))::

    in place   guest 64K-128K  -> host 5*64K + 64K (COPIED)
    new run    guest 128K-256K -> host 9*64K, two clusters (allocated now)
"""

from __future__ import annotations

import struct
from typing import Protocol

from qmpd.block.drivers.qcow2.l2cache import L2Cache
from qmpd.block.drivers.qcow2.tables import COPIED, Geometry, Kind, Mapping, decode, standard_entry

__all__ = ["WritePlan", "PlanHost", "plan_write", "l2_sectors"]


class PlanHost(Protocol):
    """What planning needs from the image."""

    g: Geometry
    cache: L2Cache

    async def l2_for_write(self, l1i: int) -> int:
        """The L2 table for ``l1i`` (allocated in memory if missing)."""

    def allocate(self, n: int, what: str, *, contiguous: bool = False) -> tuple[int, int]:
        """Up to ``n`` contiguous new clusters: ``(first, count)``."""

    async def cluster_content(self, guest_cluster: int) -> bytes | bytearray:
        """What one whole guest cluster reads as now."""


class WritePlan:
    """One write request's mapping: data extents, new runs (L1 index,
    first L2 index, host offset, clusters) and old mappings to free once
    the new entries are written."""

    __slots__ = ("data", "runs", "frees")

    def __init__(self) -> None:
        #: (host offset, guest offset, bytes, the data or None when filled by the caller).
        self.data: list[tuple[int, int, int, bytes | bytearray | memoryview | None]] = []
        self.runs: list[tuple[int, int, int, int]] = []
        self.frees: list[Mapping] = []


async def plan_write(img: PlanHost, plan: WritePlan, offset: int, length: int,
                     view: memoryview | None) -> None:
    """Map ``length`` bytes at ``offset`` into ``plan``: in-place extents,
    and new clusters allocated (in memory) for the rest; no L2 entry
    changes yet.  ``view`` is the data, or None when the caller fills the
    extents itself (whole clusters only)."""
    g = img.g
    cs = g.cluster_size
    cb = g.cluster_bits
    mask = g.l2_entries - 1
    pos = offset
    end = offset + length
    while pos < end:
        l1i, l2i = g.split(pos)
        l2off = await img.l2_for_write(l1i)
        table = img.cache.table(l2off)
        assert table is not None
        # Clusters of this request inside this L2 table.
        table_end = min(end, ((pos >> cb) - l2i + g.l2_entries) << cb)
        while pos < table_end:
            l2i = (pos >> cb) & mask
            m = decode(img.cache.get_entry(l2off, l2i), g)
            if m.kind == Kind.NORMAL and m.copied:
                # In place, over the following host-contiguous in-place clusters.
                n_end = min(table_end, ((pos >> cb) + 1) << cb)
                expect = m.host + cs
                while n_end < table_end:
                    nm = decode(img.cache.get_entry(l2off, (n_end >> cb) & mask), g)
                    if not (nm.kind == Kind.NORMAL and nm.copied and nm.host == expect):
                        break
                    n_end = min(table_end, n_end + cs)
                    expect += cs
                plan.data.append((m.host + (pos & (cs - 1)), pos, n_end - pos,
                                  None if view is None else view[pos - offset:n_end - offset]))
                pos = n_end
                continue
            # Needs new clusters: the run of such clusters from here.
            first = pos >> cb
            last_c = (table_end - 1) >> cb
            entries = list(struct.unpack_from(f">{last_c - first + 1}Q", table, (first & mask) * 8))
            count = 1
            for e in entries[1:]:
                if e & COPIED and decode(e, g).kind == Kind.NORMAL:
                    break
                count += 1
            start_cluster, got = img.allocate(count, "data cluster")
            run_end = min(table_end, (first + got) << cb)
            if view is None:
                plan.data.append((start_cluster << cb, pos, run_end - pos, None))
            else:
                buf = await _cow_buffer(img, pos, run_end, view[pos - offset:run_end - offset])
                plan.data.append((start_cluster << cb, pos - (pos & (cs - 1)), len(buf), buf))
            for e in entries[:got]:
                if e:
                    old = decode(e, g)
                    if old.host and old.kind != Kind.UNALLOCATED:
                        plan.frees.append(old)
            plan.runs.append((l1i, first & mask, start_cluster << cb, got))
            pos = run_end


async def l2_sectors(img: PlanHost, plan: WritePlan) -> list[tuple[int, bytes]]:
    """:return: ``(file offset, bytes)`` of the 512-byte sectors of the L2
    tables that ``plan``'s new entries change, as they will read once set
    (built on copies: the cached tables are not changed).  The tables must
    exist already (no new table in ``plan``)."""
    cs = img.g.cluster_size
    tables: dict[int, bytearray] = {}
    spans: dict[int, tuple[int, int]] = {}
    for l1i, idx, host, n in plan.runs:
        l2off = await img.l2_for_write(l1i)
        table = tables.get(l2off)
        if table is None:
            cached = img.cache.table(l2off)
            assert cached is not None
            table = tables[l2off] = bytearray(cached)
        struct.pack_into(f">{n}Q", table, idx * 8, *[standard_entry(host + k * cs) for k in range(n)])
        lo, hi = spans.get(l2off, (idx * 8, (idx + n) * 8))
        spans[l2off] = (min(lo, idx * 8), max(hi, (idx + n) * 8))
    return [(l2off + (lo & ~511), bytes(tables[l2off][lo & ~511:min(cs, (hi + 511) & ~511)]))
            for l2off, (lo, hi) in sorted(spans.items())]


async def _cow_buffer(img: PlanHost, pos: int, end: int,
                      data: memoryview) -> bytes | bytearray | memoryview:
    """:return: whole clusters covering [pos, end) with ``data`` in place
    and the old content around it (copy-on-write of head and tail)."""
    cs = img.g.cluster_size
    head = pos & (cs - 1)
    astart = pos - head
    aend = -(-end // cs) * cs
    if head == 0 and end == aend:
        return data
    buf = bytearray(aend - astart)
    if head:
        buf[:cs] = await img.cluster_content(astart // cs)
    last = aend // cs - 1
    if end != aend and not (head and last == astart // cs):
        buf[-cs:] = await img.cluster_content(last)
    buf[head:head + len(data)] = data
    return buf
