"""Block-copy: the copy engine shared by the backup job and copy-before-write.

A :class:`BlockCopy` copies clusters of a *source* node to a *target* node
of the same length.  It owns the *copy bitmap* (a set bit = "still to be
copied"; an anonymous, disabled :class:`~qmpd.bitmap.DirtyBitmap` whose
placement the caller chooses) and keeps the job's progress meter (spec 4.3).

The algorithm is QEMU's (spec 4.4)::

    chunk   = maximal run of dirty clusters from the cursor, capped at
              min(1 MiB, max-chunk) (one cluster when compressing)
    claim   : clear the chunk's bits (now "in flight")
    status  : block status at the chunk start; an extent shorter than a
              cluster (or a failed query) means one data cluster; an extent
              reaching the disk end is rounded up, others down; the tail past
              it is given back (bits re-set)
    hole    : write zeroes on the target (the source is not read)
    data    : one read of the chunk, then one write
    failure : bits re-set, the first error kept, no new chunks, pass ends

:meth:`BlockCopy.run` is the background loop (``max_workers`` chunks in
flight, strict ascending order with 1, the job's throttle before each
chunk, re-passes until nothing is dirty); :meth:`BlockCopy.copy_range` is
copy-before-write's synchronous entry point, which copies only the
still-dirty clusters of a range, waits for chunks already in flight there,
and ignores the rate limit.

When both ends are plain ``raw``-over-``file`` (or ``file``) chains without
blkdebug, hooks or detect-zeroes (the *fast path*), data chunks go through
``copy_file_range(2)`` between the two files, the source's block status is
cached per extent, zeroing a range the target file already has as a hole
is skipped, and (without a rate limit) up to 32 chunks of one kind are
dispatched as one request (contiguous ones for holes; any for data, copied
by one :func:`qmpd.block.io.copy_ranges` call).  Bitmaps, progress and the
target's contents are the same as on the generic path.

When an end is a qcow2 node directly over such a file (and the other a
qcow2 node or a file window: the *mapped path*, :func:`~qmpd.block.fastcopy.copy_end`),
data chunks are copied file to file as well: the source's data clusters
are looked up in its L2 tables, the target allocates the clusters of the
whole group at once (one host run), ``copy_file_range(2)`` copies between
the host offsets in one pool job, and only then does the target commit
its L2 entries (refcounts and data before L2, L2 before L1, as on every
qcow2 write).  Hole chunks batch as on the fast path; a data group takes
up to 1024 chunks or 32 MiB, contiguous or not (an incremental backup's
scattered clusters go together).  A range the source does not hold as plain data
clusters (compressed, zero, from a backing file) or a target range that
is not cluster aligned goes the node path; a failed copy is redone with
a separate read and write, so the error is attributed as there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from qmpd.bitmap import DirtyBitmap
from qmpd.block.errors import BlockIOError
from qmpd.block.fastcopy import (
    CopyEnd, FileView, copy_end, file_view, mark_read, pair_extents, write_direct, write_end,
)
from qmpd.block.io import copy_pairs, copy_range, copy_ranges
from qmpd.block.node import BlockNode
from qmpd.tasks import TaskGroup

__all__ = ["BlockCopy", "CopyFailure", "ProgressSink", "DEFAULT_CLUSTER", "MAX_CHUNK"]

#: Backup cluster size when the target reports none (spec 4.2).
DEFAULT_CLUSTER = 64 * 1024
#: Chunk limit of read/write copying (QEMU's BLOCK_COPY_MAX_BUFFER).
MAX_CHUNK = 1 << 20
#: Most bytes one node-path read/write of a group covers.
_SLOW_SEGMENT = 8 << 20
#: Most chunks dispatched as one request on the fast path.
_BATCH = 32
#: Most chunks, and bytes, of one data group on the mapped path: scattered
#: clusters (an incremental backup) allocate, copy and commit together.
_MAPPED_BATCH = 1024
_MAPPED_BYTES = 32 << 20


class ProgressSink(Protocol):
    """The part of a job's progress meter block-copy drives."""

    def work_done(self, nbytes: int) -> None: ...

    def set_remaining(self, nbytes: int) -> None: ...


