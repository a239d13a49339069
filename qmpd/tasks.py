"""Owned task sets: the only place in qmpd that creates asyncio tasks.

The :class:`~qmpd.server.daemon.Daemon` owns one root :class:`TaskGroup`
and passes it (or a named :meth:`child <TaskGroup.child>` of it) down to the
job manager, the block graph, the NBD server and the web server.  Every task
they start is kept until it ends; a failure is logged, never lost; and
:meth:`TaskGroup.shutdown` on the root waits a grace period, then cancels
and awaits what is left in the whole tree, so after the daemon's clean-up no
task of it is running (``tests/integration/test_sigterm_leaks.py``).

Code without a daemon (library use, unit tests) makes its own group; a
component that starts tasks only for the length of one call (block-copy's
chunk workers) uses a short-lived group and awaits it before returning.
``tests/unit/test_owned_tasks.py`` fails on any ``create_task`` or
``ensure_future`` elsewhere in qmpd/.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["TaskGroup"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class TaskGroup:
    """A set of tasks that its owner awaits or cancels; groups nest."""

    def __init__(self, name: str = "qmpd", parent: TaskGroup | None = None, *,
                 log_failures: bool = True) -> None:
        self.name = name
        #: Log tasks that end with an exception (False: the owner reads
        #: every outcome itself, e.g. block-copy's chunk workers).
        self.log_failures = log_failures
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: list[TaskGroup] = []
        self._closed = False
        if parent is not None:
            parent._children.append(self)

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` has begun (spawn then raises)."""
        return self._closed

    def child(self, name: str) -> TaskGroup:
        """A group whose tasks this group's :meth:`shutdown` also ends."""
        return TaskGroup(f"{self.name}/{name}", self)

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str | None = None) -> asyncio.Task[_T]:
        """Run ``coro`` as a task of this group.

        :raise RuntimeError: the group was shut down (the coroutine is closed).
        """
        if self._closed:
            coro.close()
            raise RuntimeError(f"task group {self.name} is shut down")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved, so asyncio does not warn
        if exc is not None and self.log_failures:
            log.error("task %s of %s failed", task.get_name(), self.name, exc_info=exc)

    def tasks(self) -> Iterator[asyncio.Task[Any]]:
        """Every unfinished task of this group and of its children."""
        yield from list(self._tasks)
        for child in self._children:
            yield from child.tasks()

    def __len__(self) -> int:
        return sum(1 for _ in self.tasks())

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until every task of the tree has ended (or ``timeout``).

        :return: whether none is left.
        """
        while pending := [t for t in self.tasks() if not t.done()]:
            _, still = await asyncio.wait(pending, timeout=timeout)
            if still:
                return False
        return True

    async def shutdown(self, grace: float) -> None:
        """Refuse new tasks; wait ``grace`` seconds for the running ones, then
        cancel the rest and wait for them to end (at most ``grace`` again;
        a task that ignores cancellation is logged and left)."""
        self._close()
        if await self.wait(grace):
            return
        for task in self.tasks():
            task.cancel()
        if not await self.wait(grace):
            names = ", ".join(t.get_name() for t in self.tasks())
            log.warning("tasks did not end after cancellation: %s", names)

    def _close(self) -> None:
        self._closed = True
        for child in self._children:
            child._close()
