"""The job manager: job list, lookups, verbs, transactions and finalisation.

It owns every job's task (awaited by :meth:`JobManager.shutdown`), the job
list and the job transactions, and implements QEMU's completion rules
(spec 3.3-3.5) by calling each job's public verbs; a job's flags and status
change only inside :class:`~qmpd.jobs.job.Job`:

* work ends -> ``ret`` fixed up (cancelled success = ECANCELED) ->
  failure: ``aborting`` and the transaction abort path (every other member
  force-cancelled; members finalised newest first, each waiting for its own
  run() to end); success: ``waiting``, and once every member waits, all go
  ``pending`` and, unless one wants manual finalisation, are finalised.
* finalising one job: commit() or abort(), clean(), BLOCK_JOB_COMPLETED or
  BLOCK_JOB_CANCELLED (only if it started), ``concluded``, and ``null`` if
  auto-dismiss (or if it never started).

Verbs that can finalise (:meth:`cancel`, :meth:`finalize`) are coroutines
that return only after the finalisation they trigger, so its events precede
the command's reply; they suspend only to wait for a member whose run() is
still winding down.  A cancel of a *running* job returns at once; the job
winds down on its own task.  All events are synchronous ``EventSink.emit``
calls, so their order is the order of the calls.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection
from typing import TypeVar

from qmpd.errors import DeviceNotActive, GenericError
from qmpd.events import EventSink
from qmpd.jobs.clock import Clock, LoopClock
from qmpd.jobs.job import Job
from qmpd.jobs.status import JobStatus, JobVerb
from qmpd.tasks import TaskGroup

__all__ = ["JobManager", "JobTxn", "id_wellformed"]

logger = logging.getLogger(__name__)

_J = TypeVar("_J", bound=Job)

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def id_wellformed(job_id: str) -> bool:
    """The node-name rule: an ASCII letter, then letters, digits, ``-._``."""
    return _ID_RE.match(job_id) is not None


class JobTxn:
    """A job transaction: members complete together (``completion-mode: grouped``).

    Every job belongs to one; a job created without one gets its own.
    """

    def __init__(self) -> None:
        #: Unfinalised members, newest first (finalisation follows this order).
        self.jobs: list[Job] = []
        #: Set once a member failed; the abort path then owns every member.
        self.aborting = False

    def add(self, job: Job) -> None:
        """Insert ``job`` at the head."""
        self.jobs.insert(0, job)
        job.txn = self


class JobManager:
    """All jobs of a daemon, newest first."""

    def __init__(self, events: EventSink, clock: Clock | None = None, *,
                 tasks: TaskGroup | None = None) -> None:
        self._events = events
        #: Where job tasks run (the daemon's; a group of its own otherwise).
        self._group = tasks if tasks is not None else TaskGroup("jobs")
        self.clock: Clock = clock if clock is not None else LoopClock()
        self._jobs: list[Job] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lookups and queries -----------------------------------------------------------

    @property
    def task_count(self) -> int:
        """Job tasks not yet awaited (0 after :meth:`shutdown`)."""
        return len(self._tasks)

    @property
    def jobs(self) -> list[Job]:
        """Live jobs (not yet dismissed), newest first."""
        return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        """:return: the job called ``job_id``, or None."""
        return next((j for j in self._jobs if j.id == job_id), None)

    def find_job(self, job_id: str) -> Job:
        """Lookup for ``job-*`` commands.

        :raise GenericError: "Job not found".
        """
        job = self.get(job_id)
        if job is None:
            raise GenericError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> Job:
        """Lookup for ``block-job-*`` commands (block jobs only).

        :raise DeviceNotActive: "Block job '<id>' not found".
        """
        job = self.get(job_id)
        if job is None or not job.block_job:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    # -- life cycle -----------------------------------------------------------------

    def create(self, job: _J, txn: JobTxn | None = None) -> _J:
        """Register ``job`` (status ``created``) in ``txn`` (or a new one).

        The job's initial speed is applied as ``set-speed`` would; a negative
        one fails the job at once (``created`` then ``null``, spec 3.5 j).

        :raise GenericError: "Invalid job ID '<id>'", "Job ID '<id>' already
            in use", "Parameter 'speed' expects a non-negative value".
        """
        if not id_wellformed(job.id):
            raise GenericError(f"Invalid job ID '{job.id}'")
        if self.get(job.id) is not None:
            raise GenericError(f"Job ID '{job.id}' already in use")
        speed = job.attach(self._events, self.clock)
        self._jobs.insert(0, job)
        (txn if txn is not None else JobTxn()).add(job)
        try:
            self.set_speed(job, speed)
        except GenericError:
            self.early_fail(job)
            raise
        return job

    def early_fail(self, job: Job) -> None:
        """Drop a job that failed while still being set up: ``created`` -> ``null``."""
        if job.status is not JobStatus.CREATED or job.started:
            raise RuntimeError(f"early_fail on job {job.id!r} in state {job.status.value}")
        self._dismiss(job)

    def start(self, job: Job, *, drain: bool = False) -> None:
        """Start a created job: ``running``, and its run() on a manager-owned task.

        ``drain=True`` also emits the transient ``paused``/``running`` pair
        QEMU shows after a backup command (spec 3.5 a), before returning; if
        the job was user-paused while created it stays ``paused``.
        """
        job.start(drain=drain)
        task = self._group.spawn(self._run(job), name=f"job {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)  # a crash is logged by the task group

    async def _run(self, job: Job) -> None:
        """The job's task: run(), then completion (QEMU job_co_entry + job_exit)."""
        interrupted = await job.execute()
        await self._completed(job)
        if interrupted is not None:
            raise interrupted

    async def _completed(self, job: Job) -> None:
        if job.end_work():
            await self._txn_success(job)
        else:
            await self._txn_abort(job)

    async def _txn_success(self, job: Job) -> None:
        txn = self._txn(job)
        if txn.aborting or not all(other.is_completed for other in txn.jobs):
            return
        for other in list(txn.jobs):
            other.make_pending()
        if all(other.auto_finalize for other in txn.jobs):
            await self._do_finalize(job)

    async def _do_finalize(self, job: Job) -> None:
        txn = self._txn(job)
        for other in list(txn.jobs):
            if other.prepare_result():
                # QEMU aborts on behalf of ``job`` (which would then commit);
                # the failed member is the one to abort for.  Unreachable for
                # backup, which has no prepare().
                await self._txn_abort(other)
                return
        for other in list(txn.jobs):
            self._finalize_single(other)

    async def _txn_abort(self, job: Job) -> None:
        txn = self._txn(job)
        if txn.aborting:
            return  # another member's abort path owns the transaction
        txn.aborting = True
        for other in list(txn.jobs):
            if other is not job:
                other.request_cancel(force=True)
        while txn.jobs:
            other = txn.jobs[0]
            if other.started and not other.is_completed:
                other.enter()
                await other.wait_exited()
                if other not in txn.jobs:
                    continue
            self._finalize_single(other)

    def _finalize_single(self, job: Job) -> None:
        txn = self._txn(job)
        if job in txn.jobs:
            txn.jobs.remove(job)
        job.finalize()
        if job.dismiss_when_concluded:
            self._dismiss(job)

    def _dismiss(self, job: Job) -> None:
        if job.txn is not None and job in job.txn.jobs:
            job.txn.jobs.remove(job)
        job.mark_dismissed()
        if job in self._jobs:
            self._jobs.remove(job)

    @staticmethod
    def _txn(job: Job) -> JobTxn:
        if job.txn is None:
            raise RuntimeError(f"job {job.id!r} has no transaction")
        return job.txn

    # -- cancellation -----------------------------------------------------------------

    async def _cancel(self, job: Job, force: bool) -> None:
        if job.status is JobStatus.NULL:
            return
        if job.status is JobStatus.CONCLUDED:
            self._dismiss(job)
            return
        job.request_cancel(force)
        if not job.started:
            await self._completed(job)
        elif job.deferred:
            if job.is_cancelled:
                await self._txn_abort(job)
        else:
            job.enter()
            if job.ends_when_entered and job.is_cancelled:
                # QEMU enters the idle job at once; it ends, and its abort
                # (aborting, BLOCK_JOB_CANCELLED, concluded) comes before
                # the command's reply (recorded from QSD 7.2).  A job busy
                # with I/O notices the cancel later, after the reply.
                await job.wait_concluded()

    async def cancel_sync(self, job: Job) -> None:
        """Force-cancel ``job`` without verb checks and wait until it concluded.

        A concluded job is dismissed.  Used for transaction rollback and
        shutdown.
        """
        await self._cancel(job, force=True)
        if job.status not in (JobStatus.CONCLUDED, JobStatus.NULL):
            job.enter()
            await job.wait_concluded()

    async def abort_created(self, job: Job) -> None:
        """Roll back a created, never started job (transaction abort, spec 3.5 k):
        ``aborting``, ``concluded``, ``null``; abort() and clean() run; no
        BLOCK_JOB_* event.  Other unstarted members of a grouped transaction
        are rolled back with it; calling this again for them is a no-op.
        """
        await self.cancel_sync(job)

    async def shutdown(self) -> None:
        """Force-cancel every job (with its events), wait for all of them to
        reach ``null``, then await their tasks (quit, SIGTERM)."""
        while self._jobs:
            await self.cancel_sync(self._jobs[0])
        for task in list(self._tasks):
            self._tasks.discard(task)
            try:
                await task
            except asyncio.CancelledError:
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise
            except Exception:
                pass  # logged by _task_done

    # -- verbs ----------------------------------------------------------------------

    async def cancel(self, job: Job, *, force: bool = False) -> None:
        """``block-job-cancel`` (``force`` as given) / ``job-cancel`` (force=True).

        In created/waiting/pending the abort path runs before this returns;
        a running job is only told to stop.

        :raise GenericError: "The block job for device '<id>' is currently
            paused" (user-paused, no force); :class:`JobVerbError`.
        """
        if job.user_paused and not force:
            raise GenericError(f"The block job for device '{job.id}' is currently paused")
        job.apply_verb(JobVerb.CANCEL)
        await self._cancel(job, force)

    def show_drain(self, nodes: Collection[object]) -> None:
        """A drained section over ``nodes`` (a node and every node above
        it) within one command: each job holding one of them shows QEMU's
        transient ``paused``/``running`` pair (:meth:`Job.show_drain`)."""
        for job in list(self._jobs):
            if any(n in nodes for n in job.block_nodes()):
                job.show_drain()

    def pause(self, job: Job) -> None:
        """``job-pause``: the job parks (``paused`` event) at its next pause point.

        :raise GenericError: "Job is already paused"; :class:`JobVerbError`.
        """
        job.apply_verb(JobVerb.PAUSE)
        job.request_pause()

    def resume(self, job: Job) -> None:
        """``job-resume``: io-status back to ``ok``; the job continues when no
        pause request is left.

        :raise GenericError: "Can't resume a job that was not paused";
            :class:`JobVerbError`.
        """
        if not job.can_resume:
            raise GenericError("Can't resume a job that was not paused")
        job.apply_verb(JobVerb.RESUME)
        job.request_resume()

    def set_speed(self, job: Job, speed: int) -> None:
        """``block-job-set-speed``: effective at once; wakes a throttled job.

        :raise GenericError: "Parameter 'speed' expects a non-negative value";
            :class:`JobVerbError`.
        """
        job.apply_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise GenericError("Parameter 'speed' expects a non-negative value")
        job.set_speed(speed)

    def complete(self, job: Job) -> None:
        """``job-complete``.

        :raise GenericError: "The active block job '<id>' cannot be
            completed"; :class:`JobVerbError`.
        """
        job.apply_verb(JobVerb.COMPLETE)
        if job.cancelled or not job.can_complete:
            raise GenericError(f"The active block job '{job.id}' cannot be completed")
        job.complete()

    async def finalize(self, job: Job) -> None:
        """``job-finalize``: finalise every member of the job's transaction
        before returning.

        :raise JobVerbError: not ``pending``.
        """
        job.apply_verb(JobVerb.FINALIZE)
        await self._do_finalize(job)

    def dismiss(self, job: Job) -> None:
        """``job-dismiss``: a concluded job goes ``null`` and disappears.

        :raise JobVerbError: not ``concluded``.
        """
        job.apply_verb(JobVerb.DISMISS)
        self._dismiss(job)
