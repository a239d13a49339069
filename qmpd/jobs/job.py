"""The :class:`Job` base class: flags, pause points, throttling, error actions.

A concrete job (backup, create) subclasses :class:`Job`, sets ``job_type``
(and ``block_job = False`` for non-block jobs), and implements ``run()``.
The :class:`~qmpd.jobs.manager.JobManager` keeps the job list and the job
transactions and decides *when* things happen; the job owns its flags and
status and changes them only through its own verbs (:meth:`Job.attach`,
:meth:`Job.start`, :meth:`Job.execute`, :meth:`Job.end_work`,
:meth:`Job.make_pending`, :meth:`Job.prepare_result`, :meth:`Job.finalize`,
:meth:`Job.mark_dismissed`, :meth:`Job.request_pause`,
:meth:`Job.request_resume`, :meth:`Job.request_cancel`,
:meth:`Job.set_speed`).  Inside ``run()`` a job:

* reports progress through :attr:`Job.progress` (``set_remaining``,
  ``work_done``);
* calls :meth:`Job.pause_point` between units of work, or :meth:`Job.throttle`
  (a pause point plus the rate limiter) before each chunk it copies, and
  :meth:`Job.job_yield` to wait for :meth:`Job.enter` from elsewhere.  All
  three raise :class:`JobCancelled` once the job is cancelled;
* on an I/O error, asks :meth:`Job.handle_error` what to do and retries,
  or raises (an ``OSError``/:class:`JobError`) to fail.

The finalisation callbacks ``prepare``/``commit``/``abort``/``clean`` are
**synchronous**, so a whole finalisation (its callbacks and its events) runs
without another command interleaving, as under QEMU's big lock.
"""

from __future__ import annotations

import abc
import asyncio
import errno as _errno
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from qmpd.errors import GenericError, QMPError
from qmpd.events import EventSink
from qmpd.events import names as ev
from qmpd.jobs import info, joblog
from qmpd.jobs.clock import Clock, LoopClock, TimerHandle
from qmpd.jobs.errors import IllegalTransition, JobCancelled, JobError
from qmpd.jobs.ratelimit import RateLimit
from qmpd.jobs.status import (
    ErrorAction,
    IoStatus,
    JobStatus,
    JobType,
    JobVerb,
    OnError,
    check_verb,
    transition_allowed,
)

if TYPE_CHECKING:
    from qmpd.jobs.manager import JobTxn

__all__ = ["Job", "Progress", "SupportsErrno"]

logger = logging.getLogger(__name__)

_COMPLETED = frozenset(
    {JobStatus.WAITING, JobStatus.PENDING, JobStatus.ABORTING, JobStatus.CONCLUDED, JobStatus.NULL}
)


class SupportsErrno(Protocol):
    """Anything carrying an errno, e.g. an ``OSError``."""

    @property
    def errno(self) -> int | None: ...


@dataclass
class Progress:
    """A job's progress meter: ``offset``/``len`` on the wire."""

    current: int = 0
    total: int = 0

    def work_done(self, nbytes: int) -> None:
        """Count ``nbytes`` as done."""
        self.current += nbytes

    def set_remaining(self, nbytes: int) -> None:
        """Say ``nbytes`` are left: ``total = current + nbytes``."""
        self.total = self.current + nbytes

    def increase_remaining(self, nbytes: int) -> None:
        """Add ``nbytes`` of new work to the total."""
        self.total += nbytes


