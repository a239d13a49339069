"""Persistent bitmaps of raw images, kept crash-consistent in a state directory.

:class:`BitmapStateDir` is ``--state-dir``: it gives each raw node over a
``file`` node a :class:`NodeJournal`, which loads the node's persistent
bitmaps when the node opens, stores them when it closes (blockdev-del,
``quit``, SIGTERM) and, in between, dirties ahead of every write
(``qmpd.bitmap.journal`` has the format and the rules)::

    state = BitmapStateDir("/var/lib/qmpd")
    graph = BlockGraph(bitmap_state=state)
    node = await graph.add({...raw over file...})   # bitmaps loaded, journal attached
    node.bitmaps.add("b0", persistent=True)
    await state.sync([node])                        # metadata durable now
    await node.write(0, data)   # coarse bit 0 durable before the data lands

Write-ahead: :meth:`NodeJournal.before_write` returns at once when the
covering coarse bits are durable; otherwise the first waiter becomes the
leader, writes every requested bit and runs one ``fdatasync``, and every
write that asked meanwhile is released by it or by the next leader (group
commit).  Fine bits reach a new snapshot lazily (``flush_interval`` after
the first write since the last one), which then resets the coarse bits no
running write needs.  Clearing bits (``block-dirty-bitmap-clear``, a backup
that succeeded) only makes the in-memory bitmap smaller than the stored
one: no sync is needed before the reply.

Writes behind qmpd's back after a crash: before a write reaches the image
the journal holds a *write lease* in the write-intent file (renewed with a
plain pwrite every half second or so while writing, released with the
image's stat by a lazy store that finds nothing in flight); at the next
open an image stamped after the lease, or changed since the release, gets
its bitmaps inconsistent (``judge_lease``).  For qcow2 the image is judged
as its file node found it at open, before the driver wrote its header.

Hook for other formats: a node whose format stores bitmaps itself (qcow2)
can still use a NodeJournal as its crash journal: attach it with
:meth:`BitmapStateDir.attach` ``(node, image_path)`` and, at open, recover
from :func:`qmpd.bitmap.journal.recover` the bitmaps its image marks
in-use/inconsistent; the format keeps writing its own bitmaps at close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from bitarray import bitarray

from qmpd.bitmap.journal import (
    DEFAULT_COARSE_SHIFT,
    LEASE_OFFSET,
    BitmapRecord,
    ImageIdentity,
    JournalFormatError,
    Lease,
    Snapshot,
    WriteIntent,
    WriteLease,
    decode_intent,
    decode_lease,
    decode_snapshot,
    encode_intent,
    encode_lease,
    encode_snapshot,
    judge_lease,
    recover,
    state_file_stem,
)
from qmpd.block.errors import BlockIOError
from qmpd.tasks import TaskGroup
from qmpd.block.io import (
    IOPool,
    StateFile,
    make_private_dir,
    open_state_file,
    read_state_file,
    real_path,
    remove_state_file,
    replace_file_durably,
    stat_path,
)

if TYPE_CHECKING:
    from qmpd.bitmap.dirty import DirtyBitmap
    from qmpd.bitmap.hbitmap import HBitmap
    from qmpd.block.node import BlockNode

__all__ = ["BitmapStateDir", "NodeJournal", "image_path_of", "qcow2_image_of"]

log = logging.getLogger(__name__)

#: Seconds a write lease reaches ahead: the longest a foreign write right
#: after a crash during writes can go unseen, and (three quarters of it)
#: the longest qmpd's own write may wait between its lease check and the
#: kernel without making a recovery after a crash needlessly strict.
WRITE_LEASE = 2.0


def _identity(st: os.stat_result) -> ImageIdentity:
    return ImageIdentity(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino)


def _opened_identity(node: BlockNode) -> ImageIdentity | None:
    """:return: the image file as it was when its file node opened, before
    qmpd wrote anything (a qcow2 driver writes its header at open)."""
    child = node.children.get("file")
    window = child.driver.file_window() if child is not None else None
    st = window.image.opened_stat if window is not None and window.image is not None else None
    return _identity(st) if st is not None else None


def image_path_of(node: BlockNode) -> str | None:
    """:return: the image file of a format node whose bytes are a window of
    its ``file`` child's file (raw over file): the nodes whose persistent
    bitmaps live in the state directory.  A format that stores bitmaps in
    the image itself (qcow2) has no file window and is not matched."""
    if not node.driver.is_format or node.driver.file_window() is None:
        return None
    return _file_child_image(node)


def qcow2_image_of(node: BlockNode) -> str | None:
    """:return: the image file of a format node that keeps its bytes and
    bitmaps in its own layout (qcow2) over a file node: its bitmaps
    stay in the image (written by the driver, as QEMU does) and are also
    journaled here, so that after a crash the ones left ``in_use`` are
    recovered instead of being loaded inconsistent."""
    if not node.driver.is_format or node.driver.file_window() is not None:
        return None
    return _file_child_image(node)


def _file_child_image(node: BlockNode) -> str | None:
    """:return: the image file of ``node``'s ``file`` child, when that child
    is a plain file window over an opened image."""
    child = node.children.get("file")
    if child is None:
        return None
    window = child.driver.file_window()
    if window is None or window.image is None:
        return None
    return child.driver.filename


class NodeJournal:
    """The persistent bitmaps of one node: load, store, write-ahead dirtying."""

    def __init__(self, owner: BitmapStateDir, node: BlockNode, image: str, stem: str,
                 *, in_image: bool = False) -> None:
        self.owner = owner
        #: The bitmaps live in the image too (qcow2): the driver loads and
        #: stores them; the journal only recovers the ones left in use.
        self.in_image = in_image
        #: ``--state-keep-transient-bitmaps`` (raw only): bitmaps added with
        #: ``persistent: false`` are journaled too, and reloaded as such.
        self.keep_transient = owner.keep_transient and not in_image
        #: A read-only node: bitmaps are loaded ``readonly`` and never stored.
        self.read_only = node.read_only
        self.node = node
        #: Real path of the image file.
        self.image = image
        self.snap_path = os.path.join(owner.path, stem + ".qbm")
        self.intent_path = os.path.join(owner.path, stem + ".qwi")
        self.intent = WriteIntent(node.length, owner.coarse_shift)
        #: The write lease (qmpd.bitmap.journal): held while writing.
        self.lease = WriteLease(int(owner.write_lease * 1e9))
        self._renewing: asyncio.Future[None] | None = None
        self._lease_sync: asyncio.Task[None] | None = None
        #: Some persistent bitmap exists: writes wait for their coarse bits.
        self.active = False
        self.sequence = 0
        self._file: StateFile | None = None
        self._io_lock = asyncio.Lock()
        self._store_lock = asyncio.Lock()
        self._leader: asyncio.Future[None] | None = None
        self._fine_dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        #: Names of the bitmaps loaded at open, in stored (directory) order.
        self._order: list[str] = []
        #: Syncs of the write-intent layer so far (group commits), for tests/bench.
        self.intent_syncs = 0

    # ------------------------------------------------------------ write path

    async def before_write(self, offset: int, length: int) -> None:
        """Make the coarse bits covering the range durable (write-ahead).

        :raise BlockIOError: the state file could not be written (the write
            then fails without reaching the image).
        """
        need = self.intent.begin(offset, length)
        if not self.active or not need and not self.lease.due(time.time_ns()):
            return
        try:
            if self.lease.due(time.time_ns()):
                await self._renew_lease()  # the group commit below syncs it too
            if need:
                await self._make_durable(need)
            # Again right before the write if the sync took long: the write
            # must stamp the image within the lease.
            if self.lease.due(time.time_ns()):
                await self._renew_lease()
        except BaseException:
            self.intent.end(offset, length)
            raise

    def after_write(self, offset: int, length: int) -> None:
        """The write counted by :meth:`before_write` is over; its fine bits
        are in memory now (a lazy store will write them)."""
        self.intent.end(offset, length)
        if self.active:
            self._fine_dirty = True
            self._schedule_flush()
            # Writes still queued (behind a qcow2 allocation, in the pool)
            # keep the lease fresh, so that their stamps stay inside it.
            if (self.intent.writes_in_flight and self._renewing is None and not self._closed
                    and not self.owner.tasks.closed and self.lease.due(time.time_ns())):
                self.owner.tasks.spawn(self._renew_quietly(), name="bitmap-lease")

    async def _renew_lease(self) -> None:
        """Record a held lease reaching ``write_lease`` ahead: one pwrite,
        which is all a crash of qmpd needs (the page cache survives it); an
        fdatasync follows in the background, not awaited by any write (a
        power cut before it leaves an older lease on disk, which only makes
        the recovery stricter).  Concurrent writers share one renewal."""
        if self._renewing is not None:
            # Its lease was taken at most one pwrite before this write asked.
            await asyncio.shield(self._renewing)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._renewing = fut
        try:
            async with self._io_lock:
                lease = self.lease.renewed(time.time_ns())
                assert self._file is not None
                await self._file.write(LEASE_OFFSET, encode_lease(lease))
                self.lease.current = lease
        finally:
            self._renewing = None
            fut.set_result(None)
        if self._lease_sync is None and not self._closed and not self.owner.tasks.closed:
            self._lease_sync = self.owner.tasks.spawn(self._sync_lease(), name="bitmap-lease-sync")

    async def _sync_lease(self) -> None:
        try:
            if self._file is not None:
                await self._file.flush()
        except (BlockIOError, OSError) as exc:
            log.error("cannot sync the write lease of %s in %s: %s", self.image, self.owner.path, exc)
        finally:
            self._lease_sync = None

    async def _renew_quietly(self) -> None:
        try:
            if self._file is not None and self.lease.due(time.time_ns()):
                await self._renew_lease()
        except BlockIOError as exc:
            log.error("cannot renew the write lease of %s in %s: %s", self.image, self.owner.path, exc)

    async def _lease_for_store(self) -> Lease:
        """:return: the lease a store records (under ``_io_lock``): released
        with the image's identity when no write is in flight, else held."""
        now = time.time_ns()
        if self.intent.writes_in_flight:
            lease = self.lease.renewed(now)
        else:
            # Writes beginning from here renew first (and wait for the lock).
            self.lease.current = Lease(False, now)
            ident = _identity(await stat_path(self.image, pool=self.owner.pool))
            lease = self.lease.released(now, ident)
        self.lease.current = lease
        return lease

    async def _make_durable(self, bits: list[int]) -> None:
        intent = self.intent
        while not intent.all_durable(bits):
            intent.request(bits)
            if self._leader is not None:
                await asyncio.shield(self._leader)
                continue
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._leader = fut
            try:
                async with self._io_lock:
                    batch = intent.take_pending()
                    if batch:
                        offset, data = intent.byte_span(batch)
                        assert self._file is not None
                        await self._file.write_durable(offset, data)
                        self.intent_syncs += 1
                        intent.mark_durable(batch)
            finally:
                self._leader = None
                fut.set_result(None)

    # ------------------------------------------------------------ snapshots

    def _records(self) -> list[BitmapRecord]:
        """The persistent bitmaps in stored order, which is QEMU's qcow2
        bitmap-directory order: the bitmaps loaded at open keep their place,
        the others follow in list order (newest first), as QEMU writes the
        directory at close; loading adds them in that order, each in front,
        so a reload lists them as QEMU does."""
        named = {bm.name: bm for bm in self.node.bitmaps if bm.name is not None and self._journaled(bm)}
        self._order = [n for n in self._order if n in named]  # as QEMU drops a removed one
        order = self._order + [n for n in named if n not in self._order]
        out = []
        for name in order:
            bm = named[name]
            hb = bm.hbitmap
            if bm.successor is not None:
                hb = hb.copy()
                hb.merge_from(bm.successor.hbitmap)
            out.append(BitmapRecord(name, bm.granularity, bm.size, bm.recording,
                                    bm.inconsistent, hb.to_bytes_le(), not bm.persistent))
        return out

    async def store(self, *, clean: bool = False) -> None:
        """Write a new snapshot of the persistent bitmaps, durably, then reset
        the write-intent bits it covers.  ``clean``: the node is closing
        (records the image's identity for the check at the next open).

        :raise BlockIOError: the state directory could not be written.
        """
        if self.read_only:
            return
        async with self._store_lock:
            records = self._records()
            if records and self._file is None:
                # The first persistent bitmap of this image: a fresh layer.
                self._file = await open_state_file(self.intent_path, pool=self.owner.pool)
                lease = self.lease.current = self.lease.renewed(time.time_ns())
                await self._file.write_durable(0, encode_intent(self.intent.size, self.intent.shift,
                                                                lease=lease))
            if records and not self.active:
                # Writes already running began without waiting: make their
                # bits durable before the snapshot that makes them matter.
                self.active = True
                running = self.intent.running_bits()
                if running:
                    await self._make_durable(running)
            self.active = bool(records)
            if not records and not clean and self.sequence == 0:
                return
            if clean and not records:
                await remove_state_file(self.snap_path, pool=self.owner.pool)
                await remove_state_file(self.intent_path, pool=self.owner.pool)
                return
            records = self._records()  # no await from here to capture()
            self.intent.capture()
            self._fine_dirty = False
            ident = _identity(await stat_path(self.image, pool=self.owner.pool))
            self.sequence += 1
            snap = Snapshot(self.image, ident, clean, self.sequence, self.intent.shift, records)
            await replace_file_durably(self.snap_path, encode_snapshot(snap), pool=self.owner.pool)
            async with self._io_lock:
                mask = self.intent.reset_mask()
                if self._file is not None and not clean:
                    lease = await self._lease_for_store()
                    await self._file.write_durable(0, encode_intent(self.intent.size, self.intent.shift,
                                                                    mask, lease))

    @property
    def flush_scheduled(self) -> bool:
        """A lazy store is due or running."""
        return self._timer is not None or self._flusher is not None

    def _schedule_flush(self) -> None:
        if self._timer is None and self._flusher is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.owner.flush_interval, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        # After the daemon's tasks were shut down, close() does the last store.
        if not self._closed and not self.owner.tasks.closed:
            self._flusher = self.owner.tasks.spawn(self._flush(), name="bitmap-flush")

    async def _flush(self) -> None:
        try:
            await self.store()
        except BlockIOError as exc:
            log.error("cannot store the bitmaps of %s in %s: %s", self.image, self.owner.path, exc)
        finally:
            self._flusher = None
        if self._fine_dirty:
            self._schedule_flush()

    # ------------------------------------------------------------ open/close

    async def open(self) -> None:
        """Load the stored bitmaps into the node and start the journal.

        A snapshot of another file (device/inode differ), an image changed
        after a clean close (size, mtime or ctime differ), a missing or
        corrupt write-intent layer after a crash: the bitmaps are loaded
        but marked inconsistent, with one warning in the log.

        :raise BlockIOError: the state directory could not be read or written.
        """
        data = await read_state_file(self.snap_path, pool=self.owner.pool)
        current = _identity(await stat_path(self.image, pool=self.owner.pool))
        if data is None:
            if self.in_image and not self.read_only and any(bm.persistent for bm in self.node.bitmaps):
                await self.store()  # a qcow2's bitmaps, first seen with a state directory
            return  # no files until a persistent bitmap is added
        if not self.read_only:
            self._file = await open_state_file(self.intent_path, pool=self.owner.pool)
        try:
            snap = decode_snapshot(data)
        except JournalFormatError as exc:
            log.error("bitmaps of %s: %s is unreadable (%s); its bitmaps are lost",
                      self.image, self.snap_path, exc)
            return
        self.sequence = snap.sequence
        if self.in_image:
            await self._open_in_image(snap, current)
            return
        reason = None
        if not snap.identity.same_file(current):
            reason = "the image file was replaced (device or inode differ)"
        elif snap.identity.size != current.size:
            reason = f"the image size changed from {snap.identity.size} to {current.size}"
        elif snap.clean and not snap.identity.unchanged(current):
            reason = "the image was modified while qmpd did not have it open (mtime/ctime differ)"
        intent_bits = None
        if reason is None and not snap.clean:
            intent_bits, reason = await self._load_intent(snap, current)
        recovered = recover(snap, intent_bits, snap.coarse_shift) if reason is None else None
        size = self.node.bitmaps.size
        self._order = []
        dropped = []
        for i, rec in enumerate(snap.records):
            bad = reason is not None or rec.inconsistent or rec.size != size
            if rec.transient and (bad or not self.keep_transient):
                # Inconsistent is for persistent bitmaps (as in QEMU): a kept
                # transient one that cannot be trusted is gone, as after a
                # restart without the option.
                dropped.append(rec.name)
                continue
            self._order.append(rec.name)
            bm = self.node.bitmaps.add(rec.name, rec.granularity, persistent=not rec.transient,
                                       disabled=bad or not rec.recording)
            bm.inconsistent = bad
            bm.readonly = self.read_only
            if not bad and recovered is not None:
                bm.hbitmap.merge_from(recovered[i])
        bad_names = [r.name for r in snap.records if not r.transient]
        if reason is not None and bad_names:
            log.warning("persistent bitmaps of %s (%s) marked inconsistent: %s",
                        self.image, ", ".join(bad_names), reason)
        if dropped:
            log.warning("transient bitmaps of %s (%s) dropped: %s", self.image, ", ".join(dropped),
                        reason or "--state-keep-transient-bitmaps is off")
        if reason is None and not snap.clean:
            log.info("bitmaps of %s recovered from the journal after an unclean stop", self.image)
        if self.read_only:
            return
        self.active = any(self._journaled(bm) for bm in self.node.bitmaps)
        if snap.clean or reason is not None:
            # Clear the CLEAN flag before the first write (and keep the
            # verdict).  After a crash the stored state stays valid as it is
            # (old snapshot + coarse bits); the next lazy store folds it in.
            await self.store()

    def _journaled(self, bm: DirtyBitmap) -> bool:
        return bm.name is not None and (bm.persistent or self.keep_transient)

    async def _load_intent(self, snap: Snapshot, current: ImageIdentity
                           ) -> tuple[bitarray | None, str | None]:
        """Read the write-intent layer after an unclean stop and make it the
        durable one; judge by its write lease whether someone else wrote the
        image since (``current``: the image before this run wrote it).

        :return: ``(bits, None)``, or ``(None, why)`` when it is missing or
            of another layout, or the image was written behind qmpd's back."""
        idata = await read_state_file(self.intent_path, pool=self.owner.pool)
        try:
            if not idata:
                raise JournalFormatError("write-intent layer missing")
            _isize, ishift, intent_bits = decode_intent(idata)
            if ishift != snap.coarse_shift or len(intent_bits) != self.intent.nbits:
                raise JournalFormatError("write-intent layer of another layout")
        except JournalFormatError as exc:
            return None, f"it was not closed cleanly and {exc}"
        lease = decode_lease(idata)
        self.lease.current = lease
        why = judge_lease(lease, current, snap.identity)
        if why is not None:
            return None, why
        self.intent.load_durable(intent_bits)
        return intent_bits, None

    async def _open_in_image(self, snap: Snapshot, current: ImageIdentity) -> None:
        """qcow2: the driver has loaded the image's bitmaps, those left
        ``in_use`` by a crash as inconsistent.  After an unclean stop of this
        daemon on this very file, each of them that the journal holds (same
        name, granularity and size) gets the image's bits OR the journal's
        and is consistent again; a journaled bitmap the image never got (added
        after the last clean close) is added.  A clean snapshot means the
        image itself is authoritative: in-use bitmaps then stay inconsistent,
        as in QEMU."""
        size = self.node.bitmaps.size
        recovered: list[HBitmap] | None = None
        intent_bits = None
        reason = None
        if snap.clean:
            reason = "the journal was closed cleanly"
        elif not snap.identity.same_file(current):
            reason = "the image file was replaced (device or inode differ)"
        else:
            before = _opened_identity(self.node) or current
            intent_bits, reason = await self._load_intent(snap, before)
        if reason is None:
            recovered = recover(snap, intent_bits, snap.coarse_shift)
        present = {bm.name: bm for bm in self.node.bitmaps if bm.name is not None}
        done = []
        if recovered is not None:
            for i, rec in enumerate(snap.records):
                if rec.inconsistent or rec.size != size:
                    continue
                bm = present.get(rec.name)
                if bm is None:
                    bm = self.node.bitmaps.add(rec.name, rec.granularity, persistent=True,
                                               disabled=not rec.recording)
                elif not bm.inconsistent or bm.granularity != rec.granularity:
                    continue
                bm.inconsistent = False
                bm.disabled = not rec.recording
                bm.hbitmap.merge_from(recovered[i])
                done.append(rec.name)
        if done:
            log.info("qcow2 bitmaps of %s (%s) recovered from the journal after an unclean stop",
                     self.image, ", ".join(done))
        elif reason is not None and any(bm.inconsistent for bm in self.node.bitmaps):
            if snap.clean:
                log.info("in-use qcow2 bitmaps of %s not recovered: %s", self.image, reason)
            else:
                log.warning("qcow2 bitmaps of %s (%s) left inconsistent: %s", self.image,
                            ", ".join(bm.name or "" for bm in self.node.bitmaps if bm.inconsistent),
                            reason)
        self._order = []
        if self.read_only:
            return
        self.active = any(self._journaled(bm) for bm in self.node.bitmaps)
        await self.store()

    def drop(self) -> None:
        """Stop without storing (the node left the graph synchronously)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flusher is not None:
            self._flusher.cancel()
        if self._lease_sync is not None:
            self._lease_sync.cancel()
        if self._file is not None:
            self._file.close()
            self._file = None

    async def close(self) -> None:
        """Store the bitmaps with the clean-close record and stop."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flusher is not None:
            await asyncio.wait([self._flusher])
        if self._lease_sync is not None:
            await asyncio.wait([self._lease_sync])
        if self.read_only:
            return
        try:
            await self.store(clean=True)
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None


