"""One QMP connection: bytes in, replies and events out.

The driver is thin (hypercorn style): it feeds received bytes to the
sans-I/O parser, queues the parsed items, and one worker task per
connection turns them into replies in input order.  Commands themselves run
through :meth:`qmpd.server.daemon.Daemon.execute`, which serialises them
across all connections.  Events reach the connection only after its
``qmp_capabilities`` reply was written.

Bounded work and memory (see :mod:`qmpd.server.limits`): the parser looks
at one slice of input per call and the rest is parsed from a loop callback,
so one huge message never stalls other clients; reading pauses while a
slice is pending or the queue is full; a client that does not read its
output, or makes the daemon exceed its buffer budget, is aborted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
from typing import TYPE_CHECKING, Any, cast

from qmpd.block.fdsets import PassedFds
from qmpd.protocol.framing import FramingError, JsonStreamParser, encode
from qmpd.protocol.session import Call, Session, SessionState
from qmpd.server.limits import Limits

if TYPE_CHECKING:
    from qmpd.server.daemon import Daemon

__all__ = ["Connection"]

log = logging.getLogger(__name__)
_counter = itertools.count(1)

#: Parsed-but-unprocessed requests before we stop reading (QEMU queues 8).
MAX_QUEUED = 8
#: The one line a connection over ``--max-connections`` receives.
REFUSAL = b'{"error": {"class": "GenericError", "desc": "qmpd: too many connections"}}\r\n'


class Connection(asyncio.Protocol):
    """asyncio protocol for one client of a QMP listener."""

    def __init__(self, daemon: Daemon, listener: str, limits: Limits, *, refused: bool = False,
                 pretty: bool = False) -> None:
        self._daemon = daemon
        self._pretty = pretty
        self._limits = limits
        self._refused = refused
        self.name = f"{listener}#{next(_counter)}"
        self.log = logging.getLogger(f"qmpd.connection.{self.name}")
        self._parser = JsonStreamParser(slice_bytes=limits.slice_bytes)
        self._resume_scheduled = False
        self._framing_errors = 0
        self._idle_timer: asyncio.TimerHandle | None = None
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
        #: Descriptors received with SCM_RIGHTS (``getfd``, ``add-fd``).
        self.fds = PassedFds()

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
        if self._refused:
            self.log.warning("refused: --max-connections (%d) reached", self._limits.max_connections)
            self._transport.write(REFUSAL)
            self._closed = True
            self._transport.close()
            return
        self.log.info("client connected")
        self._send(self._daemon.greeting)
        self._daemon.client_greeted()
        self._task = self._daemon.spawn(self._worker(), self.name)
        timeout = self._limits.negotiation_timeout
        if timeout is not None:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._negotiation_expired)

    def _negotiation_expired(self) -> None:
        self._idle_timer = None
        timeout = self._limits.negotiation_timeout
        if not self._daemon.loaded and timeout is not None and not self._closed:
            # The daemon is still loading (its answer to qmp_capabilities
            # would wait): the time is not the client's; count again.
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._negotiation_expired)
            return
        if self.negotiating and not self._closed:
            self.log.warning("no capabilities negotiation within %gs; disconnecting",
                             self._limits.negotiation_timeout)
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._eof:
            return
        self._take(self._parser.feed(data))
        self._check_budget()

    def fds_received(self, fds: list[int]) -> None:
        """Descriptors arrived (before the bytes they came with)."""
        if self._closed or self._eof:
            for fd in fds:
                os.close(fd)
            return
        self.fds.received(fds)

    def eof_received(self) -> bool:
        if not self._eof:
            self._take(self._parser.feed(b""))
            self._eof = True
            self._wakeup.set()
        return True  # keep the write side open until the queue is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.info("client disconnected%s", f": {exc}" if exc else "")
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.fds.close_all()
        self._daemon.connection_closed(self)
        self._items.clear()
        self._parser.reset()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._wakeup.set()

    # -- input flow -------------------------------------------------------
    def _take(self, items: list[object | FramingError]) -> None:
        """Queue parsed items; stop reading after too many framing errors."""
        limit = self._limits.max_framing_errors
        for index, item in enumerate(items):
            if isinstance(item, FramingError):
                self._framing_errors += 1
                if self._framing_errors >= limit:
                    self.log.warning("%d consecutive framing errors; disconnecting", limit)
                    self._items.extend(items[:index + 1])
                    self._stop_input()
                    break
            else:
                self._framing_errors = 0
        else:
            self._items.extend(items)
        if self._items or self._eof:
            self._wakeup.set()
        self._flow()

    def _stop_input(self) -> None:
        """Answer what is queued, then close (like end of input)."""
        self._eof = True
        self._parser.reset()
        self._wakeup.set()

    def _flow(self) -> None:
        """Pause reading while parsing is behind or the queue is full;
        schedule the next parser slice when there is room."""
        transport = self._transport
        if self._closed or transport is None:
            return
        full = len(self._items) >= MAX_QUEUED
        behind = self._parser.pending
        if behind and not full and not self._resume_scheduled:
            self._resume_scheduled = True
            asyncio.get_running_loop().call_soon(self._parse_more)
        want_pause = (full or behind) and not self._eof
        if want_pause and not self._paused:
            self._paused = True
            transport.pause_reading()
        elif not want_pause and self._paused and not self._eof:
            self._paused = False
            transport.resume_reading()

    def _parse_more(self) -> None:
        self._resume_scheduled = False
        if self._closed:
            return
        self._take(self._parser.resume())
        self._check_budget()

    def footprint(self) -> int:
        """Bytes this connection holds: partial input plus unread output."""
        transport = self._transport
        out = 0 if transport is None or self._closed else transport.get_write_buffer_size()
        return self._parser.footprint + out

    def _check_budget(self) -> None:
        limits = self._limits
        mine = self.footprint()
        if mine < limits.check_above or self._closed:
            return
        total = self._daemon.buffered_bytes()
        if total > limits.max_buffer:
            self.log.warning("daemon buffer budget (%d bytes) exceeded, this connection holds %d; "
                             "disconnecting", limits.max_buffer, mine)
            self.abort()

    # -- internals --------------------------------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return
        data = encode(msg, pretty=self._pretty)
        if self._daemon.trace:
            self.log.info("<-- %s", (encode(msg) if self._pretty else data)[:-2].decode("ascii"))
        transport.write(data)
        if transport.get_write_buffer_size() > self._limits.max_output:
            self.log.warning("client is not reading its replies; disconnecting")
            self.abort()
            return
        self._check_budget()

    def _on_event(self, msg: dict[str, Any]) -> None:
        self._send(msg)

    def close(self) -> None:
        """Close the connection (buffered output is still flushed)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding buffered output."""
        self._closed = True
        self._wakeup.set()
        self._items.clear()
        self._parser.reset()
        if self._transport is not None:
            self._transport.abort()

    async def _worker(self) -> None:
        daemon = self._daemon
        session = self.session
        items = self._items
        while True:
            if not items:
                if self._closed:
                    return
                if self._eof and not self._parser.pending:
                    self.close()
                    return
                self._flow()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = items.popleft()
            if len(items) < MAX_QUEUED and (self._paused or self._parser.pending):
                self._flow()
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
                # The table is the daemon's now: it may have greeted before loading it.
                session.negotiated(self._negotiate_oob, daemon.command_names, daemon.oob_commands)
                self._unsubscribe = daemon.events.subscribe(self._on_event)
            if daemon.stopping:
                return
            if items:
                # Fairness: a client with a backlog gets one request per turn
                # of the event loop, like every other client (commands that
                # complete without awaiting would otherwise run back to back).
                await asyncio.sleep(0)
