"""The backup job (spec 4.3-4.7).

A :class:`BackupJob` is built, checked and wired by
:func:`qmpd.jobs.backup_setup.create_backup`; by the time it runs it has a
:class:`~qmpd.block.copy.BlockCopy` (the copy bitmap and progress) and a
copy-before-write filter above its source.

``run()`` is the background loop of QEMU's ``backup_loop``: a block-copy
call over the whole disk; on failure the error policy (``on-source-error``
for a failed read, ``on-target-error`` for a failed write) decides between
failing the job, stopping (user-paused, ``io-status`` set) and retrying, and
a retry starts a new pass.  ``sync: none`` copies nothing in the background
and waits to be cancelled (copy-before-write does the copying).

Finalisation of the sync bitmap (spec 4.7)::

    sync_it = (success or mode == always) and mode != never
    sync_it -> abdicate (the successor takes the name), else reclaim
    failure and mode == always -> bitmap |= copy bitmap (clusters not copied)

A job that never started (a transaction rolled back) always reclaims: the
bitmap is left exactly as before the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qmpd.bitmap import DirtyBitmap
from qmpd.block import BlockGraph, BlockNode
from qmpd.block.copy import BlockCopy
from qmpd.block.drivers.cbw import remove_filter
from qmpd.jobs.job import Job
from qmpd.jobs.status import ErrorAction, JobType, OnError

__all__ = ["BackupJob", "BLOCKER_REASON"]

logger = logging.getLogger(__name__)

#: Op-blocker text on a backup's target and filter (spec 4.1 step 5.3).
BLOCKER_REASON = "block device is in use by block job: backup"


class BackupJob(Job):
    """One backup; see the module docstring.

    :param sync: ``full``, ``top``, ``none`` or ``bitmap`` (``incremental``
        already turned into ``bitmap`` + ``on-success``).
    :param bitmap: the sync bitmap (frozen by the setup), or None.
    :param bitmap_mode: ``on-success``, ``never`` or ``always`` with a bitmap.
    """

    job_type = JobType.BACKUP

    def __init__(
        self,
        job_id: str,
        *,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        sync: str,
        bitmap: DirtyBitmap | None = None,
        bitmap_mode: str | None = None,
        max_workers: int = 64,
        on_source_error: OnError = OnError.REPORT,
        on_target_error: OnError = OnError.REPORT,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
    ) -> None:
        super().__init__(job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, speed=speed)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.sync_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.max_workers = max_workers
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        #: Set by the setup once the filter is in place.
        self.copy: BlockCopy | None = None
        self.filter: BlockNode | None = None
        #: Extra clean-up (drive-backup closes its target), run by clean().
        self.cleanups: list[Callable[[], None]] = []
        #: Flush the target after a successful copy (drive-backup's own target).
        self.flush_target = False
        self._blocked: list[BlockNode] = []
        self._cleaned = False

    # ------------------------------------------------------------ wiring

    def block(self, *nodes: BlockNode) -> None:
        """Put the backup op blocker on ``nodes`` until clean-up."""
        for node in nodes:
            node.add_blocker(BLOCKER_REASON)
            self._blocked.append(node)

    # ------------------------------------------------------------ work

    def block_nodes(self) -> tuple[object, ...]:
        return tuple(n for n in (self.source, self.target, self.filter) if n is not None)

    @property
    def ends_when_entered(self) -> bool:
        return self.sync == "none"

    async def drain_hook(self) -> None:
        if self.copy is not None:
            await self.copy.drain()

    async def run(self) -> None:
        copy = self.copy
        assert copy is not None, "backup job started without its block-copy state"
        if self.sync == "none":
            while True:
                await self.job_yield()
        while True:
            failure = await copy.run(max_workers=self.max_workers, throttle=self.throttle,
                                     batch=self.speed == 0)
            if failure is None:
                if self.flush_target:
                    await self.target.flush()
                return
            policy = self.on_source_error if failure.is_read else self.on_target_error
            action = await self.handle_error(failure.error, is_read=failure.is_read, on_error=policy)
            if action is ErrorAction.REPORT:
                raise failure.error

    # ------------------------------------------------------------ finalisation

    def commit(self) -> None:
        self._finish_bitmap(success=True)

    def abort(self) -> None:
        self._finish_bitmap(success=False)

    def _finish_bitmap(self, *, success: bool) -> None:
        bm = self.sync_bitmap
        if bm is None or bm.successor is None:
            return
        self.sync_bitmap = None
        mode = self.bitmap_mode
        if not self.started:
            bm.reclaim()
            return
        sync_it = (success or mode == "always") and mode != "never"
        result = bm.abdicate() if sync_it else bm.reclaim()
        if not success and mode == "always" and self.copy is not None:
            result.hbitmap.merge_from(self.copy.copy_bitmap.hbitmap)

    def clean(self) -> None:
        """Release everything: bitmap (if still frozen), blockers, filter
        (and with it the copy bitmap), then the extra clean-ups."""
        if self._cleaned:
            return
        self._cleaned = True
        if self.sync_bitmap is not None and self.sync_bitmap.successor is not None:
            self.sync_bitmap.reclaim()
            self.sync_bitmap = None
        for node in self._blocked:
            node.remove_blocker(BLOCKER_REASON)
        self._blocked.clear()
        if self.filter is not None:
            remove_filter(self.graph, self.filter)
            self.filter = None
        for step in self.cleanups:
            try:
                step()
            except Exception:
                logger.exception("backup %s: clean-up step failed", self.id)
        self.cleanups.clear()
