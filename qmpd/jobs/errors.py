"""Exceptions of the job engine.

::

    GenericError (qmpd.errors)
    └── JobVerbError        a verb refused in the job's current state
    JobCancelled(Exception) raised inside run() at a pause point of a cancelled job
    JobError(Exception)     raised by run()/prepare() to fail with an errno
    IllegalTransition(RuntimeError)  a transition JobSTT forbids (a qmpd bug)
"""

from __future__ import annotations

import errno as _errno
import os

from qmpd.errors import GenericError

__all__ = ["JobVerbError", "JobCancelled", "JobError", "IllegalTransition"]


class JobVerbError(GenericError):
    """"Job 'x' in state 'concluded' cannot accept command verb 'pause'"."""


class JobCancelled(Exception):
    """The job was cancelled; raised by :meth:`Job.pause_point` and friends.

    ``run()`` should let it propagate (clean up in ``finally`` blocks); the
    engine treats it as a normal end of ``run()``, and the cancellation then
    turns the result into ``-ECANCELED`` ("Operation canceled").
    """


class JobError(Exception):
    """Fail a job with a negative errno and an optional message.

    With no message the job's error text is ``os.strerror(errno)``, as QEMU
    uses ``strerror(-ret)`` (EIO -> "Input/output error").
    """

    def __init__(self, errno: int = _errno.EIO, message: str | None = None) -> None:
        self.errno = errno
        self.message = message if message is not None else os.strerror(errno)
        super().__init__(self.message)


class IllegalTransition(RuntimeError):
    """A state change the transition table forbids: always a bug in qmpd."""
