"""Every asyncio task qmpd starts belongs to an owned TaskGroup (issue 8 part 4).

qmpd/tasks.py is the only module that calls ``create_task``; everything
else spawns through a :class:`qmpd.tasks.TaskGroup` that the daemon (or,
for tasks that live only during one call, the calling function) awaits or
cancels.  No exceptions are needed today; an entry in ``ALLOWED`` would
need a reason.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from qmpd.tasks import TaskGroup

PKG = Path(__file__).resolve().parents[2] / "qmpd"
BARE = re.compile(r"\b(create_task|ensure_future|run_coroutine_threadsafe)\s*\(|asyncio\.Task\s*\(")
#: ``module path -> reason`` for bare task creation outside qmpd/tasks.py.
ALLOWED: dict[str, str] = {"tasks.py": "the TaskGroup itself"}


def test_no_bare_task_creation_in_qmpd() -> None:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel in ALLOWED:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if BARE.search(code):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert found == []


@pytest.mark.asyncio
async def test_shutdown_waits_then_cancels_and_awaits_the_whole_tree() -> None:
    root = TaskGroup("root")
    jobs = root.child("jobs")
    finished = asyncio.Event()
    release = asyncio.Event()
    cancelled: list[str] = []

    async def quick() -> None:
        await release.wait()
        finished.set()

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    root.spawn(quick(), name="quick")
    a = root.spawn(forever("a"), name="a")
    b = jobs.spawn(forever("b"), name="b")
    assert len(root) == 3 and len(jobs) == 1
    release.set()
    await root.shutdown(0.05)
    assert finished.is_set() and sorted(cancelled) == ["a", "b"]
    assert a.cancelled() and b.cancelled() and len(root) == 0
    with pytest.raises(RuntimeError, match="shut down"):
        jobs.spawn(quick())


@pytest.mark.asyncio
async def test_failures_are_logged_once_unless_the_owner_reads_them(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    loud, quiet = TaskGroup("loud"), TaskGroup("quiet", log_failures=False)
    t1, t2 = loud.spawn(boom(), name="t1"), quiet.spawn(boom(), name="t2")
    assert await loud.wait(1.0) and await quiet.wait(1.0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["task t1 of loud failed"]
    assert isinstance(t1.exception(), ValueError) and isinstance(t2.exception(), ValueError)


THREAD = re.compile(r"\bThread\s*\(|\b_thread\.start_new")
#: ``module path -> reason`` for threads started outside qmpd/tasks.py.
THREADS_ALLOWED: dict[str, str] = {
    "tasks.py": "OwnedThread itself",
    "block/io.py": "the I/O pool's workers",
}


def test_threads_only_through_owned_abstractions() -> None:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel in THREADS_ALLOWED:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if THREAD.search(line.split("#", 1)[0]):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert found == []


@pytest.mark.asyncio
async def test_owned_thread_reports_its_end_and_failure() -> None:
    from qmpd.tasks import OwnedThread

    ran: list[str] = []
    await OwnedThread(lambda: ran.append("x"), name="t-ok").start()
    assert ran == ["x"]

    def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await OwnedThread(boom, name="t-fail").start()