@dataclass(frozen=True, slots=True)
class CopyFailure:
    """Why a pass failed: the errno and whether the read (source) failed."""

    error: BlockIOError
    is_read: bool


class _Chunk:
    """One claimed chunk ``[start, start + length)``; ``done`` once it ended."""

    __slots__ = ("start", "length", "done")

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.length = length
        self.done = asyncio.Event()


class BlockCopy:
    """Copies dirty clusters of ``source`` to ``target``.

    :param copy_bitmap: the copy bitmap (granularity = ``cluster_size``,
        size = source length); the caller fills it and places it.
    :param max_chunk: ``x-perf.max-chunk`` (0 = no limit).
    :param compress: one cluster per chunk.
    :param progress: the job's progress meter, or None.
    :param skip_hole_zeroing: on the fast path, leave a target range that is
        already a hole alone instead of zeroing it (QEMU allocates zeroed
        blocks there; fleecing passes False to match QEMU's allocation).
    """

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        copy_bitmap: DirtyBitmap,
        *,
        cluster_size: int = DEFAULT_CLUSTER,
        max_chunk: int = 0,
        compress: bool = False,
        progress: ProgressSink | None = None,
        skip_hole_zeroing: bool = True,
    ) -> None:
        self.source = source
        self.compress = compress
        self.skip_hole_zeroing = skip_hole_zeroing
        self.target = target
        self.copy_bitmap = copy_bitmap
        self.bits = copy_bitmap.hbitmap
        self.cluster_size = cluster_size
        #: Bytes covered (the source length; the last cluster may be partial).
        self.len = copy_bitmap.size
        limit = cluster_size if compress else max(cluster_size, MAX_CHUNK)
        if max_chunk:
            limit = min(limit, max_chunk)
        #: Largest chunk in bytes.
        self.chunk_limit = limit
        self.progress = progress
        self.in_flight_bytes = 0
        self._in_flight: list[_Chunk] = []
        #: Cached block status: (write_gen, start, end, is_data) in source offsets.
        self._status_cache: tuple[int, int, int, bool] | None = None
        self._fast: tuple[FileView, FileView] | None = None
        self._fast_checked = False
        self._mapped: tuple[CopyEnd, CopyEnd] | None = None

    # ------------------------------------------------------------ accounting

    def _align_up(self, n: int) -> int:
        c = self.cluster_size
        return -(-n // c) * c

    def _update_remaining(self) -> None:
        if self.progress is not None:
            self.progress.set_remaining(self.bits.dirty_bytes() + self.in_flight_bytes)

    @property
    def dirty_bytes(self) -> int:
        """Bytes still to copy, cluster-rounded (not counting in-flight chunks)."""
        return self.bits.dirty_bytes()

    @property
    def busy(self) -> bool:
        """Some chunk is in flight."""
        return bool(self._in_flight)

    def _find(self, start: int, end: int) -> tuple[int, int] | None:
        """:return: the next chunk (claimable dirty run) in ``[start, end)``."""
        area = self.bits.next_dirty_area(start, end, self.chunk_limit)
        if area is None:
            return None
        offset, length = area
        return offset, min(self._align_up(length), self.chunk_limit)

    def _claim(self, offset: int, length: int) -> _Chunk:
        self.bits.reset(offset, min(length, self.len - offset))
        chunk = _Chunk(offset, length)
        self._in_flight.append(chunk)
        self.in_flight_bytes += length
        return chunk

    # ------------------------------------------------------------ one chunk

    @property
    def fast_path(self) -> bool:
        """Both ends are file windows: data chunks are copied file to file."""
        return self._fast_path() is not None

    @property
    def mapped_path(self) -> bool:
        """Data chunks are copied file to file through a qcow2 mapping."""
        return self._fast_path() is None and self._mapped_path() is not None

    def _fast_path(self) -> tuple[FileView, FileView] | None:
        if not self._fast_checked:
            src = file_view(self.source, for_write=False)
            dst = file_view(self.target, for_write=True)
            same = self.source.length == self.target.length  # else the bounds checks matter
            ok = src is not None and dst is not None and same and not self.compress
            self._fast = (src, dst) if ok and src is not None and dst is not None else None
            if self._fast is None and same and not self.compress:
                msrc = copy_end(self.source, for_write=False)
                mdst = copy_end(self.target, for_write=True)
                if msrc is not None and mdst is not None:
                    self._mapped = (msrc, mdst)
            self._fast_checked = True
        if self._fast is not None and self._fast[1].chain[0][0].has_hooks:
            return None  # someone hooked the target since
        return self._fast

    def _mapped_path(self) -> tuple[CopyEnd, CopyEnd] | None:
        """Both ends are files or qcow2 nodes over files, not both windows."""
        self._fast_path()
        m = self._mapped
        if m is None or m[1].node.has_hooks or m[1].data.chain[0][0].has_hooks:
            return None  # someone hooked the target since
        return m

    def _status_gen(self) -> int:
        """Write generation of the file behind the source (-1: none), the
        key of the cached block status."""
        fast = self._fast_path()
        if fast is not None:
            return fast[0].chain[-1][0].write_gen
        mapped = self._mapped_path()
        if mapped is not None:
            return mapped[0].data.chain[-1][0].write_gen
        return -1

    async def _block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """Block status at ``offset`` with spec 4.4 step 3's rounding."""
        gen = self._status_gen()
        cached = self._status_cache
        if gen >= 0 and cached is not None and cached[0] == gen and cached[1] <= offset < cached[2]:
            is_data, n = cached[3], min(cached[2] - offset, length)
        else:
            try:
                if gen >= 0:
                    is_data, n = await self.source.block_status(offset, self.len - offset)
                    self._status_cache = (gen, offset, offset + n, is_data)
                    n = min(n, length)
                else:
                    is_data, n = await self.source.block_status(offset, length)
            except BlockIOError:
                return True, self.cluster_size
        if n < self.cluster_size:
            return True, self.cluster_size
        if offset + n >= self.len:
            return is_data, self._align_up(n)
        return is_data, n - n % self.cluster_size

    async def _start_chunk(self, offset: int, length: int) -> tuple[_Chunk, bool]:
        """Claim a chunk, ask the block status and shrink the chunk to it.

        :return: the chunk and whether it is data (else a hole).
        """
        chunk = self._claim(offset, length)
        try:
            is_data, n = await self._block_status(chunk.start, chunk.length)
        except BaseException:
            self._end_chunk(chunk, False)
            raise
        if n < chunk.length:
            tail = chunk.start + n
            self.bits.set(tail, min(chunk.length - n, self.len - tail))
            self.in_flight_bytes -= chunk.length - n
            chunk.length = n
        return chunk, is_data

    def _end_chunk(self, chunk: _Chunk, ok: bool) -> None:
        self.in_flight_bytes -= chunk.length
        if ok:
            if self.progress is not None:
                self.progress.work_done(chunk.length)
        else:
            self.bits.set(chunk.start, min(chunk.length, self.len - chunk.start))
        self._in_flight.remove(chunk)
        chunk.done.set()
        self._update_remaining()

    async def _run_chunk(self, chunk: _Chunk, is_data: bool) -> CopyFailure | None:
        """Copy one started chunk; on failure give its bits back."""
        return await self._run_group([chunk], is_data)

    async def _run_group(self, group: list[_Chunk], is_data: bool) -> CopyFailure | None:
        """Copy started chunks that are contiguous and of one kind with one
        I/O request (one chunk except on the fast path).

        When the fast or mapped path fails, the chunks are redone with a
        separate read and write (per contiguous segment, then per chunk
        once a segment fails): that tells a failed read from a failed write
        (the kernel's copy_file_range errno cannot), and the chunks that do
        succeed count as done, so the job's offset is what was really
        written.
        """
        failure: CopyFailure | None = None
        ended: set[_Chunk] = set()
        try:
            start = group[0].start
            nbytes = min(group[-1].start + group[-1].length, self.len) - start
            if not is_data:
                try:
                    await self._write_zeroes(start, nbytes)
                except BlockIOError as exc:
                    failure = CopyFailure(exc, False)
            elif not await self._copy_fast(group):
                rest = await self._copy_mapped(group)
                for chunk in group:
                    if chunk not in rest:
                        self._end_chunk(chunk, True)
                        ended.add(chunk)
                for seg in self._segments(rest):
                    s0 = seg[0].start
                    n = min(seg[-1].start + seg[-1].length, self.len) - s0
                    failure = await self._copy_slow(s0, n)
                    if failure is not None and len(seg) > 1:
                        # Which chunks do succeed: one at a time, so the
                        # job's offset is what was really written; the
                        # segment's error stands even if all of them do.
                        first = failure
                        for chunk in seg:
                            failure = await self._copy_slow(
                                chunk.start, min(chunk.start + chunk.length, self.len) - chunk.start)
                            if failure is not None:
                                break
                            self._end_chunk(chunk, True)
                            ended.add(chunk)
                        failure = failure or first
                    if failure is not None:
                        break
                    for chunk in seg:
                        if chunk not in ended:
                            self._end_chunk(chunk, True)
                            ended.add(chunk)
            return failure
        finally:
            for chunk in group:
                if chunk not in ended:
                    self._end_chunk(chunk, failure is None)

    def _segments(self, group: list[_Chunk]) -> list[list[_Chunk]]:
        """Contiguous runs of ``group`` up to :data:`_SLOW_SEGMENT` bytes, one
        read and one write each on the node path (one chunk when
        compressing): a qcow2 target allocates the run at once and writes it
        as one extent, a qcow2 source reads it with one pread per host extent."""
        if self.compress:
            return [[c] for c in group]
        segs: list[list[_Chunk]] = []
        for c in group:
            if (segs and segs[-1][-1].start + segs[-1][-1].length == c.start
                    and c.start + c.length - segs[-1][0].start <= _SLOW_SEGMENT):
                segs[-1].append(c)
            else:
                segs.append([c])
        return segs

    async def _write_zeroes(self, offset: int, nbytes: int) -> None:
        """Zero a range of the target; on the fast path a range the target
        file already has as a hole is left alone (it reads as zeroes; QEMU
        would allocate zeroed blocks), with the write's side effects kept."""
        fast = self._fast_path()
        if fast is not None and self.skip_hole_zeroing:
            dst = fast[1]
            is_data, n = await dst.image.block_status(dst.base + offset, nbytes)
            if not is_data and n >= nbytes:
                await write_direct(dst, ((offset, nbytes),), _nothing)
                return
        await self.target.write_zeroes(offset, nbytes)

    async def _copy_fast(self, group: list[_Chunk]) -> bool:
        """Copy data chunks (contiguous or not) file to file in one pool job.

        :return: False when there is no fast path or it failed (the caller
            redoes the chunks through the nodes).
        """
        fast = self._fast_path()
        if fast is None:
            return False
        src, dst = fast
        ranges = self._ranges(group)
        mark_read(src, sum(n for _, n in ranges))
        try:
            if len(ranges) == 1:
                offset, n = ranges[0]
                await write_direct(dst, ranges, lambda: copy_range(
                    src.image, src.base + offset, dst.image, dst.base + offset, n))
            else:
                await write_direct(dst, ranges, lambda: copy_ranges(
                    src.image, src.base, dst.image, dst.base, ranges))
        except BlockIOError:
            return False
        return True

    async def _copy_mapped(self, group: list[_Chunk]) -> list[_Chunk]:
        """Copy data chunks file to file through qcow2 mappings (the mapped
        path; see the module docstring).

        :return: the chunks still to copy through the nodes: those the
            source does not hold as plain data clusters or whose target
            range is not cluster aligned; all of them when there is no
            mapped path or the copy failed.
        """
        mapped = self._mapped_path()
        if mapped is None:
            return group
        src, dst = mapped
        cs = dst.clusters.cluster_size if dst.clusters is not None else 1
        rest: list[_Chunk] = []
        done: list[_Chunk] = []
        src_ext: list[tuple[int, int, int]] = []
        try:
            for ch in group:
                n = min(ch.start + ch.length, self.len) - ch.start
                ext = None
                if not ch.start % cs and (not n % cs or ch.start + n == self.len):
                    ext = await src.extents(ch.start, n)
                if ext is None:
                    rest.append(ch)
                else:
                    done.append(ch)
                    src_ext += ext
            if not done:
                return group
            ranges = self._ranges(done)
            src.mark_read(sum(n for _, n in ranges))
            src_image, dst_image = src.data.image, dst.data.image
            sbase, dbase = src.data.base, dst.data.base

            async def fill(dst_ext: list[tuple[int, int, int]]) -> None:
                pairs = [(a + sbase, b + dbase, n) for a, b, n in pair_extents(src_ext, dst_ext)]
                await copy_pairs(src_image, dst_image, pairs)

            await write_end(dst, ranges, fill)
        except BlockIOError:
            return group
        return rest

    def _ranges(self, group: list[_Chunk]) -> list[tuple[int, int]]:
        """The chunks' byte ranges (clipped to the disk), contiguous ones merged."""
        ranges: list[tuple[int, int]] = []
        for ch in group:
            n = min(ch.start + ch.length, self.len) - ch.start
            if ranges and ranges[-1][0] + ranges[-1][1] == ch.start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((ch.start, n))
        return ranges

    async def _copy_slow(self, offset: int, nbytes: int) -> CopyFailure | None:
        """Read from the source node, then write to the target node."""
        try:
            data = await self.source.read(offset, nbytes)
        except BlockIOError as exc:
            return CopyFailure(exc, True)
        compressed = getattr(self.target.driver, "pwrite_compressed", None) if self.compress else None
        try:
            if compressed is not None:
                await self.target.write_around([(offset, nbytes)], lambda: compressed(offset, data))
            else:
                await self.target.write(offset, data)
        except BlockIOError as exc:
            return CopyFailure(exc, False)
        return None

    # ------------------------------------------------------------ background

    async def run(
        self,
        *,
        max_workers: int = 64,
        throttle: Callable[[int], Awaitable[None]] | None = None,
        batch: bool = False,
    ) -> CopyFailure | None:
        """Copy until the copy bitmap is clean (passes from offset 0).

        Before each chunk, ``await throttle(nbytes)`` (the job's pause point
        and rate limiter) runs; whatever it raises (e.g. ``JobCancelled``)
        propagates once the chunks in flight have ended.

        ``batch`` (only when no rate limit applies; ignored with one
        worker): on the fast path, up to 32 contiguous chunks of one kind
        are claimed together (one throttle call) and copied with one I/O
        request.  They stay separate chunks for the bitmap and progress.

        :return: None when everything was copied, else the first failure of
            the pass (its chunk is dirty again; no new chunk was started).
        """
        while True:
            failure = await self._pass(max_workers, throttle, batch)
            if failure is not None:
                return failure
            if self._in_flight:
                # Chunks of copy-before-write may still fail and re-dirty.
                await asyncio.gather(*(c.done.wait() for c in list(self._in_flight)))
                continue
            if self.bits.is_empty():
                return None

    async def _pass(
        self, max_workers: int, throttle: Callable[[int], Awaitable[None]] | None, batch: bool
    ) -> CopyFailure | None:
        cursor = 0
        tasks: set[asyncio.Task[CopyFailure | None]] = set()
        weight: dict[asyncio.Task[CopyFailure | None], int] = {}
        # Chunk workers live only for this call: awaited in ``finally``.
        workers = TaskGroup("block-copy", log_failures=False)
        first: CopyFailure | None = None
        try:
            while first is None:
                area = self._find(cursor, self.len)
                if area is None:
                    break
                if throttle is not None:
                    await throttle(area[1])
                    area = self._find(cursor, self.len)
                    if area is None:
                        break
                chunk, is_data = await self._start_chunk(*area)
                cursor = chunk.start + chunk.length
                if max_workers == 1:
                    first = await self._run_chunk(chunk, is_data)
                    continue
                group = [chunk]
                mapped = self._fast_path() is None and self._mapped_path() is not None
                fast = mapped or self._fast_path() is not None
                # Node path: contiguous data chunks up to _SLOW_SEGMENT as one
                # read and one write, weighted by chunk count (memory bound).
                limit = _BATCH if fast else max(1, _SLOW_SEGMENT // self.chunk_limit)
                cap = self.len
                if mapped and is_data:
                    limit, cap = _MAPPED_BATCH, _MAPPED_BYTES
                nbytes = chunk.length
                if batch and (fast or (is_data and not self.compress)):
                    while len(group) < limit and nbytes < cap and (
                            nxt := self._find(cursor, self.len)) is not None:
                        if (nxt[0] != cursor and (not is_data or not fast)) or (
                            (await self._block_status(*nxt))[0] != is_data
                        ):
                            break
                        more, _ = await self._start_chunk(*nxt)
                        group.append(more)
                        cursor = more.start + more.length
                        nbytes += more.length
                task = workers.spawn(self._run_group(group, is_data), name="block-copy")
                tasks.add(task)
                weight[task] = self._weight(group)
                if sum(weight[t] for t in tasks) >= max_workers:
                    done, tasks_left = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    tasks = set(tasks_left)
                    for t in done:
                        weight.pop(t, None)
                    first = first or _first_failure(done)
        finally:
            if tasks:
                done, _ = await asyncio.wait(tasks)
                first = first or _first_failure(done)
        return first

    def _weight(self, group: list[_Chunk]) -> int:
        """How many of ``max-workers`` a group takes: 1 on the fast path
        (no buffers); otherwise the buffers a node-path copy of it may hold
        at once (one segment, see :meth:`_segments`) in chunks, so buffer
        memory stays at QEMU's bound even when the mapped path falls back."""
        if self._fast_path() is not None:
            return 1
        if self._mapped_path() is None:
            return len(group)
        nbytes = sum(c.length for c in group)
        return max(1, min(nbytes, _SLOW_SEGMENT) // self.chunk_limit)

    async def drain(self) -> None:
        """Wait until no chunk is in flight (a pausing job's last work)."""
        while self._in_flight:
            await asyncio.gather(*(c.done.wait() for c in list(self._in_flight)))

    # ------------------------------------------------------------ copy-before-write

    async def copy_range(self, offset: int, length: int) -> None:
        """Copy the still-dirty clusters touching ``[offset, offset+length)``
        before a write lands there (copy-before-write; no rate limit).

        Waits for chunks already in flight in the range; chunks of the range
        run concurrently.

        :raise BlockIOError: a chunk failed (its bits are dirty again).
        """
        c = self.cluster_size
        start = offset - offset % c
        end = min(self._align_up(offset + length), self._align_up(self.len))
        while True:
            busy = [ch for ch in self._in_flight if ch.start < end and start < ch.start + ch.length]
            if busy:
                await asyncio.gather(*(ch.done.wait() for ch in busy))
                continue
            started: list[tuple[_Chunk, bool]] = []
            cursor = start
            try:
                while (area := self._find(cursor, min(end, self.len))) is not None:
                    chunk, is_data = await self._start_chunk(*area)
                    started.append((chunk, is_data))
                    cursor = chunk.start + chunk.length
            finally:
                results = await asyncio.gather(*(self._run_chunk(ch, d) for ch, d in started))
            if not started:
                return
            for failure in results:
                if failure is not None:
                    raise failure.error


async def _nothing() -> None:
    """The I/O of a zero write onto a range that already reads as zeroes."""


def _first_failure(done: set[asyncio.Task[CopyFailure | None]]) -> CopyFailure | None:
    """:return: a failure among finished chunk tasks (re-raising any crash)."""
    for task in done:
        if (failure := task.result()) is not None:
            return failure
    return None