class BitmapStateDir:
    """``--state-dir``: where raw images' persistent bitmaps are journaled.

    :param path: the directory (created with mode 0700 if missing).
    :param flush_interval: seconds between a write and the lazy store of the
        fine bits.
    :param coarse_shift: log2 of the bytes per write-intent bit.
    :param write_lease: seconds a write lease reaches ahead (:data:`WRITE_LEASE`).
    :param keep_transient: keep raw nodes' ``persistent: false`` bitmaps too.
    """

    def __init__(self, path: str, *, flush_interval: float = 5.0,
                 coarse_shift: int = DEFAULT_COARSE_SHIFT, tasks: TaskGroup | None = None,
                 pool: IOPool | None = None, write_lease: float = WRITE_LEASE,
                 keep_transient: bool = False) -> None:
        self.path = path
        #: ``--state-keep-transient-bitmaps``: raw nodes' bitmaps added with
        #: ``persistent: false`` are kept too (listed ``persistent: false``).
        self.keep_transient = keep_transient
        #: Seconds a write lease reaches ahead (qmpd.bitmap.journal.WriteLease).
        self.write_lease = write_lease
        #: The worker threads of the state files (the daemon's; None: shared).
        self.pool = pool
        #: Where the lazy stores run (the daemon's group, or one of its own).
        self.tasks = tasks if tasks is not None else TaskGroup("bitmap-state")
        self.flush_interval = flush_interval
        self.coarse_shift = coarse_shift
        self._ready = False
        self._by_stem: dict[str, NodeJournal] = {}
        self._by_node: dict[int, NodeJournal] = {}

    async def prepare(self) -> None:
        """Create the directory (idempotent).  :raise BlockIOError: cannot."""
        if not self._ready:
            self.path = await make_private_dir(self.path, pool=self.pool)
            self._ready = True

    def journal_of(self, node: BlockNode) -> NodeJournal | None:
        """:return: the node's journal, if it has one."""
        return self._by_node.get(id(node))

    async def attach(self, node: BlockNode, image: str | None = None) -> NodeJournal | None:
        """Give ``node`` a journal if it is a raw node over a file (or
        ``image`` is given), load its bitmaps and let it accept
        ``persistent: true``.  A read-only node gets its stored bitmaps
        ``readonly`` (refused by clear, merge into and remove, as QEMU does
        for a read-only qcow2) and stores nothing.  State-directory errors
        are logged; the node then stays without persistence.

        :return: the journal, or None.
        """
        image = image or image_path_of(node)
        in_image = False
        if image is None:
            image = qcow2_image_of(node)
            in_image = image is not None
        if image is None:
            return None
        try:
            await self.prepare()
            real = await real_path(image, pool=self.pool)
            stem = state_file_stem(real)
            if stem in self._by_stem:
                log.warning("%s is open twice; only node '%s' keeps persistent bitmaps",
                            real, self._by_stem[stem].node.node_name)
                return None
            journal = NodeJournal(self, node, real, stem, in_image=in_image)
            self._by_stem[stem] = journal
            self._by_node[id(node)] = journal
            node.bitmaps.can_store_persistent = True
            await journal.open()
        except BlockIOError as exc:
            log.error("state directory %s unusable for %s: %s", self.path, image, exc)
            node.bitmaps.can_store_persistent = False
            self._forget(node)
            return None
        if journal.read_only:
            # Loaded ``readonly`` as QEMU loads a read-only qcow2's bitmaps;
            # nothing is ever stored from this node.
            node.bitmaps.can_store_persistent = False
            return journal
        node.write_ahead = journal
        return journal

    def _forget(self, node: BlockNode) -> NodeJournal | None:
        journal = self._by_node.pop(id(node), None)
        if journal is not None:
            self._by_stem = {k: v for k, v in self._by_stem.items() if v is not journal}
        return journal

    async def detach(self, node: BlockNode) -> None:
        """Store the node's bitmaps with the clean-close record (blockdev-del,
        quit, SIGTERM) and drop its journal.  Errors are logged."""
        journal = self._forget(node)
        if journal is None:
            return
        node.write_ahead = None
        try:
            await journal.close()
        except BlockIOError as exc:
            log.error("cannot store the bitmaps of %s in %s: %s", journal.image, self.path, exc)

    def drop(self, node: BlockNode) -> None:
        """Forget the node's journal without storing (a node the daemon
        opened for itself and drops synchronously, e.g. drive-backup's
        target; it never has persistent bitmaps)."""
        journal = self._forget(node)
        if journal is not None:
            node.write_ahead = None
            if journal.active:
                log.warning("bitmaps of %s not stored: node '%s' dropped", journal.image, node.node_name)
            journal.drop()

    async def sync(self, nodes: list[BlockNode] | None = None) -> None:
        """Store now the bitmaps of ``nodes`` (default: every journaled node),
        e.g. after a bitmap was added, removed, enabled, disabled or merged.

        :raise BlockIOError: the state directory could not be written.
        """
        targets = self._by_node.values() if nodes is None else [
            j for j in (self._by_node.get(id(n)) for n in nodes) if j is not None]
        for journal in list(targets):
            await journal.store()
