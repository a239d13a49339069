"""The daemon's I/O pool (qmpd.block.io.IOPool): results, errors, shutdown, fork."""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest

from qmpd.block.errors import BlockIOError
from qmpd.block.io import IOPool

pytestmark = pytest.mark.asyncio


def _fail() -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


async def test_results_errors_and_bounded_threads() -> None:
    pool = IOPool(max_workers=2, name="t-io")
    assert await pool.run(sum, [1, 2, 3]) == 6
    with pytest.raises(BlockIOError) as ei:
        await pool.run(_fail)
    assert ei.value.errno == errno.EIO
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    both = asyncio.Event()
    entered = [0]
    lock = threading.Lock()

    def blocked() -> bool:
        with lock:
            entered[0] += 1
            if entered[0] == 2:
                loop.call_soon_threadsafe(both.set)
        return gate.wait()

    tasks = [asyncio.ensure_future(pool.run(blocked)) for _ in range(5)]
    await both.wait()  # both workers are inside blocked(); the rest is queued
    workers = [t for t in threading.enumerate() if t.name.startswith("t-io")]
    assert len(workers) == 2 and all(t.daemon for t in workers)
    assert pool.busy == 5
    gate.set()
    assert await asyncio.gather(*tasks) == [True] * 5
    assert pool.busy == 0
    pool.shutdown()


async def test_shutdown_refuses_new_calls_and_never_waits() -> None:
    pool = IOPool(max_workers=1, name="t-stuck")
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    inside = asyncio.Event()

    def blocked() -> bool:
        loop.call_soon_threadsafe(inside.set)
        return gate.wait()

    stuck = asyncio.ensure_future(pool.run(blocked))
    await inside.wait()
    pool.shutdown()  # returns although a worker is busy
    with pytest.raises(BlockIOError) as ei:
        await pool.run(sum, [1])
    assert ei.value.errno == errno.ESHUTDOWN
    gate.set()
    assert await stuck is True


async def test_a_forked_child_starts_its_own_workers() -> None:
    pool = IOPool(max_workers=1)
    assert await pool.run(os.getpid) == os.getpid()
    pid = os.fork()
    if pid == 0:
        ok = asyncio.new_event_loop().run_until_complete(pool.run(os.getpid)) == os.getpid()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