class Job(abc.ABC):
    """A long-running job; see the module docstring for how to write one."""

    #: QAPI JobType of this kind of job.
    job_type: ClassVar[JobType]
    #: Block jobs raise BLOCK_JOB_* events and appear in query-block-jobs.
    block_job: ClassVar[bool] = True
    #: Whether complete() is implemented (never for backup).
    can_complete: ClassVar[bool] = False

    def __init__(
        self, job_id: str, *, auto_finalize: bool = True, auto_dismiss: bool = True, speed: int = 0
    ) -> None:
        self.id = job_id
        self.status = JobStatus.UNDEFINED
        #: Pause requests outstanding; a job parks at a pause point while > 0.
        #: Starts at 1 (created jobs are paused); start() takes it back.
        self.pause_count = 1
        #: Paused by the user (job-pause) or by an error action ``stop``.
        self.user_paused = False
        #: Actually parked at a pause point.
        self.paused = True
        #: The job's code is executing (not sleeping, parked or finished).
        self.busy = False
        #: Cancellation requested / cancellation in force (QEMU's
        #: ``cancelled``/``force_cancel``; every job in scope force-cancels).
        self.cancelled = False
        self.force_cancel = False
        #: 0 or a negative errno, set when the work ended.
        self.ret = 0
        #: Error text for ``ret``.
        self.err: str | None = None
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        #: Requested speed in bytes/s (validated by JobManager.create).
        self.speed = speed
        self.iostatus = IoStatus.OK
        self.progress = Progress()
        #: start() was called.
        self.started = False
        #: run() returned (QEMU's deferred_to_main_loop).
        self.deferred = False
        self.txn: JobTxn | None = None
        self._events: EventSink | None = None
        self._clock: Clock = LoopClock()
        self._limit = RateLimit()
        self._wakeup: asyncio.Event | None = None
        self._timer_pending = False
        self._exited = asyncio.Event()  # run() ended and the state moved on
        self._concluded = asyncio.Event()  # reached concluded or null

    # -- to implement ------------------------------------------------------

    @abc.abstractmethod
    async def run(self) -> None:
        """Do the work.  Return to succeed; raise ``OSError``/:class:`JobError`
        (or any exception, mapped to EIO) to fail; let :class:`JobCancelled`
        propagate."""

    def prepare(self) -> None:
        """First finalisation step of a successful transaction; raise to fail it."""

    def commit(self) -> None:
        """The transaction succeeded (called once per member)."""

    def abort(self) -> None:
        """The job failed or was cancelled (also when it never started)."""

    def clean(self) -> None:
        """After commit() or abort(): release resources."""

    def complete(self) -> None:
        """Handle job-complete (only if ``can_complete``)."""

    def on_cancel(self, force: bool) -> bool:
        """A cancel was requested (e.g. abort in-flight I/O).

        :return: whether the cancel is forced; the default forces, like every
            job in qmpd's scope.
        """
        return True

    def pause_hook(self) -> None:
        """Called at a pause point just before parking."""

    def resume_hook(self) -> None:
        """Called at a pause point when the job is about to continue."""

    def block_nodes(self) -> tuple[object, ...]:
        """The block nodes the job holds (QEMU's block_job_add_bdrv); a
        drained section over one of them pauses the job."""
        return ()

    @property
    def ends_when_entered(self) -> bool:
        """The job's run only waits to be cancelled (backup ``sync:
        none``): a cancel finds it idle, and QEMU then runs it to its end
        before the command returns."""
        return False

    def show_drain(self) -> None:
        """A drained section QEMU opens and closes within one command
        (a graph change under the job): a running job shows the transient
        ``paused``/``running`` pair; a paused one shows nothing."""
        if self.status is JobStatus.RUNNING and self.started and not self.paused:
            self._transition(JobStatus.PAUSED)
            self._transition(JobStatus.RUNNING)

    async def drain_hook(self) -> None:
        """Called at a pause point before parking, with the job still busy:
        finish work in flight (QEMU's backup_pause waits for block-copy's
        running tasks, so a paused job's offset stays put)."""

    # -- state ---------------------------------------------------------------

    @property
    def is_cancelled(self) -> bool:
        """Cancellation is in force (QEMU ``job_is_cancelled``)."""
        return self.force_cancel

    @property
    def should_pause(self) -> bool:
        """A pause is requested and the job is not cancelled: stop starting work."""
        return self.pause_count > 0 and not self.is_cancelled

    @property
    def is_completed(self) -> bool:
        """The work is over (waiting, pending, aborting, concluded or null)."""
        return self.status in _COMPLETED

    @property
    def can_resume(self) -> bool:
        """A user pause (job-pause or an error action ``stop``) is in force."""
        return self.user_paused and self.pause_count > 0

    def apply_verb(self, verb: JobVerb) -> None:
        """:raise JobVerbError: ``verb`` is not allowed in the current state."""
        check_verb(self.id, self.status, verb)

    # -- verbs the manager drives ------------------------------------------------

    def attach(self, events: EventSink, clock: Clock) -> int:
        """Join a manager: events go to ``events``, sleeps use ``clock``; the
        status becomes ``created`` and the speed 0.

        :return: the speed asked for at construction, for the manager to
            apply with :meth:`set_speed` (which validates it).
        """
        self._events = events
        self._clock = clock
        speed, self.speed = self.speed, 0
        self._transition(JobStatus.CREATED)
        return speed

    def start(self, *, drain: bool = False) -> None:
        """Leave ``created`` for ``running``; the caller then runs
        :meth:`execute` on a task.  ``drain`` also shows the transient
        ``paused``/``running`` pair QEMU shows after a backup command; a job
        user-paused while created stays ``paused``.

        :raise RuntimeError: not a created, unstarted job.
        """
        if self.status is not JobStatus.CREATED or self.started:
            raise RuntimeError(f"start on job {self.id!r} in state {self.status.value}")
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self._transition(JobStatus.RUNNING)
        if drain:
            self._transition(JobStatus.PAUSED)
            if self.pause_count == 0:
                self._transition(JobStatus.RUNNING)
            else:
                self.busy = False

    async def execute(self) -> asyncio.CancelledError | None:
        """The job's side of its task (QEMU's job_co_entry): a pause point,
        run(), and the result recorded; then not busy, and deferred.

        :return: the ``CancelledError`` if the task itself was cancelled (the
            job is then force-cancelled); the caller re-raises it once the
            completion ran.
        """
        interrupted: asyncio.CancelledError | None = None
        try:
            await self.pause_point()
            await self.run()
        except JobCancelled:
            pass
        except asyncio.CancelledError as exc:
            interrupted = exc
            self.cancelled = self.force_cancel = True
        except Exception as exc:
            self.set_failure(exc)
        self.busy = False
        self.deferred = True
        return interrupted

    def end_work(self) -> bool:
        """The work is over (or never started): fix the result up
        (:meth:`update_rc`); a success moves to ``waiting``; wake
        :meth:`wait_exited`.

        :return: True on success, False if the job is now ``aborting``.
        """
        ok = not self.update_rc()
        if ok:
            self._transition(JobStatus.WAITING)
        self._exited.set()
        return ok

    async def wait_exited(self) -> None:
        """Return once :meth:`end_work` ran."""
        await self._exited.wait()

    async def wait_concluded(self) -> None:
        """Return once the job is ``concluded`` or ``null``."""
        await self._concluded.wait()

    def make_pending(self) -> None:
        """Every member of the transaction waits: ``pending`` (and
        BLOCK_JOB_PENDING).

        :raise IllegalTransition: not ``waiting`` (a bug).
        """
        self._transition(JobStatus.PENDING)
        self._emit_pending()

    def prepare_result(self) -> int:
        """First finalisation step: prepare() if the job succeeded so far
        (its exception fails the job), then :meth:`update_rc`.

        :return: 0, or the negative errno the job failed with.
        """
        if self.ret == 0:
            try:
                self.prepare()
            except Exception as exc:
                self.set_failure(exc)
        return self.update_rc()

    def finalize(self) -> None:
        """Finalise this job (QEMU job_finalize_single): commit() or abort(),
        clean() (their exceptions are logged), BLOCK_JOB_COMPLETED or
        BLOCK_JOB_CANCELLED if it started, then ``concluded``.  The caller
        drops it from its transaction and dismisses it if
        :attr:`dismiss_when_concluded`."""
        self.update_rc()
        for step in (self.commit if self.ret == 0 else self.abort, self.clean):
            try:
                step()
            except Exception:
                logger.exception("job %s: %s() failed", self.id, step.__name__)
        self._emit_finished()
        self._transition(JobStatus.CONCLUDED)

    @property
    def dismiss_when_concluded(self) -> bool:
        """Auto-dismiss, or never started: ``null`` right after ``concluded``."""
        return self.auto_dismiss or not self.started

    def mark_dismissed(self) -> None:
        """``null``: the job is gone (the caller drops it from its lists)."""
        self.busy = False
        self.deferred = True
        self._transition(JobStatus.NULL)

    def request_cancel(self, force: bool) -> None:
        """Ask the job to stop (QEMU job_cancel_async): on_cancel() decides
        whether the cancel is forced; a user pause is lifted; a job whose
        work already ended is only cancelled when forced.  Nothing is
        woken; see :meth:`enter`."""
        force = self.on_cancel(force)
        if self.user_paused:
            self.iostatus = IoStatus.OK
            self._user_resume()
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel |= force

    def request_pause(self) -> None:
        """``job-pause`` after the verb check: the job parks at its next pause
        point; an idle running job reaches it (``paused``) at once, as QEMU
        enters the job's coroutine from the command.

        :raise GenericError: "Job is already paused".
        """
        if self.user_paused:
            raise GenericError("Job is already paused")
        self._user_pause()
        if not self.paused:
            if self.status is JobStatus.RUNNING and self.started and not self.busy:
                self._transition(JobStatus.PAUSED)
            self._enter()

    def request_resume(self) -> None:
        """``job-resume`` after the checks (:attr:`can_resume`, verb):
        io-status back to ``ok``; once no pause request is left the job
        continues (``running`` inside the command, as for pause)."""
        self.iostatus = IoStatus.OK
        self._user_resume()
        if self.pause_count == 0:
            if self.status is JobStatus.PAUSED and self.started:
                self._transition(JobStatus.RUNNING)
            self._enter(only_no_timer=True)

    def _user_pause(self) -> None:
        """The one place a user pause is counted (job-pause, error ``stop``)."""
        self.user_paused = True
        self.pause_count += 1

    def _user_resume(self) -> None:
        """The one place a user pause is taken back (job-resume, cancel)."""
        self.user_paused = False
        self.pause_count -= 1

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self._events is not None:
            self._events.emit(name, data)

    def _transition(self, new: JobStatus) -> None:
        """Move to ``new`` if JobSTT allows it; JOB_STATUS_CHANGE on a real change.

        :raise IllegalTransition: the table forbids it (a bug).
        """
        old = self.status
        if not transition_allowed(old, new):
            raise IllegalTransition(f"job {self.id!r}: {old.value} -> {new.value}")
        logger.debug("job %s: %s -> %s (ret=%d)", self.id, old.value, new.value, self.ret)
        self.status = new
        joblog.log_transition(self, old, new)
        if new in (JobStatus.CONCLUDED, JobStatus.NULL):
            self._concluded.set()
        if new is not old:
            self._emit(ev.JOB_STATUS_CHANGE, {"id": self.id, "status": new.value})

    def set_failure(self, exc: BaseException) -> None:
        """Record ``exc`` (raised by run() or prepare()) as the job's result."""
        if isinstance(exc, JobError):
            self.ret, self.err = -exc.errno, exc.message
        elif isinstance(exc, OSError) and exc.errno:
            self.ret, self.err = -exc.errno, os.strerror(exc.errno)
        elif isinstance(exc, QMPError):
            self.ret, self.err = -_errno.EINVAL, exc.desc
        else:
            logger.error("job %s failed unexpectedly", self.id, exc_info=exc)
            self.ret, self.err = -_errno.EIO, os.strerror(_errno.EIO)

    def update_rc(self) -> int:
        """ECANCELED for a cancelled success; error text; ``aborting`` on
        failure (QEMU job_update_rc).

        :return: 0 or the negative errno."""
        if not self.ret and self.is_cancelled:
            self.ret = -_errno.ECANCELED
        if self.ret:
            if self.err is None:
                self.err = os.strerror(-self.ret)
            self._transition(JobStatus.ABORTING)
        return self.ret

    def set_speed(self, speed: int) -> None:
        """Apply a (validated, non-negative) speed at once; wakes a throttled job."""
        self.speed = speed
        if speed > 0:
            self._limit.set_speed(speed)
        self._enter(only_timer=True)

    # -- waking and sleeping ------------------------------------------------------

    def enter(self) -> None:
        """Wake the job from :meth:`job_yield` or a throttle sleep (QEMU ``job_enter``).

        A job parked for a pause stays parked.
        """
        self._enter()

    def _enter(self, *, only_timer: bool = False, only_no_timer: bool = False) -> None:
        if self._wakeup is None:
            return
        if (only_timer and not self._timer_pending) or (only_no_timer and self._timer_pending):
            return
        self._wakeup.set()

    async def _yield(self, delay_ns: int | None) -> None:
        """Not busy until entered (or until ``delay_ns`` passed, if given)."""
        wakeup = asyncio.Event()
        handle: TimerHandle | None = None
        if delay_ns is not None:
            handle = self._clock.call_later(delay_ns, wakeup.set)
            self._timer_pending = True
        self._wakeup = wakeup
        self.busy = False
        try:
            await wakeup.wait()
        finally:
            self.busy = True
            self._wakeup = None
            self._timer_pending = False
            if handle is not None:
                handle.cancel()

    def _check_cancelled(self) -> None:
        if self.is_cancelled:
            raise JobCancelled(self.id)

    async def pause_point(self) -> None:
        """Park here while a pause is requested (status ``paused``, or
        ``standby`` from ``ready``), then continue in the previous status.

        :raise JobCancelled: the job is cancelled (a cancelled job never
            parks; a parked job woken by a cancel first goes back to
            ``running``).
        """
        if self.should_pause:
            self.pause_hook()
            await self.drain_hook()
            if self.should_pause:
                await self._park()
            self.resume_hook()
        elif self.status in (JobStatus.PAUSED, JobStatus.STANDBY):
            # Left parked by JobManager.start(drain=True); continue.
            self._transition(JobStatus.RUNNING if self.status is JobStatus.PAUSED else JobStatus.READY)
        self._check_cancelled()

    async def _park(self) -> None:
        ready = self.status in (JobStatus.READY, JobStatus.STANDBY)
        parked = JobStatus.STANDBY if ready else JobStatus.PAUSED
        if self.status is not parked:
            self._transition(parked)
        self.paused = True
        try:
            while self.should_pause:
                await self._yield(None)
        finally:
            self.paused = False
        if self.status is parked:  # resume may have moved it on already
            self._transition(JobStatus.READY if ready else JobStatus.RUNNING)

    async def job_yield(self) -> None:
        """Wait for :meth:`enter` (or a pause/cancel), then pass a pause point.

        :raise JobCancelled: the job is cancelled.
        """
        self._check_cancelled()
        if self.pause_count == 0:
            await self._yield(None)
        await self.pause_point()

    async def sleep_ns(self, delay_ns: int) -> None:
        """Sleep on the injected clock, cut short by a pause request, a cancel,
        or set-speed; then pass a pause point.

        :raise JobCancelled: the job is cancelled.
        """
        self._check_cancelled()
        if self.pause_count == 0:
            await self._yield(delay_ns)
        await self.pause_point()

    async def throttle(self, nbytes: int) -> None:
        """Pass the rate limiter with a chunk of ``nbytes`` (spec 4.4 step 5).

        Loops over (pause point; ask the limiter for the delay of a zero-byte
        request; sleep that long) until no delay is demanded, then charges
        ``nbytes``.  With speed 0 nothing is charged.  set-speed wakes the
        sleep and the delay is recomputed with the new quota.

        :raise JobCancelled: the job is cancelled.
        """
        while True:
            await self.pause_point()
            if self.speed == 0:
                return
            delay = self._limit.calculate_delay(self._clock.now_ns(), 0)
            if delay <= 0:
                break
            await self._yield(delay)
        self._limit.calculate_delay(self._clock.now_ns(), nbytes)

    # -- error actions ------------------------------------------------------------

    async def handle_error(
        self, err: int | SupportsErrno, *, is_read: bool, on_error: OnError | str
    ) -> ErrorAction:
        """Apply an error policy (spec 4.5) to one failed read or write.

        Emits BLOCK_JOB_ERROR (block jobs).  ``stop`` user-pauses the job,
        sets ``io-status`` (``nospace`` for ENOSPC, else ``failed``) and parks
        until resumed, then returns; ``report`` and ``ignore`` return at once.
        ``enospc``/``auto`` mean ``stop`` for ENOSPC, otherwise ``report``.
        The caller fails the job on REPORT and retries on IGNORE/STOP.

        :raise JobCancelled: cancelled while stopped.
        """
        code = err if isinstance(err, int) else (err.errno or _errno.EIO)
        code = abs(code)
        policy = OnError(on_error)
        if policy in (OnError.ENOSPC, OnError.AUTO):
            action = ErrorAction.STOP if code == _errno.ENOSPC else ErrorAction.REPORT
        else:
            action = ErrorAction(policy.value)
        logger.warning("job %s: %s error (%s), action %s", self.id, "read" if is_read else "write",
                       os.strerror(code), action.value)
        if self.block_job:
            self._emit(
                ev.BLOCK_JOB_ERROR,
                {"device": self.id, "operation": "read" if is_read else "write", "action": action.value},
            )
        if action is ErrorAction.STOP:
            if not self.user_paused:
                self._user_pause()
            if self.iostatus is IoStatus.OK:
                self.iostatus = IoStatus.NOSPACE if code == _errno.ENOSPC else IoStatus.FAILED
            await self.pause_point()
        return action

    # -- query-jobs / query-block-jobs -------------------------------------------

    def error_text(self) -> str | None:
        """:return: the ``error`` member of queries and events, or None."""
        if not self.ret:
            return None
        return self.err if self.err is not None else os.strerror(-self.ret)

    def _emit_finished(self) -> None:
        if (event := info.finished_event(self)) is not None:
            self._emit(*event)

    def _emit_pending(self) -> None:
        if (event := info.pending_event(self)) is not None:
            self._emit(*event)
