"""The worker threads of the block layer's blocking file calls.

:class:`IOPool` lives apart from :mod:`qmpd.block.io` (which re-exports
it) so that the daemon can create its pool before it greets without
importing the file operations, ctypes and all.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qmpd.block.errors import BlockIOError

if TYPE_CHECKING:
    from qmpd.block.confine import Confinement
    from qmpd.block.fdsets import FdSets

__all__ = ["IOPool"]

_T = TypeVar("_T")


class IOPool:
    """Worker threads for blocking file calls, owned by whoever creates it
    (the daemon creates one and passes it down through the block graph).

    The threads are daemon threads and :meth:`shutdown` never waits for
    them: a call stuck in the kernel (a hung FUSE or NFS server) cannot
    keep the process from exiting.  Threads start on demand, up to
    ``max_workers``.
    """

    def __init__(self, max_workers: int = 8, name: str = "qmpd-io",
                 confinement: Confinement | None = None, fdsets: FdSets | None = None) -> None:
        #: ``--allowed-dir``: image paths opened or created through this pool
        #: must resolve beneath these directories (None: anywhere).
        self.confinement = confinement
        #: Descriptor sets (``add-fd``): ``/dev/fdset/N`` opens a duplicate of
        #: a member and bypasses :attr:`confinement` (the caller opened it).
        #: None: such names are ordinary paths.
        self.fdsets = fdsets
        self._max = max(1, max_workers)
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._busy = 0
        self._mutex = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """A forked child has none of the parent's threads: start afresh."""
        self._queue = queue.SimpleQueue()
        self._threads = []
        self._idle = self._busy = 0
        self._mutex = threading.Lock()
        self._pid = os.getpid()

    @property
    def busy(self) -> int:
        """Calls running or queued right now."""
        return self._busy

    async def run(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run the blocking ``fn(*args)`` in a worker; OSError becomes BlockIOError."""
        if self._closed:
            raise BlockIOError(errno.ESHUTDOWN)
        if self._pid != os.getpid():
            self._after_fork()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        with self._mutex:
            self._busy += 1
            # Claim an idle worker for this call, or start one.  (Counting
            # a worker idle only until it picks an item up would let two
            # quick calls both count on the same worker.)
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put((fn, args, fut, loop))
        try:
            return await fut
        except OSError as exc:
            raise BlockIOError.from_oserror(exc) from exc

    def _work(self) -> None:
        while True:
            with self._mutex:
                self._idle += 1
            item = self._queue.get()   # the caller claimed us (idle -= 1)
            if item is None:
                return
            fn, args, fut, loop = item
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                self._deliver(loop, fut, None, exc)
            else:
                self._deliver(loop, fut, result, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any],
                 result: object, exc: BaseException | None) -> None:
        with self._mutex:
            self._busy -= 1
        try:
            loop.call_soon_threadsafe(_settle, fut, result, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def shutdown(self) -> None:
        """Refuse new calls and let idle workers end; never waits."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """After :meth:`shutdown`, wait up to ``timeout`` seconds in all for
        the workers to end (idle ones end at once; one stuck in the kernel
        is left, as a daemon thread).

        :return: whether every worker has ended.
        """
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        return not self._threads

    @property
    def threads(self) -> int:
        """Worker threads alive."""
        return sum(1 for t in self._threads if t.is_alive())


_Work = tuple[Callable[..., Any], tuple[object, ...], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _settle(fut: asyncio.Future[Any], result: object, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
