"""Job enums and QEMU's two job tables, as data.

:data:`TRANSITIONS` is QEMU's ``JobSTT`` (spec 3.1): ``TRANSITIONS[a]`` is the
set of states a job in state ``a`` may move to.  :data:`VERBS` is
``JobVerbTable`` (spec 3.2): ``VERBS[v]`` is the set of states in which the
verb ``v`` is accepted.  For example::

    >>> JobStatus.PENDING in TRANSITIONS[JobStatus.WAITING]
    True
    >>> JobStatus.PENDING in VERBS[JobVerb.FINALIZE]
    True
    >>> JobStatus.RUNNING in VERBS[JobVerb.FINALIZE]
    False

Enum values are the QAPI names, so ``str(JobStatus.NULL) == "null"``.
"""

from __future__ import annotations

from enum import StrEnum

from qmpd.jobs.errors import JobVerbError

__all__ = [
    "JobStatus",
    "JobVerb",
    "JobType",
    "IoStatus",
    "OnError",
    "ErrorAction",
    "TRANSITIONS",
    "VERBS",
    "transition_allowed",
    "check_verb",
]


class JobStatus(StrEnum):
    """QAPI ``JobStatus``."""

    UNDEFINED = "undefined"  #: never visible; before creation
    CREATED = "created"  #: created, not started
    RUNNING = "running"  #: run() is executing
    PAUSED = "paused"  #: parked at a pause point
    READY = "ready"  #: mirror-like jobs only
    STANDBY = "standby"  #: paused while ready
    WAITING = "waiting"  #: succeeded; waiting for the rest of its transaction
    PENDING = "pending"  #: the transaction succeeded; finalisation not yet run
    ABORTING = "aborting"  #: failed or cancelled; abort path running
    CONCLUDED = "concluded"  #: finalised; waiting to be dismissed
    NULL = "null"  #: dismissed; gone from every list


class JobVerb(StrEnum):
    """QAPI ``JobVerb`` (``change`` exists since QEMU 8.2; nothing uses it here)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


class JobType(StrEnum):
    """QAPI ``JobType``."""

    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"
    BACKUP = "backup"
    CREATE = "create"
    AMEND = "amend"
    SNAPSHOT_LOAD = "snapshot-load"
    SNAPSHOT_SAVE = "snapshot-save"
    SNAPSHOT_DELETE = "snapshot-delete"


class IoStatus(StrEnum):
    """QAPI ``BlockDeviceIoStatus`` (a block job's ``io-status``)."""

    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class OnError(StrEnum):
    """QAPI ``BlockdevOnError``: the policy a job was given."""

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class ErrorAction(StrEnum):
    """QAPI ``BlockErrorAction``: what a policy decided for one error."""

    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


_S = JobStatus

#: QEMU's JobSTT: from-state -> allowed to-states (spec 3.1).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    _S.UNDEFINED: frozenset({_S.CREATED}),
    _S.CREATED: frozenset({_S.RUNNING, _S.ABORTING, _S.NULL}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.READY, _S.WAITING, _S.ABORTING}),
    _S.PAUSED: frozenset({_S.RUNNING}),
    _S.READY: frozenset({_S.STANDBY, _S.WAITING, _S.ABORTING}),
    _S.STANDBY: frozenset({_S.READY}),
    _S.WAITING: frozenset({_S.PENDING, _S.ABORTING}),
    _S.PENDING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.ABORTING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.CONCLUDED: frozenset({_S.NULL}),
    _S.NULL: frozenset(),
}

_ALIVE = frozenset({_S.CREATED, _S.RUNNING, _S.PAUSED, _S.READY, _S.STANDBY})

#: QEMU's JobVerbTable: verb -> states accepting it (spec 3.2).
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ALIVE | {_S.WAITING, _S.PENDING},
    JobVerb.PAUSE: _ALIVE,
    JobVerb.RESUME: _ALIVE,
    JobVerb.SET_SPEED: _ALIVE,
    JobVerb.COMPLETE: frozenset({_S.READY, _S.STANDBY}),
    JobVerb.FINALIZE: frozenset({_S.PENDING}),
    JobVerb.DISMISS: frozenset({_S.CONCLUDED}),
    JobVerb.CHANGE: _ALIVE,
}


def transition_allowed(old: JobStatus, new: JobStatus) -> bool:
    """:return: whether JobSTT allows ``old -> new`` (same-state included)."""
    return new in TRANSITIONS[old]


def check_verb(job_id: str, status: JobStatus, verb: JobVerb) -> None:
    """Refuse ``verb`` for a job in ``status`` as QEMU does.

    :raise JobVerbError: "Job '<id>' in state '<status>' cannot accept
        command verb '<verb>'".
    """
    if status not in VERBS[verb]:
        raise JobVerbError(
            f"Job '{job_id}' in state '{status.value}' cannot accept command verb '{verb.value}'"
        )
