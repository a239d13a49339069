"""One QMP connection: bytes in, replies and events out.

The driver is thin (hypercorn style): it feeds received bytes to the
sans-I/O parser, queues the parsed items, and one worker task per
connection turns them into replies in input order.  Commands themselves run
through :meth:`qmpd.server.daemon.Daemon.execute`, which serialises them
across all connections.  Events reach the connection only after its
``qmp_capabilities`` reply was written.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import TYPE_CHECKING, Any, cast

from qmpd.protocol.framing import FramingError, JsonStreamParser, encode
from qmpd.protocol.session import Call, Session, SessionState

if TYPE_CHECKING:
    from qmpd.server.daemon import Daemon

__all__ = ["Connection"]

log = logging.getLogger(__name__)
_counter = itertools.count(1)

#: Parsed-but-unprocessed requests before we stop reading (QEMU queues 8).
MAX_QUEUED = 8
#: Output a client may leave unread before it is disconnected.
MAX_WRITE_BUFFER = 64 << 20


class Connection(asyncio.Protocol):
    """asyncio protocol for one client of a QMP listener."""

    def __init__(self, daemon: Daemon, listener: str) -> None:
        self._daemon = daemon
        self.name = f"{listener}#{next(_counter)}"
        self.log = logging.getLogger(f"qmpd.connection.{self.name}")
        self._parser = JsonStreamParser()
        self.session = Session(daemon.command_names, daemon.oob_commands)
        self._items: collections.deque[object] = collections.deque()
        self._wakeup = asyncio.Event()
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._eof = False
        self._paused = False
        self._unsubscribe: Any = None
        self._task: asyncio.Task[None] | None = None
        self._pending_negotiation = False
        self._negotiate_oob = False

    # -- SessionControl ---------------------------------------------------
    @property
    def negotiating(self) -> bool:
        return self.session.state is SessionState.NEGOTIATING

    def negotiate(self, oob: bool) -> None:
        # Applied after the reply is written, so no event can precede it.
        self._pending_negotiation = True
        self._negotiate_oob = oob

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        self.log.info("client connected")
        self._send(self._daemon.greeting)
        self._task = self._daemon.spawn(self._worker(), self.name)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._items.extend(self._parser.feed(data))
        if self._items:
            self._wakeup.set()
            if len(self._items) >= MAX_QUEUED and not self._paused and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._items.extend(self._parser.feed(b""))
        self._eof = True
        self._wakeup.set()
        return True  # keep the write side open until the queue is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.info("client disconnected%s", f": {exc}" if exc else "")
        self._daemon.connection_closed(self)
        self._closed = True
        self._items.clear()
        self._parser.reset()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._wakeup.set()

    # -- internals --------------------------------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return
        data = encode(msg)
        if self._daemon.trace:
            self.log.info("<-- %s", data[:-2].decode("ascii"))
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.log.warning("client is not reading its replies; disconnecting")
            self.close()

    def _on_event(self, msg: dict[str, Any]) -> None:
        self._send(msg)

    def close(self) -> None:
        """Close the connection (buffered output is still flushed)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    async def _worker(self) -> None:
        daemon = self._daemon
        session = self.session
        items = self._items
        while True:
            if not items:
                if self._closed:
                    return
                if self._eof:
                    self.close()
                    return
                if self._paused and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = items.popleft()
            if daemon.trace:
                self.log.info("--> %s", item.desc if isinstance(item, FramingError) else encode(item)[:-2].decode())
            work = session.handle(item)
            if isinstance(work, Call):
                reply = await daemon.execute(work, self)
            else:
                reply = work.msg
            if self._closed:
                return
            self._send(reply)
            if self._pending_negotiation:
                self._pending_negotiation = False
                session.negotiated(self._negotiate_oob)
                self._unsubscribe = daemon.events.subscribe(self._on_event)
            if daemon.stopping:
                return
