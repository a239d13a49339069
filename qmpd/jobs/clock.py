"""Clocks for rate limiting and job sleeps.

A :class:`Clock` tells monotonic nanoseconds and schedules a callback; jobs
never call ``asyncio.sleep`` or ``time.sleep``.  :class:`LoopClock` is the real
one.  :class:`ManualClock` only moves when told to, so tests (of this package
and of the backup job) run throttled jobs without waiting::

    clock = ManualClock()
    clock.call_later(100, lambda: print("fired"))
    clock.advance(99)    # nothing
    clock.advance(1)     # prints "fired"; clock.now_ns() == 100
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Callable, Protocol

__all__ = ["Clock", "TimerHandle", "LoopClock", "ManualClock"]


class TimerHandle(Protocol):
    """What :meth:`Clock.call_later` returns."""

    def cancel(self) -> None:
        """Stop the callback from firing (no-op if it already fired)."""


class Clock(Protocol):
    """Monotonic time and timers, injected into the job manager."""

    def now_ns(self) -> int:
        """:return: monotonic time in nanoseconds."""

    def call_later(self, delay_ns: int, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` (synchronously, from the event loop) ``delay_ns`` from now."""


class LoopClock:
    """The real clock: ``time.monotonic_ns`` and the running loop's timers."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def call_later(self, delay_ns: int, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(delay_ns, 0) / 1e9, callback)


class _ManualTimer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: int, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only through :meth:`advance`; for tests."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, _ManualTimer]] = []
        self._armed: asyncio.Event | None = None

    def now_ns(self) -> int:
        return self._now

    def call_later(self, delay_ns: int, callback: Callable[[], None]) -> TimerHandle:
        timer = _ManualTimer(self._now + max(delay_ns, 0), callback)
        heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
        if self._armed is not None:
            self._armed.set()
        return timer

    async def wait_timer(self) -> None:
        """Return once a timer is pending (at once if one is): e.g. a job
        went to sleep in its rate limiter.  The test's event instead of
        polling the job."""
        while self.next_deadline() is None:
            if self._armed is None or self._armed.is_set():
                self._armed = asyncio.Event()
            await self._armed.wait()

    def next_deadline(self) -> int | None:
        """:return: the earliest pending timer's deadline, or None."""
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    def advance(self, delta_ns: int) -> int:
        """Move time forward, firing due timers in deadline order.

        :return: the number of callbacks fired.
        """
        target = self._now + delta_ns
        fired = 0
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > target:
                break
            deadline, _, timer = heapq.heappop(self._heap)
            self._now = max(self._now, deadline)
            timer.callback()
            fired += 1
        self._now = target
        return fired

    def advance_to_next(self) -> bool:
        """Jump to the next timer and fire it; :return: False if none is pending."""
        deadline = self.next_deadline()
        if deadline is None:
            return False
        self.advance(deadline - self._now)
        return True

    def _drop_cancelled(self) -> None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
