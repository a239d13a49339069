"""An NBD connection's data path on a thread of its own.

Once a client of a plain file export (the node is a window of one image
file: :func:`~qmpd.block.fastcopy.file_view`) has finished its handshake
without TLS, :class:`DataPump` serves its socket from an
:class:`~qmpd.tasks.OwnedThread`: a blocking loop that reads requests,
answers READs itself (the reply header, then the file's bytes by
sendfile(2); or data and holes read with pread when a structured reply
has holes to show) and hands every other request (writes, block status,
flush, trim, cache, and reads the node graph no longer allows to read
directly) to the event loop.  The loop's answer comes back as a
:data:`Reply` that the thread applies to the codec and sends.  From the
hand-over on, the thread is the only user of the codec and the only
writer of the socket; everything that touches the node graph's state
(writes, bitmaps, the range lock, block status) stays on the loop.

Why a thread: a backup's reads are nearly all of an export's traffic.
With several connections (nbdcopy opens four when the export advertises
multi-conn) they are served on several CPUs, the GIL being released
during the system calls, and a busy event loop no longer adds its latency
to every reply.

Flow control is the event-loop path's: at most ``depth`` requests are
with the loop at once, of which ``big`` over 1 MiB; further requests stay
in the kernel's socket buffer.  A client that stops reading blocks only
its own thread (in poll(2), woken by :meth:`DataPump.stop`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from qmpd.block.fastcopy import FileView, mark_read
from qmpd.block.io import PinnedFile
from qmpd.nbd.exports import Export
from qmpd.nbd.protocol import CMD_FLAG_DF, Cmd, Request, ServerConnection

__all__ = ["DataPump", "Reply"]

log = logging.getLogger(__name__)

#: What the event loop computed for a request: applied to the codec by
#: the thread (``lambda conn: conn.reply_ok(req)``).
Reply = Callable[[ServerConnection], None]

MiB = 1 << 20
_RECV = 256 * 1024
#: writev(2) takes at most IOV_MAX (1024) buffers.
_IOV = 512
#: Bytes read are reported to the nodes' counters at least this often.
_COUNT_EVERY = 0.05
#: SO_SNDBUF of a pumped connection (the kernel doubles it).  A fast
#: reader drains a few MiB per millisecond; on a loaded machine the pump
#: thread may wait several milliseconds to run again, and the client must
#: still find data queued then.  Measured with nbdcopy at load 6-30:
#: 4 MiB (the listener's) 3.1-4.9 s, 8 MiB 3.5-6.5 s, 16 MiB 1.8-3.0 s,
#: 32 MiB about as 16 MiB, for 2 GiB (notes/issue-11-perf3.md).
PUMP_SEND_BUFFER = 16 * MiB
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def _grow_send_buffer(sock: socket.socket) -> None:
    """Ask for :data:`PUMP_SEND_BUFFER`: beyond ``net.core.wmem_max`` where
    the daemon may (CAP_NET_ADMIN), else as much as that allows.  The
    memory is the kernel's and bounded per connection, like the reply
    buffers QEMU allocates in user space for the requests in flight."""
    for opt in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * PUMP_SEND_BUFFER:
                return
            sock.setsockopt(socket.SOL_SOCKET, opt, PUMP_SEND_BUFFER)
            return
        except OSError:
            continue


class _Gone(Exception):
    """The connection ended (stopped, or the peer went away)."""


class DataPump:
    """Serve one NBD connection's transmission phase (see the module).

    Made on the event loop; :meth:`run` is the thread's body.
    :meth:`post`, :meth:`stop` and :meth:`close` are the loop's side.

    :param sock_fd: the connection's socket (duplicated; the transport
        keeps its own descriptor and must neither read nor write).
    :param conn: the codec, past the handshake; the thread owns it now.
    :param submit: called on the loop for each request it must serve;
        the loop answers with :meth:`post`.
    """

    def __init__(self, sock_fd: int, conn: ServerConnection, export: Export,
                 submit: Callable[[Request, bool], None], *, depth: int, big: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(fileno=os.dup(sock_fd))
        self._sock.setblocking(False)
        _grow_send_buffer(self._sock)
        self._fd = self._sock.fileno()
        self._conn = conn
        self._export = export
        self._submit = submit
        self._depth = depth
        self._big_max = big
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sock_lock = threading.Lock()
        #: Answers from the loop (deque appends and pops are atomic).
        self._replies: deque[tuple[Reply, bool]] = deque()
        self._stopping = False
        self._closed = False
        # Thread side only:
        self._pending: deque[Request] = deque()
        self._inflight = 0
        self._big = 0
        self._pinned: PinnedFile | None = None
        self._base = 0
        #: Cookies of waiting READs whose data was already asked for.
        self._hinted: set[int] = set()
        self._buf = bytearray(_RECV)
        self._counted: tuple[FileView, int] | None = None
        self._counted_at = 0.0
        self._out_poll = select.poll()
        self._out_poll.register(self._fd, select.POLLOUT)
        self._out_poll.register(self._wake_r, select.POLLIN)

    # ------------------------------------------------------------ loop side

    def post(self, reply: Reply, big: bool) -> None:
        """The loop's answer to a submitted request."""
        if self._closed:
            return
        self._replies.append((reply, big))
        self._wake()

    def stop(self) -> None:
        """End the connection (hard export removal, server stop, daemon
        shutdown): the thread stops at its next step and closes its
        descriptor; the peer sees the end when the transport closes its
        own."""
        self._stopping = True
        self._wake()

    def shut_down_socket(self) -> None:
        """For a thread that did not stop in time (stuck reading the
        image): shut the socket down under it, so the peer sees the end."""
        with self._sock_lock:
            if self._sock.fileno() >= 0:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """After the thread ended (or was given up on): release the loop's
        end of the wake-up pipe."""
        if not self._closed:
            self._closed = True
            os.close(self._wake_w)

    def _wake(self) -> None:
        if self._closed:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, BrokenPipeError):
            pass   # full: the thread wakes anyway; broken: it has ended

    # ------------------------------------------------------------ thread side

    def run(self) -> None:
        """The thread's body: serve until the client leaves or
        :meth:`stop`."""
        try:
            self._serve()
        except _Gone:
            pass
        except OSError as exc:
            log.debug("NBD client dropped: %s", exc)
        finally:
            self._report_count(force=True)
            if self._pinned is not None:
                self._pinned.close()
            os.close(self._wake_r)
            with self._sock_lock:
                self._sock.close()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        reading = False
        self._take_events()
        while not self._stopping:
            self._apply_replies()
            self._start_requests()
            self._send_output()
            if self._conn.closed and not self._pending and self._inflight == 0:
                return
            want = not self._conn.closed and not self._pending and self._inflight < self._depth
            if want != reading:
                if want:
                    poller.register(self._fd, select.POLLIN)
                else:
                    poller.unregister(self._fd)
                reading = want
            timeout = None if self._counted is None else _COUNT_EVERY * 1000
            ready = poller.poll(timeout)
            self._report_count(force=not ready)
            for fd, _ in ready:
                if fd == self._wake_r:
                    self._drain_wake()
                else:
                    self._receive()

    def _receive(self) -> None:
        try:
            n = os.readv(self._fd, [self._buf])
        except BlockingIOError:
            return
        except ConnectionError:
            n = 0
        self._conn.receive_data(bytes(memoryview(self._buf)[:n]))
        self._take_events()

    def _take_events(self) -> None:
        for event in self._conn.events():
            if isinstance(event, Request):
                self._pending.append(event)
            # Closed: conn.closed is set; STARTTLS cannot come after GO.

    def _drain_wake(self) -> None:
        try:
            if not os.read(self._wake_r, 4096):
                self._stopping = True   # the loop closed its end
        except BlockingIOError:
            pass

    def _apply_replies(self) -> None:
        while self._replies:
            reply, big = self._replies.popleft()
            self._inflight -= 1
            self._big -= big
            reply(self._conn)

    def _start_requests(self) -> None:
        if len(self._pending) > 1:
            self._read_ahead()
        while self._pending and not self._stopping:
            req = self._pending[0]
            if req.cmd == Cmd.READ and self._read(req):
                self._pending.popleft()
                continue
            big = req.length > MiB
            if self._inflight >= self._depth or (big and self._big >= self._big_max):
                return
            self._pending.popleft()
            self._inflight += 1
            self._big += big
            self._loop.call_soon_threadsafe(self._submit, req, big)

    def _read_ahead(self) -> None:
        """Ask for the data of the READs waiting behind the first, so an
        image that is not in the page cache is read with a deep queue
        (each READ's sendfile would otherwise wait for the disk alone)."""
        pinned, base = self._pinned, self._base
        if pinned is None:
            return
        for req in self._pending:
            if req.cmd == Cmd.READ and req.cookie not in self._hinted:
                self._hinted.add(req.cookie)
                pinned.will_need(req.offset + base, req.length)

    def _read(self, req: Request) -> bool:
        """Serve a READ here when the node is still a plain file window;
        :return: whether it did (False: the loop serves it)."""
        self._hinted.discard(req.cookie)
        view = self._export.file_view_for_read(req.offset, req.length)
        if view is None:
            return False
        pinned = self._pinned
        if pinned is None or pinned.image is not view.image:
            if pinned is not None:
                pinned.close()
            self._pinned = pinned = PinnedFile(view.image)
        self._base = view.base
        offset = req.offset + view.base
        self._send_output()   # what the codec holds goes before this reply
        if self._conn.structured and not req.flags & CMD_FLAG_DF and not pinned.all_data(offset, req.length):
            try:
                segments = pinned.read_sparse(offset, req.length, base=view.base)
            except OSError as exc:
                self._conn.reply_error(req, exc.errno or errno.EIO, os.strerror(exc.errno or errno.EIO))
                return True
            self._conn.reply_read(req, segments)
        elif not pinned.send(self._sock, self._conn.read_data_header(req), offset, req.length,
                             self._wait_writable):
            raise _Gone
        self._count(view, req.length)
        return True

    def _send_output(self) -> None:
        views = [memoryview(b) for b in self._conn.buffers_to_send()]
        while views:
            try:
                n = os.writev(self._fd, views[:_IOV])
            except BlockingIOError:
                if not self._wait_writable():
                    raise _Gone from None
                continue
            while n:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def _wait_writable(self) -> bool:
        """Block until the socket takes more; False once stopped."""
        while not self._stopping:
            for fd, _ in self._out_poll.poll():
                if fd == self._fd:
                    return True
                self._drain_wake()
        return False

    def _count(self, view: FileView, nbytes: int) -> None:
        """Bytes read, reported to the nodes' counters from the loop."""
        if self._counted is not None and self._counted[0] != view:
            self._report_count(force=True)
        prev = self._counted[1] if self._counted is not None else 0
        self._counted = (view, prev + nbytes)
        self._report_count(force=False)

    def _report_count(self, *, force: bool) -> None:
        if self._counted is None:
            return
        now = time.monotonic()
        if not force and now - self._counted_at < _COUNT_EVERY:
            return
        view, nbytes = self._counted
        self._counted = None
        self._counted_at = now
        try:
            self._loop.call_soon_threadsafe(mark_read, view, nbytes)
        except RuntimeError:
            pass   # the loop is closed
