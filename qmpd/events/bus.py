"""The event bus.

Domain code calls :meth:`EventBus.emit` with a QAPI event name and a plain
dict payload.  The bus stamps the host wall clock on it (as QEMU's
``g_get_real_time()``) and hands the finished message synchronously to every
subscriber, in emission order.  Subscribers are the negotiated connections;
events raised while nobody listens are lost, as in QEMU.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

__all__ = ["EventBus", "EventSink", "Subscriber"]

#: A subscriber receives the whole wire message of one event.
Subscriber = Callable[[dict[str, Any]], None]


class EventSink(Protocol):
    """What domain code needs to raise events (jobs, block layer)."""

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Raise event ``name`` with ``data`` (omitted on the wire when None)."""


class EventBus:
    """Timestamps events and fans them out to subscribers."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._subscribers: list[Subscriber] = []
        #: Optional recorder of every event (tests, tracing); None when unused.
        self.history: list[dict[str, Any]] | None = None

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; :return: a function that removes it again."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            try:
                self._subscribers.remove(subscriber)
            except ValueError:
                pass

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Raise ``name``; delivered at once to every current subscriber."""
        now_us = self._clock() // 1000
        msg: dict[str, Any] = {
            "timestamp": {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000},
            "event": name,
        }
        if data is not None:
            msg["data"] = data
        if self.history is not None:
            self.history.append(msg)
        for subscriber in list(self._subscribers):
            subscriber(msg)
