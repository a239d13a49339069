"""Doubles for the job engine tests (no tests here): a recording EventSink,
a FakeJob driven by the test, and a loop-settling helper."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmpd.events import names as ev
from qmpd.jobs import ErrorAction, Job, JobManager, JobType, ManualClock, OnError

MiB = 1 << 20


class Recorder:
    """An EventSink that keeps (name, data) pairs in emission order; tests
    wait for events with :meth:`wait`."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed: asyncio.Event | None = None

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((name, dict(data or {})))
        if self._changed is not None:
            self._changed.set()

    async def wait(self, cond: Callable[[], bool]) -> None:
        """Return once ``cond()`` holds, re-checking it after every event."""
        while not cond():
            if self._changed is None or self._changed.is_set():
                self._changed = asyncio.Event()
            await self._changed.wait()

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """:return: the events so far, and forget them."""
        out, self.events = self.events, []
        return out

    def statuses(self, job_id: str | None = None) -> list[str]:
        return [
            d["status"]
            for n, d in self.events
            if n == ev.JOB_STATUS_CHANGE and (job_id is None or d["id"] == job_id)
        ]


def jsc(job_id: str, *statuses: str) -> list[tuple[str, dict[str, Any]]]:
    """JOB_STATUS_CHANGE events for ``job_id``."""
    return [(ev.JOB_STATUS_CHANGE, {"id": job_id, "status": s}) for s in statuses]


@dataclass
class Failure:
    """Make chunk ``index`` fail ``times`` times."""

    err: int = errno.EIO
    is_read: bool = True
    policy: OnError = OnError.REPORT
    times: int = 1


class FakeJob(Job):
    """Copies ``chunks`` chunks through throttle(); the test may gate each chunk."""

    job_type = JobType.BACKUP

    def __init__(
        self,
        job_id: str,
        *,
        chunks: int = 4,
        chunk: int = MiB,
        gated: bool = False,
        failures: dict[int, Failure] | None = None,
        clock: ManualClock | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(job_id, **kw)
        self.chunks = chunks
        self.chunk = chunk
        self.allowed = 0 if gated else chunks
        self.failures = failures or {}
        self.actions: list[ErrorAction] = []
        self.calls: list[str] = []
        self.copy_times: list[int] = []
        self.test_clock = clock
        self.progress.set_remaining(chunks * chunk)

    def allow(self, n: int = 1) -> None:
        """Let ``n`` more chunks through."""
        self.allowed += n
        self.enter()

    async def run(self) -> None:
        done = 0
        while done < self.chunks:
            while done >= self.allowed:
                await self.job_yield()
            await self.throttle(self.chunk)
            failure = self.failures.get(done)
            if failure is not None and failure.times > 0:
                failure.times -= 1
                action = await self.handle_error(
                    failure.err, is_read=failure.is_read, on_error=failure.policy
                )
                self.actions.append(action)
                if action is ErrorAction.REPORT:
                    raise OSError(failure.err, os.strerror(failure.err))
                continue
            if self.test_clock is not None:
                self.copy_times.append(self.test_clock.now_ns())
            self.progress.work_done(self.chunk)
            done += 1

    def prepare(self) -> None:
        self.calls.append("prepare")

    def commit(self) -> None:
        self.calls.append("commit")

    def abort(self) -> None:
        self.calls.append("abort")

    def clean(self) -> None:
        self.calls.append("clean")


class FakeCreateJob(FakeJob):
    """A non-block job, like blockdev-create's."""

    job_type = JobType.CREATE
    block_job = False


@dataclass
class Env:
    events: Recorder = field(default_factory=Recorder)
    clock: ManualClock = field(default_factory=ManualClock)
    manager: JobManager = field(init=False)

    def __post_init__(self) -> None:
        self.manager = JobManager(self.events, self.clock)

    def job(self, job_id: str = "job0", cls: type[FakeJob] = FakeJob, **kw: Any) -> FakeJob:
        return cls(job_id, clock=self.clock, **kw)


async def settle() -> None:
    """Let every ready callback and task run until nothing is runnable (no
    real sleeping): yield to the loop until its ready queue is empty.
    Timers and I/O still pending are not runnable, so they are not waited
    for; jobs use the fake clock.  The ready queue is asyncio's
    ``BaseEventLoop._ready`` (no public API tells that the loop is idle)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)
    for _ in range(100_000):
        if not loop._ready:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0)
    raise AssertionError("the event loop never became idle")
