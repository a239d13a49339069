"""A UNIX-socket transport that also receives file descriptors.

asyncio's (and uvloop's) socket transports read with recv(2) and drop
ancillary data, so descriptors a client sends with SCM_RIGHTS (``getfd``,
``add-fd``) would be lost.  :class:`FdTransport` reads with recvmsg(2)
from a ``loop.add_reader`` callback and hands descriptors to the
protocol's ``fds_received`` *before* the bytes that came with them, so the
command those bytes hold finds them.  Writing, flow control and closing
behave like asyncio's transport: ``write`` sends at once and buffers what
the socket did not take; ``get_write_buffer_size``, ``pause_reading`` /
``resume_reading``, ``close`` (flushes first) and ``abort`` (drops the
buffer) are what :class:`qmpd.server.connection.Connection` relies on.

At most :data:`MAX_FDS_PER_MESSAGE` descriptors are accepted per message,
as QEMU's socket chardev: the kernel closes the ones that do not fit.

:class:`FdServer` accepts connections on a listening UNIX socket and gives
each one an :class:`FdTransport`; it has the ``close`` / ``wait_closed``
of the asyncio server it replaces.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["FdReceiver", "FdServer", "FdTransport", "MAX_FDS_PER_MESSAGE"]

log = logging.getLogger(__name__)

#: Descriptors taken from one message (QEMU's TCP_MAX_FDS).
MAX_FDS_PER_MESSAGE = 16
#: Bytes read per recvmsg call (asyncio's selector transport reads 256 KiB).
READ_SIZE = 256 << 10
#: Seconds accepting pauses after accept(2) failed (EMFILE and the like).
ACCEPT_RETRY_DELAY = 1.0
_HIGH_WATER = 64 << 10
_LOW_WATER = 16 << 10
#: Buffered chunks handed to one sendmsg(2) call (IOV_MAX is 1024).
_MAX_IOV = 64


@runtime_checkable
class FdReceiver(Protocol):
    """A protocol that takes descriptors (it owns them from then on)."""

    def fds_received(self, fds: list[int]) -> None: ...


class FdTransport(asyncio.Transport):
    """One accepted UNIX stream socket (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.Protocol) -> None:
        super().__init__({"socket": sock})
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._protocol = protocol
        self._takes_fds = isinstance(protocol, FdReceiver)
        # Unsent output as the chunks written (no copying into one growing
        # buffer: a client that does not read would make the daemon copy
        # and re-allocate tens of MiB, which the allocator keeps resident).
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        #: Bytes of ``_buffer[0]`` already sent.
        self._head = 0
        self._closing = False
        self._lost = False
        self._reading = False
        self._writing_paused = False
        sock.setblocking(False)
        loop.call_soon(self._start)

    def _start(self) -> None:
        self._protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # -- reading ----------------------------------------------------------
    def _read_ready(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self._sock, READ_SIZE, MAX_FDS_PER_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if fds:
            if self._takes_fds and not self._closing:
                self._protocol.fds_received(fds)  # type: ignore[attr-defined]
            else:
                for fd in fds:
                    os.close(fd)
        if data:
            self._protocol.data_received(data)
            return
        if fds:
            return  # descriptors with no payload byte: not end of file
        self.pause_reading()
        if not self._protocol.eof_received():
            self.close()

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fileno)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fileno, self._read_ready)

    # -- writing ----------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            chunk = bytes(memoryview(data)[sent:]) if sent else bytes(data)
            self._loop.add_writer(self._fileno, self._write_ready)
        else:
            chunk = bytes(data)  # no copy when data is bytes
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        self._maybe_pause_writing()

    def _write_ready(self) -> None:
        chunks = self._buffer
        if not chunks:
            return
        views: list[bytes | memoryview] = [memoryview(chunks[0])[self._head:]]
        views += itertools.islice(chunks, 1, _MAX_IOV)
        try:
            sent = self._sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        self._buffered -= sent
        sent += self._head
        while chunks and sent >= len(chunks[0]):
            sent -= len(chunks.popleft())
        self._head = sent
        if self._writing_paused and self._buffered <= _LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._loop.remove_writer(self._fileno)
            if self._closing:
                self._lose(None)

    def _maybe_pause_writing(self) -> None:
        if not self._writing_paused and self._buffered > _HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return _LOW_WATER, _HIGH_WATER

    def can_write_eof(self) -> bool:
        return False

    # -- closing ----------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; close once the buffered output is sent."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        """Close now, dropping buffered output."""
        if self._lost:
            return
        self._closing = True
        self.pause_reading()
        if self._buffer:
            self._drop_output()
            self._loop.remove_writer(self._fileno)
        self._loop.call_soon(self._lose, None)

    def _fatal(self, exc: OSError) -> None:
        if self._lost:
            return
        self._closing = True
        self.pause_reading()
        self._drop_output()
        self._loop.remove_writer(self._fileno)
        self._loop.call_soon(self._lose, exc)

    def _drop_output(self) -> None:
        self._buffer.clear()
        self._buffered = self._head = 0

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol
        self._takes_fds = isinstance(protocol, FdReceiver)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


class FdServer:
    """Accepts on a listening UNIX socket; each client gets an :class:`FdTransport`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], backlog: int) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._factory = factory
        self._backlog = backlog
        self.sockets = [sock]
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        sock = self._sock
        for _ in range(self._backlog):
            if sock is None:
                return
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE...): the pending connect would
                # wake us at once, again and again; stop accepting for a
                # second, as asyncio's own server does.
                log.warning("accept failed: %s; pausing accepts for %gs", exc, ACCEPT_RETRY_DELAY)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            try:
                protocol = self._factory()
            except Exception:  # noqa: BLE001 - one bad connection must not stop the listener
                log.exception("protocol factory failed")
                conn.close()
                continue
            FdTransport(self._loop, conn, protocol)

    def _resume_accepting(self) -> None:
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def close(self) -> None:
        """Stop accepting (open connections are the daemon's to close)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []

    async def wait_closed(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<FdServer {self.sockets!r}>"
