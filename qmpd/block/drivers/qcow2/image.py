"""An open qcow2 image: guest requests mapped onto host clusters.

This is the stateful half of the driver.  It holds the header, the L1
table, an :class:`~.l2cache.L2Cache` and the :class:`~.alloc.RefcountState`,
and does all its file I/O through the ``file`` child node (which goes
through ``qmpd.block.io``).  Metadata is written through, in crash-safe
order, inside each request:

1. refcount blocks, then the refcount table (and, after a table move, the
   header): a pointer is never written before the refcounts it relies on;
2. guest data into the newly allocated clusters;
3. L2 tables (new tables whole), then the L1 entries pointing at new tables;
4. only then the references dropped by the request are freed.

A crash at any point leaves at worst leaked clusters (``qemu-img check``
reports them as leaks, not corruption), as with QEMU.  One asyncio lock
serialises metadata changes; reads and in-place writes of allocated
clusters take it only to look up the mapping.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Sequence

from qmpd.block.drivers.qcow2.alloc import RefcountOverflow, RefcountState, RefcountWrites
from qmpd.block.drivers.qcow2.compress import (
    CompressedDataError, compress_cluster, decompress_cluster, encode_descriptor,
)
from qmpd.block.drivers.qcow2.header import Header, INCOMPAT_CORRUPT, encode_header
from qmpd.block.drivers.qcow2.l2cache import L2Cache
from qmpd.block.drivers.qcow2.writeplan import WritePlan, l2_sectors, plan_write
from qmpd.block.drivers.qcow2.tables import (
    COPIED, OFFSET_MASK, ZERO_FLAG, Geometry, Kind, Mapping,
    compressed_host_clusters, data_hosts, decode, same_run, standard_entry,
)
from qmpd.block.drivers.qcow2.childio import Buffer, ChainWrite, ChainWriter, ChildIO, Fill, Grow
from qmpd.block.errors import BlockIOError
from qmpd.tasks import TaskGroup

__all__ = ["Qcow2Image", "ChildIO", "CorruptImage", "Fill", "Buffer", "ChainWrite", "ChainWriter"]

log = logging.getLogger(__name__)


def _c_hex(n: int) -> str:
    """C's ``%#x``: ``0`` for zero, ``0x1f`` otherwise (QEMU's messages)."""
    return f"{n:#x}" if n else "0"


class CorruptImage(BlockIOError):
    """Metadata that cannot be right; the image is marked corrupt (EIO)."""

    def __init__(self, msg: str, offset: int = -1, size: int = -1) -> None:
        super().__init__(errno.EIO)
        self.msg = msg
        self.offset = offset
        self.size = size


class Qcow2Image:
    """Header, L1, L2 cache and refcounts of one open image."""

    def __init__(self, file: ChildIO, header: Header, l1: list[int], refs: RefcountState, *,
                 backing: ChildIO | None, read_only: bool, l2_cache_bytes: int,
                 grow: Grow, file_length: int, pass_discard: bool = False,
                 shrink: Grow | None = None) -> None:
        self.file = file
        self.header = header
        self.g = Geometry(header.cluster_bits)
        self.l1 = l1
        self.refs = refs
        self.backing = backing
        self.read_only = read_only
        self.cache = L2Cache(self.g.cluster_size, l2_cache_bytes)
        self._grow = grow
        self._shrink = shrink
        #: File length when opened: :meth:`trim` never cuts below it.
        self.opened_length = file_length
        self.file_length = file_length
        #: End of the furthest write (the file grows ahead of it in steps).
        self.written_end = 0
        self.pass_discard = pass_discard
        self.lock = asyncio.Lock()
        #: Where the next compressed stream may start (0: a fresh cluster).
        self._compressed_tail = 0
        self.corrupt = header.corrupt
        #: After a fatal corruption every request fails (QEMU drops the driver).
        self.dead = False
        self._l1_dirty: set[int] = set()
        #: Guest cluster ranges [first, last) of writes under way, and their end.
        self._inflight: list[tuple[int, int, asyncio.Event]] = []
        #: Called once with the CorruptImage when the image is marked corrupt.
        self.on_corrupt: Callable[[CorruptImage], None] | None = None
        #: Set by the driver: see :meth:`_write_chained`.
        self.chain_writer: ChainWriter | None = None

    @property
    def size(self) -> int:
        return self.header.size

    # ------------------------------------------------------------ corruption

    async def signal_corruption(self, exc: CorruptImage) -> None:
        """Mark the image corrupt (header bit, once) and report it."""
        if self.dead:
            return
        self.dead = True
        self.corrupt = True
        if not self.read_only:
            self.header = self.header.with_features(set_bits=INCOMPAT_CORRUPT)
            try:
                await self.file.write(72, self.header.incompatible_features.to_bytes(8, "big"))
            except BlockIOError:
                pass
        if self.on_corrupt is not None:
            self.on_corrupt(exc)

    # ------------------------------------------------------------ mapping

    async def _l2(self, l1_index: int) -> int | None:
        """:return: the host offset of the L2 table (loaded), or None."""
        entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
        off = entry & OFFSET_MASK
        if not off:
            return None
        if off & (self.g.cluster_size - 1):
            raise CorruptImage(f"L2 table offset {_c_hex(off)} unaligned "
                               f"(L1 index: {_c_hex(l1_index)})")
        if self.cache.table(off) is None:
            self.file.debug_event("l2_load")
            data = await self._pread(off, self.g.cluster_size)
            self.cache.put(off, bytearray(data))
        return off

    async def extent(self, pos: int, maxlen: int) -> tuple[Mapping, int]:
        """:return: the mapping at ``pos`` and how many bytes (<= maxlen) from
        ``pos`` map the same way (same kind; contiguous host for data)."""
        g = self.g
        cs = g.cluster_size
        l1i, l2i = g.split(pos)
        off = await self._l2(l1i)
        in_cluster = pos & (cs - 1)
        if off is None:
            # The whole L2 range is unallocated.
            span = (g.l2_entries - l2i) * cs - in_cluster
            return Mapping(Kind.UNALLOCATED, 0, False, 0), min(maxlen, span)
        entry = self.cache.get_entry(off, l2i)
        m = decode(entry, g)
        if m.kind == Kind.NORMAL and m.host & (cs - 1):
            raise CorruptImage(f"Cluster allocation offset {_c_hex(m.host)} unaligned "
                               f"(L2 offset: {_c_hex(off)}, L2 index: {_c_hex(l2i)})")
        n = cs - in_cluster
        if m.kind == Kind.COMPRESSED or n >= maxlen:
            return m, min(maxlen, n)
        # The following entries of the table, as far as maxlen reaches (one unpack).
        want = min(g.l2_entries - l2i - 1, -(-(maxlen - n) // cs))
        table = self.cache.table(off)
        assert table is not None
        n += same_run(table, l2i + 1, want, entry, cs) * cs
        return m, min(maxlen, n)

    async def mapping(self, pos: int, maxlen: int) -> tuple[Mapping, int]:
        """:meth:`extent`, turning corruption into a marked image and EIO."""
        try:
            return await self.extent(pos, maxlen)
        except CorruptImage as exc:
            await self.signal_corruption(exc)
            raise

    async def map_data(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """:return: ``(guest offset, host offset, n)`` host-contiguous
        extents covering ``[offset, offset + length)`` when all of it is
        data clusters of this image (not compressed, zero or unallocated),
        else None (block-copy's file-to-file path reads them from here)."""
        if self.dead:
            raise BlockIOError(errno.ENOMEDIUM)
        g = self.g
        cs = g.cluster_size
        out: list[tuple[int, int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            l1i, l2i = g.split(pos)
            off = await self._l2(l1i)
            table = None if off is None else self.cache.table(off)
            if table is None:
                return None
            count = min(g.l2_entries - l2i, -(-(end - (pos - (pos & (cs - 1)))) // cs))
            hosts = data_hosts(table, l2i, count, cs)
            if hosts is None:
                return None  # the node path reads it (and reports corruption)
            for host in hosts:
                n = min(cs - (pos & (cs - 1)), end - pos)
                host += pos & (cs - 1)
                if out and out[-1][1] + out[-1][2] == host:
                    out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
                else:
                    out.append((pos, host, n))
                pos += n
        return out

    # ------------------------------------------------------------ reading

    async def _pread(self, offset: int, length: int) -> bytes | bytearray:
        """Read from the file; what lies past its end reads as zeroes (QEMU's
        block layer zero-fills reads past the end of a protocol node)."""
        flen = self.file.length
        if offset + length <= flen:
            return await self.file.read(offset, length)
        n = max(0, min(length, flen - offset))
        head = await self.file.read(offset, n) if n else b""
        return bytes(head) + bytes(length - n)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if self.dead:
            raise BlockIOError(errno.ENOMEDIUM)
        m, n = await self.mapping(offset, length)
        if n == length and m.kind == Kind.NORMAL:
            self.file.debug_event("read_aio")
            return await self._pread(m.host + (offset & (self.g.cluster_size - 1)), length)
        out = bytearray(length)
        pos = offset
        end = offset + length
        while True:
            await self._read_extent(m, pos, n, out, pos - offset)
            pos += n
            if pos >= end:
                return out
            m, n = await self.mapping(pos, end - pos)

    async def _read_extent(self, m: Mapping, pos: int, n: int, out: bytearray, at: int) -> None:
        cs = self.g.cluster_size
        # blkdebug events on the file child as QEMU's qcow2_co_preadv_task.
        if m.kind == Kind.NORMAL:
            self.file.debug_event("read_aio")
            out[at:at + n] = await self._pread(m.host + (pos & (cs - 1)), n)
        elif m.kind == Kind.COMPRESSED:
            self.file.debug_event("read_compressed")
            data = await self._decompress(m)
            start = pos & (cs - 1)
            out[at:at + n] = data[start:start + n]
        elif m.kind == Kind.UNALLOCATED and self.backing is not None:
            blen = self.backing.length
            if pos < blen:
                k = min(n, blen - pos)
                self.file.debug_event("read_backing_aio")
                out[at:at + k] = await self.backing.read(pos, k)
        # ZERO, or unallocated without backing: already zeroes.

    async def _decompress(self, m: Mapping) -> bytes:
        raw = await self.file.read(m.host, m.csize)
        try:
            return decompress_cluster(raw, self.g.cluster_size, self.header.compression_type)
        except CompressedDataError as exc:
            raise BlockIOError(errno.EIO) from exc

    async def cluster_content(self, guest_cluster: int) -> bytes | bytearray:
        """:return: what one whole guest cluster reads as now."""
        cs = self.g.cluster_size
        start = guest_cluster * cs
        n = min(cs, self.size - start)
        data = await self.read(start, n)
        return data if n == cs else bytes(data) + bytes(cs - n)

    # ------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if self.dead:
            raise BlockIOError(errno.ENOMEDIUM)
        if self.corrupt:
            raise BlockIOError(errno.EIO)

    async def l2_for_write(self, l1i: int) -> int:
        """:return: the L2 table for ``l1i``, allocating a new one (in
        memory: written by :meth:`_commit`)."""
        off = await self._l2(l1i)
        if off is not None:
            return off
        cluster, _ = self.allocate(1, "L2 table")
        off = cluster << self.g.cluster_bits
        table = bytearray(self.g.cluster_size)
        self.cache.put(off, table)
        self.cache.set_entry(off, 0, 0)
        self.cache.set_entry(off, self.g.l2_entries - 1, 0)
        self.l1[l1i] = off | COPIED
        self._l1_dirty.add(l1i)
        return off

    def allocate(self, n: int, what: str, *, contiguous: bool = False) -> tuple[int, int]:
        """Allocate host clusters for ``what``, refusing (as corruption) any
        that overlap the header, the L1 table or the refcount table, and any
        refcount block the allocation had to place over them."""
        if self.refs.get(0) == 0:
            self._refuse_cluster_zero(what)
        before = set(self.refs.blocks)
        if contiguous:
            start, count = self.refs.allocate_contiguous(n), n
        else:
            start, count = self.refs.allocate(n)
        cb = self.g.cluster_bits
        self._check_overlap(start << cb, count << cb, what)
        for bi in set(self.refs.blocks) - before:
            self._check_overlap(self.refs.table[bi], 1 << cb, "refcount block")
        return start, count

    def _refuse_cluster_zero(self, what: str) -> None:
        """Cluster 0 (the header) looks free: the refcounts are damaged.  As
        QEMU: without a refcount block for it, the new block would go to
        cluster 1 and QEMU's overlap check stops that write first; otherwise
        the allocation at offset 0 is refused (no offset/size in the event)."""
        cs = self.g.cluster_size
        if self.refs.table[0] == 0:
            self._check_overlap(cs, cs, write=True)
        raise CorruptImage(f"Preventing invalid allocation of {what} at offset 0")

    def _check_overlap(self, off: int, n: int, what: str = "cluster", *,
                       write: bool = False) -> None:
        """Refuse to hand out clusters that hold the header, L1 or refcount table."""
        cs = self.g.cluster_size
        h = self.header
        areas = [("qcow2_header", 0, cs),
                 ("active L1 table", h.l1_table_offset, max(1, h.l1_size * 8)),
                 ("refcount table", self.refs.table_offset, self.refs.table_clusters * cs)]
        for name, start, size in areas:
            if off < start + size and start < off + n:
                if write:
                    raise CorruptImage(f"Preventing invalid write on metadata (overlaps with "
                                       f"{name})", off, n)
                raise CorruptImage(f"Preventing invalid allocation of {what} at offset "
                                   f"{off:#x} (overlaps with {name})", off, n)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Three phases, as QEMU's qcow2_co_pwritev: under :attr:`lock`,
        map the request and allocate its new clusters; then the data, and
        meanwhile the refcounts (the lock is released once they are
        written, so other requests' allocations and data overlap with this
        data); then, under the lock again, the L2 entries (and L1 for new
        tables) and the frees.  Guest clusters being written
        are held in :attr:`_inflight` so overlapping requests wait."""
        view = memoryview(data).cast("B")
        await self._write([(offset, len(view), view)], None)

    async def write_mapped(self, ranges: Sequence[tuple[int, int]], fill: Fill) -> None:
        """:meth:`write` of whole clusters whose data the caller puts in place
        itself (block-copy's file-to-file path): the same three phases, with
        phase 2 ``await fill(extents)``, ``(guest offset, host offset, n)``
        host-contiguous extents covering ``ranges`` in order.  Clusters are
        allocated for all the ranges at once (one contiguous run where the
        free space allows), so a group of chunks lands as one host extent.

        :param ranges: ``(offset, length)``, ascending, not overlapping,
            cluster aligned (a length may end at the end of the disk).
        :raise ValueError: a range is not cluster aligned.
        """
        cs = self.g.cluster_size
        for off, n in ranges:
            if off % cs or (n % cs and off + n != self.size):
                raise ValueError("unaligned mapped write")
        await self._write([(off, n, None) for off, n in ranges], fill)

    async def _write(self, parts: list[tuple[int, int, memoryview | None]], fill: Fill | None) -> None:
        self._check_writable()
        cb = self.g.cluster_bits
        first, last = parts[0][0] >> cb, -(-(parts[-1][0] + parts[-1][1]) >> cb)
        await self._lock_range(first, last)
        done = asyncio.Event()
        span = (first, last, done)
        self._inflight.append(span)
        try:
            plan = WritePlan()
            try:
                for off, n, view in parts:
                    await plan_write(self, plan, off, n, view)
                await self._ensure_length(max((h + n for h, _, n, _ in plan.data), default=0))
            except BaseException:
                await self._abort_runs(plan)
                self.lock.release()
                raise
            chain = self._chain_for(plan, fill)
            if chain is not None:
                await self._write_chained(plan, chain)
                return
            # The refcounts (still under the lock: refcount block writes keep
            # their order) and the data go out together; both land before
            # the L2 entries below.
            try:
                outcome = await asyncio.gather(self._write_refcounts_unlock(),
                                               self._put_data(plan, fill), return_exceptions=True)
            except BaseException:
                async with self.lock:
                    await self._abort_runs(plan)
                raise
            failed = [r for r in outcome if isinstance(r, BaseException)]
            if failed:
                async with self.lock:
                    await self._abort_runs(plan)
                raise failed[0]
            async with self.lock:
                await self._apply_entries(plan)
                await self._commit([], plan.frees)
        except CorruptImage as exc:
            await self.signal_corruption(exc)
            raise
        finally:
            self._inflight.remove(span)
            done.set()

    def _chain_for(self, plan: WritePlan, fill: Fill | None) -> ChainWrite | None:
        """The one-call path of an allocating write (:meth:`_write_chained`),
        or None: only when no other write is under way (it keeps the lock
        through the data, which would hold the others up), the write needs
        no new L2 table, L1 entry or frees, and the file child is a plain
        file.  Callers hold :attr:`lock`."""
        if (fill is not None or self.chain_writer is None or not plan.runs or plan.frees
                or len(self._inflight) != 1 or self._l1_dirty or self.cache.has_dirty
                or any(b is None for _, _, _, b in plan.data)):
            return None
        return self.chain_writer()

    async def _write_chained(self, plan: WritePlan, chain: ChainWrite) -> None:
        """Phases 2 and 3 of :meth:`_write` in one worker call, under
        :attr:`lock` throughout: the refcount block sectors, the data, then
        the changed L2 sectors, pwritten one after another by one thread.

        Crash order: pwrite(2) returns once the bytes are in the page
        cache, and a killed process (``kill -9``) cannot undo or reorder
        writes that completed; each write here starts only after the one
        before it returned.  So, as on the three-phase path, an L2 entry
        is on disk only after the refcounts and the data of its clusters
        (nothing is freed or points at a new table here).  Readers take
        no lock: the cache gets the new entries once they are written.  On
        error before the L2 sectors the new clusters are given back; if
        the L2 write failed, the entries stay set and dirty in the cache."""
        from qmpd.block.io import SeqWriteError

        writes: list[tuple[int, Buffer]] = []
        l2_tried = False
        try:
            while self.refs.pending():
                w = self.refs.take_writes()
                if w.new_table is not None:
                    # A refcount table move (rare): its usual order first.
                    for off, buf in writes:
                        await self._file_write(off, buf)
                    writes = []
                    await self._put_refcount_writes(w)
                    continue
                writes += w.blocks
                writes += w.table
            writes += [(h, b) for h, _, _, b in plan.data if b is not None]
            n_before_l2 = len(writes)
            writes += await l2_sectors(self, plan)
            await self._ensure_length(max(off + len(b) for off, b in writes))
            self.file.debug_event("write_aio")
            # The worker call cannot be stopped once started: if this task is
            # cancelled meanwhile, wait for it all the same, so that the
            # clusters are not given back under an L2 entry still to land.
            job = TaskGroup("qcow2-chain", log_failures=False).spawn(chain(writes))
            cancelled = False
            while True:
                try:
                    await asyncio.shield(job)
                    break
                except asyncio.CancelledError:
                    if job.done():
                        raise
                    cancelled = True
                except SeqWriteError as exc:
                    l2_tried = exc.done >= n_before_l2
                    raise
            # On disk now: the same entries in the cache, clean.
            await self._apply_entries(plan)
            self.cache.take_dirty()
            if cancelled:
                raise asyncio.CancelledError
        except BaseException:
            if l2_tried:
                await self._apply_entries(plan)
            else:
                await self._abort_runs(plan)
            raise
        finally:
            self.lock.release()

    async def _write_refcounts_unlock(self) -> None:
        try:
            await self._write_refcounts()
        finally:
            self.lock.release()

    async def _put_data(self, plan: WritePlan, fill: Fill | None) -> None:
        if not plan.data:
            return
        self.file.debug_event("write_aio")
        if fill is not None:
            await fill([(g, h, n) for h, g, n, _ in plan.data])
        else:
            await asyncio.gather(*(self.file.write(h, b) for h, _, _, b in plan.data if b is not None))

    async def _abort_runs(self, plan: WritePlan) -> None:
        """A write failed before its L2 entries: give the new clusters of
        ``plan`` back (nothing points at them), as QEMU's
        qcow2_alloc_cluster_abort; if that fails too they stay leaked.
        Callers hold :attr:`lock`."""
        cb = self.g.cluster_bits
        for _, _, host, n in plan.runs:
            self.refs.free(host >> cb, n)
        try:
            # the refcounts, and a new L2 table with its L1 entry (it points
            # at nothing of this request, but is counted)
            await self._commit([], [])
        except BlockIOError:
            pass

    async def _lock_range(self, first: int, last: int) -> None:
        """Take :attr:`lock` once no in-flight write covers guest clusters
        [first, last)."""
        while True:
            await self.lock.acquire()
            busy = next((ev for a, b, ev in self._inflight if a < last and first < b), None)
            if busy is None:
                return
            self.lock.release()
            await busy.wait()

    async def _apply_entries(self, plan: WritePlan) -> None:
        """Point the L2 entries of ``plan`` at its new clusters (in memory;
        :meth:`_commit` writes them)."""
        cs = self.g.cluster_size
        for l1i, idx, host, n in plan.runs:
            l2off = await self._l2(l1i)
            assert l2off is not None
            self.cache.set_entries(l2off, idx, [standard_entry(host + k * cs) for k in range(n)])

    async def _commit(self, data_writes: list[tuple[int, bytes | bytearray | memoryview]],
                      frees: list[Mapping]) -> None:
        # Refcounts and data do not depend on each other; both must land
        # before the L2/L1 entries that point at the new clusters.
        if data_writes:
            self.file.debug_event("write_aio")
            await self._ensure_length(max(h + len(b) for h, b in data_writes))
            await asyncio.gather(self._write_refcounts(),
                                 *(self.file.write(h, b) for h, b in data_writes))
        else:
            await self._write_refcounts()
        for off, buf in self.cache.take_dirty():
            await self._file_write(off, buf)
        if self._l1_dirty:
            lo, hi = min(self._l1_dirty), max(self._l1_dirty) + 1
            lo_b, hi_b = (lo * 8) & ~511, min(len(self.l1) * 8, (hi * 8 + 511) & ~511)
            entries = self.l1[lo_b // 8:hi_b // 8]
            await self._file_write(self.header.l1_table_offset + lo_b,
                                   b"".join(e.to_bytes(8, "big") for e in entries))
            self._l1_dirty = set()
        if frees:
            await self._free(frees)

    async def _free(self, frees: list[Mapping]) -> None:
        cb = self.g.cluster_bits
        released: list[int] = []
        for m in frees:
            clusters = (compressed_host_clusters(m, cb) if m.kind == Kind.COMPRESSED
                        else range(m.host >> cb, (m.host >> cb) + 1))
            for c in clusters:
                try:
                    if self.refs.update(c, -1) == 0:
                        released.append(c)
                except RefcountOverflow:
                    # A reference to a cluster whose refcount is already 0
                    # (a damaged image): QEMU reports it and goes on.
                    log.warning("qcow2_free_clusters failed: Invalid argument")
        await self._write_refcounts()
        if self.pass_discard:
            for c in released:
                await self.file.discard(c << cb, 1 << cb)

    async def _write_refcounts(self) -> None:
        while self.refs.pending():
            await self._put_refcount_writes(self.refs.take_writes())

    async def _put_refcount_writes(self, w: RefcountWrites) -> None:
        for off, buf in w.blocks:
            await self._file_write(off, buf)
        for off, buf in w.table:
            await self._file_write(off, buf)
        if w.new_table is not None:
            toff, tclusters = w.new_table
            self.header.refcount_table_offset = toff
            self.header.refcount_table_clusters = tclusters
            await self.file.write(48, toff.to_bytes(8, "big") + tclusters.to_bytes(4, "big"))

    async def _ensure_length(self, end: int) -> None:
        """Grow the file to hold ``end`` bytes, ahead in steps of 1/8 of its
        size (8 to 64 MiB) so sequential allocation does not resize on every
        request (a resize waits for the file's writes in flight);
        :meth:`trim` gives the excess back at close."""
        self.written_end = max(self.written_end, end)
        if end <= self.file_length:
            return
        cs = self.g.cluster_size
        step = min(max(self.file_length // 8, 8 << 20), 64 << 20)
        new_len = -(-max(end, self.file_length + step) // cs) * cs
        await self._grow(new_len)
        self.file_length = max(self.file_length, new_len)

    async def trim(self) -> None:
        """Truncate the file after the last cluster in use (closing)."""
        used = self.refs.end() << self.g.cluster_bits
        # Never below what was written: an L2 table or data cluster that a
        # damaged image references without a refcount keeps its bytes.
        used = max(used, self.opened_length, -(-self.written_end // self.g.cluster_size)
                   * self.g.cluster_size)
        if used < self.file_length and self._shrink is not None:
            await self._shrink(used)
            self.file_length = used

    async def _file_write(self, off: int, buf: bytes | bytearray | memoryview) -> None:
        await self._ensure_length(off + len(buf))
        await self.file.write(off, buf)

    # ------------------------------------------------------------ zeroes, discard

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check_writable()
        cs = self.g.cluster_size
        end = offset + length
        astart = -(-offset // cs) * cs
        aend = end if end == self.size else end // cs * cs
        if self.header.version < 3 and self.backing is not None or astart >= aend:
            await self._write_zero_buffers(offset, end)
            return
        if offset < astart:
            await self._write_zero_buffers(offset, astart)
        await self._lock_range(astart >> self.g.cluster_bits, -(-aend >> self.g.cluster_bits))
        try:
            await self._set_entries(astart, aend, zero=True, unmap=may_unmap)
        finally:
            self.lock.release()
        if aend < end:
            await self._write_zero_buffers(aend, end)

    async def _write_zero_buffers(self, start: int, end: int) -> None:
        step = 1 << 20
        while start < end:
            n = min(step, end - start)
            m, k = await self.mapping(start, n)
            if not (m.kind == Kind.ZERO or (m.kind == Kind.UNALLOCATED and self.backing is None)):
                await self.write(start, bytes(k))
            start += k

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        cs = self.g.cluster_size
        end = offset + length
        astart = -(-offset // cs) * cs
        aend = end if end == self.size else end // cs * cs
        if astart >= aend:
            return
        await self._lock_range(astart >> self.g.cluster_bits, -(-aend >> self.g.cluster_bits))
        try:
            await self._set_entries(astart, aend, zero=False, unmap=True)
        finally:
            self.lock.release()

    async def _set_entries(self, start: int, end: int, *, zero: bool, unmap: bool) -> None:
        """Make whole clusters [start, end) zero clusters (``zero``) or
        discarded ones, freeing their host clusters when ``unmap``."""
        g = self.g
        cb = g.cluster_bits
        v3 = self.header.version >= 3
        frees: list[Mapping] = []
        try:
            c = start >> cb
            last = -(-end >> cb)
            while c < last:
                l1i, l2i = g.split(c << cb)
                n = min(last - c, g.l2_entries - l2i)
                off = await self._l2(l1i)
                if off is None:
                    if self.backing is None or not v3:
                        c += n
                        continue
                    off = await self.l2_for_write(l1i)
                for k in range(n):
                    idx = l2i + k
                    entry = self.cache.get_entry(off, idx)
                    m = decode(entry, g)
                    if m.kind == Kind.UNALLOCATED and self.backing is None:
                        continue
                    if zero and not unmap and m.kind == Kind.NORMAL and v3:
                        new = entry | ZERO_FLAG
                    else:
                        new = ZERO_FLAG if v3 and (zero or self.backing is not None) else 0
                        if m.host and m.kind != Kind.UNALLOCATED:
                            frees.append(m)
                    if new != entry:
                        self.cache.set_entry(off, idx, new)
                c += n
            await self._commit([], frees)
        except CorruptImage as exc:
            await self.signal_corruption(exc)
            raise

    # ------------------------------------------------------------ compressed writes

    async def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write one whole cluster compressed (deflate or zstd, as the
        header says), as QEMU's ``compress: true`` backups do; falls back to
        a normal write when the stream does not fit in ``cluster_size - 1``
        bytes.  ``offset`` is cluster aligned."""
        cs = self.g.cluster_size
        out = (compress_cluster(data, self.header.compression_type, cs)
               if len(data) == cs else None)
        if out is None:
            await self.write(offset, data)
            return
        self._check_writable()
        first = offset >> self.g.cluster_bits
        await self._lock_range(first, first + 1)
        try:
            g = self.g
            cb = g.cluster_bits
            l1i, l2i = g.split(offset)
            l2off = await self.l2_for_write(l1i)
            old = decode(self.cache.get_entry(l2off, l2i), g)
            host = self._alloc_compressed(len(out))
            self.cache.set_entry(l2off, l2i, encode_descriptor(host, len(out), cb))
            frees = [old] if old.host and old.kind != Kind.UNALLOCATED else []
            await self._commit([(host, out)], frees)
        finally:
            self.lock.release()

    def _alloc_compressed(self, n: int) -> int:
        """QEMU's qcow2_alloc_bytes: streams are packed back to back from
        where the last one ended, taking one reference on each host cluster
        they touch.  :return: the host byte offset for ``n`` bytes."""
        cb, cs = self.g.cluster_bits, self.g.cluster_size
        pos = self._compressed_tail
        if pos and self.refs.get(pos >> cb) in (0, (1 << self.refs.bits) - 1):
            pos = 0
        if pos and cs - (pos & (cs - 1)) >= n:
            self.refs.update(pos >> cb, 1)
        else:
            new = self.allocate(1, "compressed cluster")[0] << cb
            if pos and new == (pos | (cs - 1)) + 1:
                self.refs.update(pos >> cb, 1)  # spans into the next cluster
            else:
                pos = new
        end = pos + n
        self._compressed_tail = end if end & (cs - 1) else 0
        return pos

    # ------------------------------------------------------------ status

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        m, n = await self.mapping(offset, length)
        if m.kind in (Kind.NORMAL, Kind.COMPRESSED):
            return True, n
        if m.kind == Kind.UNALLOCATED and self.backing is not None:
            blen = self.backing.length
            if offset < blen:
                return await self.backing.block_status(offset, min(n, blen - offset))
        return False, n

    async def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """:return: ``(allocated in this layer, n)``: data or zero clusters of
        this image, as opposed to what falls through to the backing file."""
        m, n = await self.mapping(offset, length)
        return m.kind != Kind.UNALLOCATED, n

    # ------------------------------------------------------------ other metadata

    async def allocate_metadata(self, n: int, what: str) -> int:
        """Allocate ``n`` contiguous clusters for metadata (bitmap tables,
        directories) with their refcounts written; :return: the file offset.
        Callers hold :attr:`lock`."""
        start, _ = self.allocate(n, what, contiguous=True)
        await self._write_refcounts()
        return start << self.g.cluster_bits

    async def write_metadata(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write metadata into clusters from :meth:`allocate_metadata`."""
        await self._file_write(offset, data)

    async def free_metadata(self, offset: int, n: int) -> None:
        """Drop the reference of ``n`` clusters from ``offset`` (refcounts written)."""
        cb = self.g.cluster_bits
        self.refs.free(offset >> cb, n)
        await self._write_refcounts()

    # ------------------------------------------------------------ header

    async def rewrite_header(self) -> None:
        """Rewrite cluster 0's header and extensions (the backing name keeps
        its place after them)."""
        data = encode_header(self.header)
        await self.file.write(0, data)

