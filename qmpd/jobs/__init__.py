"""The generic job engine: QEMU's job state machine, verbs, transactions,
finalisation, pause points, the speed limiter and error actions.

Concrete jobs subclass :class:`Job`; :class:`JobManager` owns them.
"""

from qmpd.jobs.clock import Clock, LoopClock, ManualClock
from qmpd.jobs.errors import IllegalTransition, JobCancelled, JobError, JobVerbError
from qmpd.jobs.job import Job, Progress, SupportsErrno
from qmpd.jobs.manager import JobManager, JobTxn, id_wellformed
from qmpd.jobs.ratelimit import RateLimit
from qmpd.jobs.status import (
    TRANSITIONS,
    VERBS,
    ErrorAction,
    IoStatus,
    JobStatus,
    JobType,
    JobVerb,
    OnError,
)

__all__ = [
    "Clock",
    "LoopClock",
    "ManualClock",
    "IllegalTransition",
    "JobCancelled",
    "JobError",
    "JobVerbError",
    "Job",
    "Progress",
    "SupportsErrno",
    "JobManager",
    "JobTxn",
    "id_wellformed",
    "RateLimit",
    "TRANSITIONS",
    "VERBS",
    "ErrorAction",
    "IoStatus",
    "JobStatus",
    "JobType",
    "JobVerb",
    "OnError",
]
