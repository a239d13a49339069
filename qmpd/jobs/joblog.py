"""INFO log lines for every job's life.

:func:`log_transition` is called by :meth:`Job._transition` on each status
change.  It logs, at INFO: created, running (first start and resumes),
paused, and the end: completed with bytes and MB/s, cancelled, or failed
with the error text.  The other steps (waiting, pending, aborting, null)
go to DEBUG.  Example::

    job full0 (backup) created
    job full0 running
    job full0 completed: 67108864 bytes in 0.41 s (156.1 MB/s)
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import TYPE_CHECKING

from qmpd.jobs.status import JobStatus

if TYPE_CHECKING:
    from qmpd.jobs.job import Job

__all__ = ["log_transition"]

log = logging.getLogger("qmpd.jobs")
_started: weakref.WeakKeyDictionary[Job, float] = weakref.WeakKeyDictionary()
_paused: weakref.WeakSet[Job] = weakref.WeakSet()


def log_transition(job: Job, old: JobStatus, new: JobStatus) -> None:
    """Log ``job`` moving from ``old`` to ``new`` (no-op for non-changes)."""
    if new is old or not log.isEnabledFor(logging.INFO):
        return
    if new is JobStatus.CREATED:
        log.info("job %s (%s) created", job.id, job.job_type.value)
    elif new is JobStatus.RUNNING:
        if old is JobStatus.CREATED:
            _started[job] = time.monotonic()
            log.info("job %s running", job.id)
        elif job in _paused:
            _paused.discard(job)
            log.info("job %s resumed at %d of %d bytes", job.id, job.progress.current, job.progress.total)
    elif new is JobStatus.PAUSED and job.user_paused:
        _paused.add(job)
        log.info("job %s paused at %d of %d bytes", job.id, job.progress.current, job.progress.total)
    elif new is JobStatus.CONCLUDED:
        done = job.progress.current
        elapsed = time.monotonic() - _started.pop(job, time.monotonic())
        error = job.error_text()
        if job.is_cancelled:
            log.info("job %s cancelled after %d of %d bytes", job.id, done, job.progress.total)
        elif error is not None:
            log.warning("job %s failed after %d of %d bytes: %s", job.id, done, job.progress.total, error)
        else:
            rate = done / elapsed / 1e6 if elapsed > 0 else 0.0
            log.info("job %s completed: %d bytes in %.2f s (%.1f MB/s)", job.id, done, elapsed, rate)
    else:
        log.debug("job %s: %s -> %s", job.id, old.value, new.value)
