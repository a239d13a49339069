"""Owned task sets: the only place in qmpd that creates asyncio tasks.

The :class:`~qmpd.server.daemon.Daemon` owns one root :class:`TaskGroup`
and passes it (or a named :meth:`child <TaskGroup.child>` of it) down to the
job manager, the block graph, the NBD server and the web server.  Every task
they start is kept until it ends; a failure is logged, never lost; and
:meth:`TaskGroup.shutdown` on the root waits a grace period, then cancels
and awaits what is left in the whole tree, so after the daemon's clean-up no
task of it is running (``tests/integration/test_sigterm_leaks.py``).

A thread that serves one thing for a while (an NBD connection's data
pump) is an :class:`OwnedThread`: a task of a group starts it and awaits
its end, so cancelling the task is how the owner ends it (it tells the
thread's code to stop, then waits briefly).  File calls use the block
layer's I/O pool instead; ``tests/unit/test_owned_tasks.py`` fails on a
``threading.Thread`` anywhere else.

Code without a daemon (library use, unit tests) makes its own group; a
component that starts tasks only for the length of one call (block-copy's
chunk workers) uses a short-lived group and awaits it before returning.
``tests/unit/test_owned_tasks.py`` fails on any ``create_task`` or
``ensure_future`` elsewhere in qmpd/.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["OwnedThread", "TaskGroup"]

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


class OwnedThread:
    """A daemon thread running ``target()`` whose end an asyncio task awaits.

    :meth:`start` returns a future of the running loop, settled when
    ``target`` returns (or with what it raised).  The thread is a daemon
    thread: one stuck in the kernel cannot keep the process from exiting.
    Stopping it is ``target``'s own protocol (its owner asks, then awaits).
    """

    def __init__(self, target: Callable[[], None], *, name: str) -> None:
        self.name = name
        self._target = target
        self._thread: threading.Thread | None = None

    def start(self) -> asyncio.Future[None]:
        """Start the thread.  :return: its end, as a future of this loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def body() -> None:
            exc: BaseException | None = None
            try:
                self._target()
            except BaseException as e:  # noqa: BLE001 - handed to the owner
                exc = e
            try:
                loop.call_soon_threadsafe(settle, exc)
            except RuntimeError:   # the loop is closed: nobody waits any more
                pass

        self._thread = threading.Thread(target=body, name=self.name, daemon=True)
        self._thread.start()
        return done

    @property
    def alive(self) -> bool:
        """Whether the thread is still running."""
        return self._thread is not None and self._thread.is_alive()
