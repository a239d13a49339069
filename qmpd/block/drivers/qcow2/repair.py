"""Repair of a dirty qcow2 image at a read-write open, as QEMU 7.2 does it.

A writer with lazy refcounts sets the header's dirty bit before its first
allocating write and clears it at a clean close; until then refcount
updates may be missing from the file.  When it dies, the next read-write
open finds the bit set and runs QEMU's check with ``fix-errors`` and
``fix-leaks`` (``qcow2_do_open`` -> ``qcow2_co_check_locked``):

1. count the references every piece of metadata makes (:func:`count_references`:
   the header cluster, the active L1 and its L2 tables and data clusters,
   compressed streams, the snapshot table and each snapshot's tables, the
   bitmap directory, tables and data);
2. make the refcounts equal to them: in place when the refcount
   structure is sound (:func:`plan_in_place`), otherwise a new refcount
   table and blocks written past everything in use, then the header switched
   over to them (:func:`plan_rebuild`, QEMU's ``rebuild_refcount_structure``);
3. set or clear the ``COPIED`` flag of active L1/L2 entries to match
   ``refcount == 1`` (QEMU's ``check_oflag_copied``);
4. clear the dirty bit -- only when no corruption is left (QEMU keeps it
   otherwise, so the next open tries again).

Every step leaves a crash-safe image: refcounts are written before the
header points at them, and the dirty bit goes last.  Worked example (a
``qemu-io`` that aborted after writing 1 MiB into an empty 16 MiB image
with lazy refcounts: clusters 5-20 are referenced by the L2 table but
have refcount 0)::

    >>> counts, res = await count_references(read, header, file_length)
    >>> counts.get(5), res.corruptions
    (1, 0)
    >>> plan = plan_in_place(counts, refs, file_length)    # blocks are sound
    >>> plan.corruptions_fixed, plan.leaks_fixed
    (16, 0)

Pure planning over an in-memory count (:class:`Counts`); the I/O is the
driver's (:mod:`.dirty`).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from qmpd.block.drivers.qcow2.alloc import RefcountState
from qmpd.block.drivers.qcow2.bitmaps_ext import BitmapError, BitmapsExt, parse_directory, parse_table
from qmpd.block.drivers.qcow2.header import AUTOCLEAR_BITMAPS, Header
from qmpd.block.drivers.qcow2.refcount import RefcountBlock
from qmpd.block.drivers.qcow2.tables import COPIED, OFFSET_MASK, Geometry, Kind, decode, unpack_table

__all__ = ["CheckResult", "Counts", "RefcountPlan", "count_references", "plan_in_place",
           "plan_rebuild", "copied_fixes", "snapshot_l1_tables", "SnapshotTableError"]

#: ``await read(offset, length)``: metadata bytes (zeroes past the end of the file).
Read = Callable[[int, int], Awaitable[bytes]]

_SNAPSHOT = struct.Struct(">QIHHIIQII")


@dataclass(slots=True)
class CheckResult:
    """What the check found and fixed (QEMU's BdrvCheckResult)."""

    corruptions: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    rebuilt: bool = False
    #: QEMU's check messages ("ERROR cluster 5 refcount=0 reference=1", ...).
    messages: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.corruptions += 1
        self.messages.append(text)


class Counts:
    """QEMU's in-memory refcount table: references per host cluster."""

    def __init__(self, cluster_bits: int, refcount_bits: int, file_length: int,
                 res: CheckResult) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.max_value = min((1 << refcount_bits) - 1, 0xFFFF_FFFF)
        self.file_length = file_length
        self.res = res
        self.a = array("I", bytes(4 * (-(-file_length // self.cluster_size))))

    def __len__(self) -> int:
        return len(self.a)

    def get(self, cluster: int) -> int:
        return self.a[cluster] if cluster < len(self.a) else 0

    def inc(self, offset: int, size: int) -> None:
        """One more reference to each cluster of ``[offset, offset+size)``
        (QEMU's qcow2_inc_refcounts_imrt, with its two errors)."""
        if size <= 0:
            return
        cs = self.cluster_size
        if offset + size - self.file_length >= cs:
            self.res.error("ERROR: counting reference for region exceeding the end of the file "
                           f"by one cluster or more: offset {offset:#x} size {size:#x}")
            return
        first, last = offset >> self.cluster_bits, (offset + size - 1) >> self.cluster_bits
        if last >= len(self.a):
            self.a.extend(array("I", bytes(4 * (last + 1 - len(self.a)))))
        a = self.a
        for k in range(first, last + 1):
            if a[k] >= self.max_value:
                self.res.error(f"ERROR: overflow cluster offset={k << self.cluster_bits:#x}")
                continue
            a[k] += 1


async def _count_l1(read: Read, counts: Counts, g: Geometry, l1_offset: int, l1_size: int,
                    res: CheckResult) -> None:
    """Count an L1 table, its L2 tables and what they map."""
    cs = g.cluster_size
    counts.inc(l1_offset, l1_size * 8)
    l1 = unpack_table(await read(l1_offset, l1_size * 8))
    for entry in l1:
        l2_off = entry & OFFSET_MASK
        if not l2_off:
            continue
        counts.inc(l2_off, cs)
        if l2_off & (cs - 1):
            res.error(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; "
                      "L1 entry corrupted")
            continue
        for e in unpack_table(await read(l2_off, cs)):
            if not e & ~COPIED:
                continue
            m = decode(e, g)
            if m.kind == Kind.COMPRESSED:
                counts.inc(m.host, m.csize)
            elif m.kind in (Kind.NORMAL, Kind.ZERO) and m.host:
                if m.host & (cs - 1):
                    res.error(f"ERROR offset={m.host:x}: Cluster is not properly aligned; "
                              "L2 entry corrupted.")
                counts.inc(m.host, cs)


#: QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE.
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * 65536


class SnapshotTableError(Exception):
    """QEMU 7.2's qcow2_read_snapshots refusals (``str()`` is its text)."""


async def snapshot_l1_tables(read: Read, h: Header) -> tuple[int, list[tuple[int, int]]]:
    """:return: the snapshot table's size in bytes and each snapshot's
    ``(l1_table_offset, l1_size)``.

    :raise SnapshotTableError: QEMU's open checks on the table."""
    out: list[tuple[int, int]] = []
    pos = h.snapshots_offset
    for i in range(h.nb_snapshots):
        fixed = await read(pos, _SNAPSHOT.size)
        l1_off, l1_size, id_len, name_len, _s, _ns, _vm, _vms, extra = _SNAPSHOT.unpack(fixed)
        if extra > MAX_SNAPSHOT_EXTRA_DATA:
            raise SnapshotTableError(f"Too much extra metadata in snapshot table entry {i}")
        out.append((l1_off, l1_size))
        pos += _SNAPSHOT.size + extra + id_len + name_len
        pos = (pos + 7) & ~7
        if pos - h.snapshots_offset > MAX_SNAPSHOTS_SIZE:
            raise SnapshotTableError("Snapshot table exceeds the maximum size")
    return pos - h.snapshots_offset, out


async def count_references(read: Read, h: Header, file_length: int) -> tuple[Counts, CheckResult]:
    """Count the references of everything but the refcount table and blocks."""
    res = CheckResult()
    g = Geometry(h.cluster_bits)
    cs = g.cluster_size
    counts = Counts(h.cluster_bits, h.refcount_bits, file_length, res)
    counts.inc(0, cs)
    await _count_l1(read, counts, g, h.l1_table_offset, h.l1_size, res)
    if h.nb_snapshots:
        try:
            size, tables = await snapshot_l1_tables(read, h)
        except SnapshotTableError as exc:
            res.check_errors += 1
            res.messages.append(str(exc))
            return counts, res
        counts.inc(h.snapshots_offset, size)
        for off, n in tables:
            if off & (cs - 1) or n > (32 << 20) // 8:
                res.error(f"ERROR snapshot L1 table at {off:#x} is invalid")
                continue
            await _count_l1(read, counts, g, off, n, res)
    if h.bitmaps_ext is not None and h.autoclear_features & AUTOCLEAR_BITMAPS:
        ext = BitmapsExt.of(h.bitmaps_ext)
        counts.inc(ext.directory_offset, ext.directory_size)
        try:
            entries = parse_directory(await read(ext.directory_offset, ext.directory_size),
                                      ext.nb_bitmaps, cs, h.size, strict=False)
            for e in entries:
                counts.inc(e.table_offset, e.table_size * 8)
                for t in parse_table(await read(e.table_offset, e.table_size * 8), cs):
                    if t > 1:
                        counts.inc(t, cs)
        except BitmapError as exc:
            res.check_errors += 1
            res.messages.append(str(exc))
    return counts, res


@dataclass(slots=True)
class RefcountPlan:
    """Refcount writes that make the file agree with :class:`Counts`."""

    #: The refcounts afterwards (the driver's allocator state).
    refs: RefcountState
    #: (file offset, bytes) to write, in order, before ``new_table``.
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    #: After a rebuild: (refcount_table_offset, refcount_table_clusters).
    new_table: tuple[int, int] | None = None
    #: Refcounts per cluster afterwards, refcount structures included.
    final: Counts | None = None


def _block_bytes(counts: Counts, bi: int, entries: int, bits: int) -> bytes:
    """:return: refcount block ``bi`` as it should be on disk."""
    vals = counts.a[bi * entries:(bi + 1) * entries]
    if len(vals) < entries:
        vals.extend(array("I", bytes(4 * (entries - len(vals)))))
    if bits < 8:
        block = RefcountBlock.empty(entries * bits // 8, bits)
        for i, v in enumerate(vals):
            if v:
                block.set(i, v)
        return bytes(block.data)
    typed = array({8: "B", 16: "H", 32: "I", 64: "Q"}[bits], vals)
    if sys.byteorder == "little":
        typed.byteswap()
    return typed.tobytes()


def _message(cluster: int, have: int, want: int) -> str:
    return f"Repairing cluster {cluster} refcount={have} reference={want}"


def plan_in_place(counts: Counts, refs: RefcountState, res: CheckResult) -> RefcountPlan | None:
    """Fix the refcounts inside the existing blocks.

    :return: None when the structure itself is unsound (a referenced cluster
        without a refcount block, a block or table cluster past the end of
        the file or shared with other metadata): rebuild instead.
    """
    cs, cb = counts.cluster_size, counts.cluster_bits
    file_clusters = -(-counts.file_length // cs)
    structure = list(range(refs.table_offset >> cb,
                           (refs.table_offset >> cb) + refs.table_clusters))
    structure += [refs.table[bi] >> cb for bi in refs.blocks]
    if any(c >= file_clusters or counts.get(c) for c in structure):
        return None
    final = Counts(cb, refs.bits, counts.file_length, res)
    final.a = array("I", counts.a)
    for c in structure:
        final.inc(c << cb, cs)
    if any(final.get(c) != 1 for c in structure):
        return None
    e = refs.entries
    for bi in range(-(-len(final) // e)):
        if bi not in refs.blocks and any(final.a[bi * e:(bi + 1) * e]):
            return None
    writes: list[tuple[int, bytes]] = []
    for bi in sorted(refs.blocks):
        block = refs.blocks[bi]
        want_bytes = _block_bytes(final, bi, e, refs.bits)
        if want_bytes == block.data:
            continue
        if refs.bits >= 8:
            n = refs.bits // 8
            changed = [i for i in range(e)
                       if want_bytes[i * n:(i + 1) * n] != block.data[i * n:(i + 1) * n]]
        else:
            changed = [i for i in range(e) if final.get(bi * e + i) != block.get(i)]
        for i in changed:
            c = bi * e + i
            want, have = final.get(c), block.get(i)
            if have > want:
                res.leaks_fixed += 1
            else:
                res.corruptions_fixed += 1
            res.messages.append(_message(c, have, want))
            block.set(i, want)
        span = block.dirty_span()
        if span is not None:
            writes.append((refs.table[bi] + span[0], bytes(block.data[span[0]:span[1]])))
            block.clean()
    return RefcountPlan(refs, writes, None, final)


def plan_rebuild(counts: Counts, refs: RefcountState, res: CheckResult) -> RefcountPlan:
    """QEMU's rebuild_refcount_structure: new blocks and a new table in
    fresh clusters past everything in use (the old table and blocks too, so
    the image stays valid until the header points at the new ones)."""
    cs, cb = counts.cluster_size, counts.cluster_bits
    e = refs.entries
    per_table_cluster = cs // 8
    old_end = max([(refs.table_offset >> cb) + refs.table_clusters]
                  + [(off >> cb) + 1 for off in refs.table if off])
    base = max(len(counts), old_end, -(-counts.file_length // cs))
    used = {bi for bi in range(-(-len(counts) // e)) if any(counts.a[bi * e:(bi + 1) * e])}
    nb, t = len(used), 1
    while True:
        end = base + nb + t
        ranges = used | set(range(base // e, (end - 1) // e + 1))
        need_t = max(1, -(-(max(ranges) + 1) // per_table_cluster))
        if len(ranges) == nb and need_t == t:
            break
        nb, t = len(ranges), need_t
    final = Counts(cb, refs.bits, (base + nb + t) * cs, res)
    final.a[:len(counts)] = counts.a
    final.inc(base * cs, (nb + t) * cs)
    table = [0] * (t * per_table_cluster)
    blocks: dict[int, RefcountBlock] = {}
    writes: list[tuple[int, bytes]] = []
    for j, bi in enumerate(sorted(ranges)):
        block = RefcountBlock(bytearray(_block_bytes(final, bi, e, refs.bits)), refs.bits)
        blocks[bi] = block
        table[bi] = (base + j) << cb
        writes.append((table[bi], bytes(block.data)))
    toff = (base + nb) << cb
    writes.append((toff, b"".join(x.to_bytes(8, "big") for x in table)))
    res.rebuilt = True
    res.messages.append("Rebuilding refcount structure")
    new = RefcountState(cb, refs.bits, table=table, blocks=blocks, table_offset=toff,
                        table_clusters=t)
    return RefcountPlan(new, writes, (toff, t), final)


async def copied_fixes(read: Read, g: Geometry, l1: list[int], final: Counts,
                       res: CheckResult) -> list[tuple[int, bytes]]:
    """QEMU's check_oflag_copied with fix-errors: active L1/L2 entries get
    ``COPIED`` exactly when their cluster's refcount is 1.  Changes ``l1``
    in place; :return: the L2 tables to rewrite (offset, whole table)."""
    cs, cb = g.cluster_size, g.cluster_bits
    out: list[tuple[int, bytes]] = []
    for i, entry in enumerate(l1):
        l2_off = entry & OFFSET_MASK
        if not l2_off or l2_off & (cs - 1):
            continue
        want = final.get(l2_off >> cb) == 1
        if want != bool(entry & COPIED):
            res.corruptions_fixed += 1
            res.messages.append(f"Repairing OFLAG_COPIED L2 cluster: l1_index={i} "
                                f"l1_entry={entry:x} refcount={final.get(l2_off >> cb)}")
            l1[i] = entry ^ COPIED
        table = unpack_table(await read(l2_off, cs))
        changed = False
        for j, e in enumerate(table):
            if not e & ~COPIED:
                continue
            m = decode(e, g)
            if m.kind not in (Kind.NORMAL, Kind.ZERO) or not m.host or m.host & (cs - 1):
                continue
            rc = final.get(m.host >> cb)
            if (rc == 1) != m.copied:
                res.corruptions_fixed += 1
                res.messages.append(f"Repairing OFLAG_COPIED data cluster: l2_entry={e:x} "
                                    f"refcount={rc}")
                table[j] = e ^ COPIED
                changed = True
        if changed:
            out.append((l2_off, b"".join(x.to_bytes(8, "big") for x in table)))
    return out
