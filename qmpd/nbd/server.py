"""The NBD server: listeners, the export table and one task per client.

:class:`NbdServer` is what the QMP commands drive (``nbd-server-start``,
``block-export-add`` ...), with QEMU 7.2's checks and texts (recorded in
tests/transcripts/nbd_exports.qmp).  Each client runs in its own task: a
thin adapter that feeds bytes to the sans-I/O
:class:`~qmpd.nbd.protocol.ServerConnection`, runs the requests it yields
against the :class:`~qmpd.nbd.exports.Export` (several at once, replies
in completion order) and writes what the codec queued.  A client's
failure ends that client only.

After the handshake, a client of a plain file export (no TLS) is served
by a :class:`~qmpd.nbd.pump.DataPump` on a thread of its own (up to
:data:`MAX_PUMPS` at once): READs are answered there, everything else is
still run here on the event loop.

``max-connections`` works as QEMU's: a connection beyond the limit is
accepted by the kernel but gets no greeting until another client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex, cast

from qmpd.bitmap import DirtyBitmap
from qmpd.bitmap.errors import BitmapError
from qmpd.block.errors import BlockIOError
from qmpd.block.fastcopy import file_view
from qmpd.block.graph import BlockGraph
from qmpd.block.node import BlockNode
from qmpd.commands.objects import TlsCredsX509
from qmpd.errors import GenericError
from qmpd.events import EventBus
from qmpd.events.names import BLOCK_EXPORT_DELETED
from qmpd.nbd.exports import Export, ExportSettings
from qmpd.nbd.pump import DataPump, Reply
from qmpd.nbd.protocol import (CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
                               MAX_STRING, Closed, Cmd, ExportInfo, Request, ServerConnection,
                               StartTLS)
from qmpd.server.listeners import (
    BindError, Listener, OwnedPath, TcpListener, UnixListener, open_listener,
)
from qmpd.tasks import OwnedThread, TaskGroup

__all__ = ["NbdServer", "ExportRequest", "BLOCK_EXPORT_DELETED"]

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Requests of one client run at once (more wait in the socket).
CLIENT_DEPTH = 64
#: Of those, requests over 1 MiB (their replies stay buffered until the
#: client reads them, so this bounds a client's memory to about 80 MiB).
CLIENT_BIG = 2
#: SO_SNDBUF of client sockets.
SEND_BUFFER = 4 * MiB
#: Connections served by a data-pump thread at once (more use the loop).
MAX_PUMPS = 16
#: How long a stopped pump thread is waited for.
PUMP_STOP_WAIT = 1.0
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """``block-export-add`` / ``nbd-server-add`` arguments, flattened."""

    id: str
    node_name: str
    name: str | None = None
    description: str | None = None
    writable: bool = False
    writethrough: bool = False
    bitmaps: tuple[str, ...] = ()
    allocation_depth: bool = False
    #: nbd-server-add: the node is found as a device.
    legacy: bool = False


class NbdServer:
    """The daemon's NBD server and its exports.

    :param graph: the block graph exports read and write through.
    :param events: where ``BLOCK_EXPORT_DELETED`` goes.
    """

    def __init__(self, graph: Callable[[], BlockGraph], events: EventBus, *,
                 tls_creds: Callable[[str], TlsCredsX509 | None] = lambda _id: None,
                 tasks: TaskGroup | None = None,
                 drained: Callable[[Collection[BlockNode]], None] = lambda _nodes: None) -> None:
        self._graph = graph
        #: Where per-request tasks run (the daemon's group, or one of its own).
        self.tasks = tasks if tasks is not None else TaskGroup("nbd")
        self._events = events
        self._tls_lookup = tls_creds
        self._drained = drained
        #: The server's TLS context once started with tls-creds (STARTTLS
        #: then required).
        self.tls: ssl.SSLContext | None = None
        #: Exports in creation order (query-block-exports lists newest first).
        self.exports: dict[str, Export] = {}
        self._server: asyncio.base_events.Server | None = None
        self._owned: OwnedPath | None = None
        self._slots: asyncio.Semaphore | None = None
        self._clients: set[_Client] = set()
        #: Clients served by a data-pump thread right now.
        self.pumps = 0

    # ------------------------------------------------------------ server

    @property
    def running(self) -> bool:
        """``nbd-server-start`` succeeded and no stop since."""
        return self._server is not None

    async def start(self, addr: dict[str, Any], *, max_connections: int = 0,
                    tls_creds: str | None = None, tls_authz: str | None = None) -> None:
        """nbd-server-start / ``--nbd-server``; ``addr`` is a flat
        SocketAddress (``type`` unix/inet).

        :raise GenericError: already running, TLS asked for, bind failure.
        """
        return await self.start_listener(listener_of(addr), max_connections=max_connections,
                                         tls_creds=tls_creds, tls_authz=tls_authz)

    async def start_listener(self, addr: Listener, *, max_connections: int = 0,
                             tls_creds: str | None = None, tls_authz: str | None = None) -> None:
        """:meth:`start` on a listener spec."""
        if self.running:
            raise GenericError("NBD server already running")
        tls: ssl.SSLContext | None = None
        if tls_creds is not None:
            creds = self._tls_lookup(tls_creds)
            if creds is None:
                raise GenericError(f"No TLS credentials with id '{tls_creds}'")
            if creds.endpoint != "server":
                raise GenericError("Expected TLS credentials for a server endpoint")
            if tls_authz is not None:
                # QEMU checks clients against an authz object; qmpd has none.
                raise GenericError("tls-authz is not supported by qmpd")
            tls = creds.context
        # Without tls-creds QEMU 7.2 accepts and ignores tls-authz; so do we.
        try:
            self._server, self._owned = await open_listener(addr, self._protocol)
        except BindError as exc:
            raise GenericError(str(exc)) from exc
        except OSError as exc:
            where = addr.path if isinstance(addr, UnixListener) else f"{addr.host}:{addr.port}"
            raise GenericError(f"Failed to bind socket to {where}: {exc.strerror or exc}") from exc
        self.tls = tls
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None
        log.info("NBD server listening on %s",
                 addr.path if isinstance(addr, UnixListener) else f"{addr.host}:{addr.port}")

    async def stop(self) -> None:
        """nbd-server-stop: remove every export (dropping clients), close
        the listener.  :raise GenericError: not running."""
        if not self.running:
            raise GenericError("NBD server not running")
        for exp in list(self.exports.values()):
            self._shut_down(exp)
        self._close_listener()
        self.tls = None
        for client in list(self._clients):
            client.abort()
        log.info("NBD server stopped")

    async def cleanup(self) -> None:
        """Daemon shutdown: like :meth:`stop` when running, then wait briefly
        for the client tasks."""
        if self.running:
            await self.stop()
        tasks = [c.task for c in self._clients if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._owned is not None:
            self._owned.remove()  # only if it is still the socket bound here
            self._owned = None

    def _protocol(self) -> asyncio.Protocol:
        reader = _Reader(limit=1 << 20)
        return asyncio.StreamReaderProtocol(reader, lambda _r, writer: self._connected(reader, writer))

    def _connected(self, reader: _Reader, writer: asyncio.StreamWriter) -> None:
        """A client connected: serve it on a task of the server's group (not
        on asyncio's own callback task, which must never be cancelled)."""
        sock = writer.get_extra_info("socket")
        if sock is not None:   # room for a few READ replies: fewer partial writes
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # drain() waits only when several replies are unread, not after each.
        writer.transport.set_write_buffer_limits(high=SEND_BUFFER * 2, low=SEND_BUFFER)
        client = _Client(self, reader, writer)
        self._clients.add(client)
        client.task = self.tasks.spawn(self._serve_client(client), name="nbd-client")

    async def _serve_client(self, client: _Client) -> None:
        try:
            if self._slots is None:
                await client.run()
            else:
                async with self._slots:
                    await client.run()
        finally:
            self._clients.discard(client)
            client.detach()

    # ------------------------------------------------------------ catalog

    def lookup(self, name: str) -> ExportInfo | None:
        """:return: the live export called ``name`` (handshake)."""
        exp = self.by_name(name)
        return exp.info() if exp is not None and not exp.shutting_down else None

    def listing(self) -> Sequence[ExportInfo]:
        """:return: every live export, newest first (NBD_OPT_LIST)."""
        return [e.info() for e in reversed(self.exports.values()) if not e.shutting_down]

    def by_name(self, name: str) -> Export | None:
        """:return: the export with NBD name ``name``, or None."""
        for exp in self.exports.values():
            if exp.name == name:
                return exp
        return None

    # ------------------------------------------------------------ exports

    def add(self, **kwargs: Any) -> None:
        """block-export-add type=nbd / nbd-server-add (the fields of
        :class:`ExportRequest`).  :raise GenericError: with QEMU's text."""
        self.add_export(ExportRequest(**kwargs))

    def add_export(self, req: ExportRequest) -> Export:
        """:meth:`add` with its arguments as one value."""
        # block-export-add checks the id and the node before the driver
        # (QEMU 7.2's blk_exp_add); nbd-server-add the server first.
        if req.legacy and not self.running:
            raise GenericError("NBD server not running")
        if not req.legacy:
            if not _ID_RE.match(req.id):
                raise GenericError("Invalid block export id")
            if req.id in self.exports:
                raise GenericError(f"Block export id '{req.id}' is already in use")
        graph = self._graph()
        node = graph.get(req.node_name)
        if node is None:
            raise GenericError(f"Cannot find device='' nor node-name='{req.node_name}'")
        if not self.running:
            raise GenericError("NBD server not running")
        name = req.name if req.name is not None else req.node_name
        if len(name.encode()) > MAX_STRING:
            raise GenericError(f"export name '{name}' too long")
        if req.description is not None and len(req.description.encode()) > MAX_STRING:
            raise GenericError(f"description '{req.description}' too long")
        if self.by_name(name) is not None:
            raise GenericError(f"NBD server already has export named '{name}'")
        if req.legacy and req.id in self.exports:
            raise GenericError(f"Block export id '{req.id}' is already in use")
        bitmaps: dict[str, DirtyBitmap] = {}
        for bname in req.bitmaps:
            bm = _find_bitmap(node, bname)
            if bm is None:
                raise GenericError(f"Bitmap '{bname}' is not found")
            try:
                bm.check(readonly=False)
            except BitmapError as exc:
                raise GenericError(exc.desc) from exc
            if not req.writable and bm.enabled:
                raise GenericError(f"Enabled bitmap '{bname}' incompatible with readonly export")
            bitmaps[bname] = bm
        if req.writable and node.read_only:
            raise GenericError("Cannot export read-only node as writable")
        settings = ExportSettings(
            id=req.id, name=name, description=req.description or "",
            writable=req.writable, writethrough=req.writethrough,
            allocation_depth=req.allocation_depth,
        )
        exp = Export(settings, node, bitmaps)
        exp.open()
        self.exports[req.id] = exp
        log.info("export %s added (node %s, NBD name '%s', %s%s)", req.id, node.node_name, name,
                 "writable" if req.writable else "read-only",
                 "".join(f", bitmap {b}" for b in bitmaps))
        return exp

    def delete(self, export_id: str, mode: str = "safe") -> None:
        """block-export-del / nbd-server-remove.

        Safe mode refuses while clients are attached (QEMU 7.2); hard mode
        drops them.  ``BLOCK_EXPORT_DELETED`` follows once the last client
        is gone (at once without clients).

        :raise GenericError: unknown id, still in use, already going.
        """
        exp = self.exports.get(export_id)
        if exp is None:
            raise GenericError(f"Export '{export_id}' is not found")
        if exp.shutting_down:
            raise GenericError(f"Block export '{export_id}' is already shutting down")
        if mode == "safe" and exp.clients:
            raise GenericError(f"export '{export_id}' still in use")
        self._shut_down(exp)

    def _shut_down(self, exp: Export) -> None:
        exp.shutting_down = True
        if exp.clients == 0:
            self._finish(exp)
            return
        for client in list(self._clients):
            if client.export is exp:
                client.abort()

    def _finish(self, exp: Export) -> None:
        if self.exports.get(exp.id) is exp:
            del self.exports[exp.id]
            exp.close()
            # QEMU drains the node twice as the export's BlockBackend
            # leaves it: jobs holding it or a node above it show two
            # paused/running pairs before the event (recorded from QSD 7.2).
            above = _node_and_parents(exp.node)
            for _ in range(2):
                self._drained(above)
            log.info("export %s removed", exp.id)
            self._events.emit(BLOCK_EXPORT_DELETED, {"id": exp.id})

    def client_left(self, exp: Export) -> None:
        """A client of ``exp`` disconnected."""
        exp.clients -= 1
        if exp.shutting_down and exp.clients == 0:
            self._finish(exp)

    def query(self) -> list[dict[str, Any]]:
        """:return: query-block-exports (newest first)."""
        return [{"id": e.id, "type": "nbd", "node-name": e.node.node_name,
                 "shutting-down": e.shutting_down} for e in reversed(self.exports.values())]


def _node_and_parents(node: BlockNode) -> list[BlockNode]:
    """``node`` and every node above it (what a drain of it reaches)."""
    out = [node]
    i = 0
    while i < len(out):
        for parent in out[i].parents:
            if all(parent is not n for n in out):
                out.append(parent)
        i += 1
    return out


def _find_bitmap(node: BlockNode, name: str) -> DirtyBitmap | None:
    """QEMU looks down the chain of filtered/file children for the bitmap."""
    seen: BlockNode | None = node
    while seen is not None:
        bm = seen.bitmaps.find(name)
        if bm is not None:
            return bm
        seen = seen.filtered_child or seen.children.get("file")
    return None


class _Reader(asyncio.StreamReader):
    """A StreamReader that tells how much it holds (handing a connection
    to its data pump must not lose what was already read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self._received = 0
        self._taken = 0

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        assert isinstance(data, (bytes, bytearray))   # what transports deliver
        self._received += len(data)
        super().feed_data(data)

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self._taken += len(data)
        return data

    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._received - self._taken


class _Client:
    """One NBD client: the transport adapter around a ServerConnection."""

    def __init__(self, server: NbdServer, reader: _Reader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = ServerConnection(server, tls=server.tls is not None)
        self.export: Export | None = None
        self.task: asyncio.Task[Any] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._depth = asyncio.Semaphore(CLIENT_DEPTH)
        self._big = asyncio.Semaphore(CLIENT_BIG)
        #: The plain socket's descriptor for sendfile replies (-1 under TLS).
        sock = writer.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None and server.tls is None else -1
        #: Set when the handshake ended on a plain file export: serve the
        #: rest from a data pump.
        self._pump_wanted = False
        self._pump: DataPump | None = None

    def abort(self) -> None:
        """Drop the connection (hard export removal, server stop)."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def detach(self) -> None:
        """Close the transport; count the export's client out."""
        for t in self._running:
            t.cancel()
        self.writer.transport.abort()
        if self.export is not None:
            exp, self.export = self.export, None
            self.server.client_left(exp)

    async def _until_sent(self) -> None:
        """Wait until the transport has handed all it holds to the kernel."""
        self._flush()
        transport = self.writer.transport
        if transport.get_write_buffer_size() == 0:
            return
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self.writer.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=SEND_BUFFER * 2, low=SEND_BUFFER)

    def _sendfile_ok(self, req: Request) -> bool:
        """sendfile only for whole-data replies the codec would send as one
        chunk anyway, and only when the codec has nothing queued."""
        return req.length > 0 and not self.conn.has_output()

    def _flush(self) -> None:
        bufs = self.conn.buffers_to_send()
        if bufs and not self.writer.is_closing():
            self.writer.writelines(bufs)

    async def run(self) -> None:
        """Greet, then serve until the client or the server ends it."""
        self._flush()
        try:
            while not self.conn.closed:
                data = await self.reader.read(1 << 20)
                self.conn.receive_data(data)
                if not await self._dispatch():
                    break
                self._flush()
                await self.writer.drain()
                if self._pump_wanted:
                    await self._run_pumped()
                    return
            if self._running:
                await asyncio.wait(set(self._running))
            self._flush()
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
        except (OSError, asyncio.IncompleteReadError) as exc:   # incl. ssl.SSLError
            log.debug("NBD client dropped: %s", exc)

    async def _dispatch(self) -> bool:
        if self.export is None and self.conn.export is not None:
            exp = self.server.by_name(self.conn.export.name)
            if exp is None or exp.shutting_down:
                return False
            self.export = exp
            exp.clients += 1
            if self._fd >= 0 and self.server.pumps < MAX_PUMPS and file_view(exp.node, for_write=False):
                # The requests already parsed wait in the codec for the pump.
                self._pump_wanted = True
                return True
        for event in self.conn.events():
            if isinstance(event, Closed):
                log.debug("NBD client closed: %s", event.reason)
                return True
            if isinstance(event, StartTLS):
                await self._start_tls()
                continue
            if self.export is None:
                return False
            if self._fd >= 0 and event.cmd == Cmd.READ:
                # The page-cache path writes straight to the socket: wait
                # until what the transport holds has gone (the kernel still
                # has SEND_BUFFER queued for the client, so the pipe stays
                # full; a client that stops reading stops this one here).
                await self._until_sent()
            if self._served_at_once(event):
                continue
            await self._depth.acquire()
            big = event.length > MiB
            if big:
                await self._big.acquire()
            task = self.server.tasks.spawn(self._serve(event, big), name="nbd-request")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return True

    def _served_at_once(self, req: Request) -> bool:
        """Answer a READ from the page cache without a task (the common
        case of a backup reading a warm image); :return: whether it did."""
        if req.cmd != Cmd.READ:
            return False
        pending = self.writer.transport.get_write_buffer_size()
        if pending >= SEND_BUFFER:
            return False   # the client is not reading: take the bounded path
        assert self.export is not None
        if pending == 0 and self._fd >= 0 and self._sendfile_ok(req):
            # Nothing queued before it: header and data go straight to the
            # socket, the data by sendfile (no copy through Python).
            rest = self.export.send_cached(self._fd, self.conn.read_data_header(req),
                                           req.offset, req.length)
            if rest is not None:
                if rest:   # the socket was full: the transport sends the rest
                    self.writer.write(rest)
                return True
        if not self.conn.structured or req.flags & CMD_FLAG_DF:
            return False
        segments = self.export.read_cached(req.offset, req.length)
        if segments is None:
            return False
        self.conn.reply_read(req, segments)
        self._flush()
        return True

    async def _start_tls(self) -> None:
        """Answer STARTTLS: flush the ACK, then handshake (failures end the
        client with ssl.SSLError)."""
        assert self.server.tls is not None
        self._flush()
        await self.writer.drain()
        self._fd = -1
        await self.writer.start_tls(self.server.tls)
        self.writer.transport.set_write_buffer_limits(high=SEND_BUFFER * 2, low=SEND_BUFFER)
        self.conn.tls_started()

    async def _run_pumped(self) -> None:
        """Hand the connection to a data pump thread and wait for its end
        (cancelled: stop it, wait briefly)."""
        # (uvloop's transports are not asyncio.Transport subclasses.)
        transport = cast(asyncio.Transport, self.writer.transport)
        await self._until_sent()
        transport.pause_reading()
        while self.reader.buffered():   # read() never waits while it holds bytes
            self.conn.receive_data(await self.reader.read(1 << 20))
            transport.pause_reading()   # reading resumed if the reader had paused it
        if self.reader.at_eof():
            self.conn.receive_data(b"")
        assert self.export is not None
        self._pump = pump = DataPump(self._fd, self.conn, self.export, self._submit,
                                     depth=CLIENT_DEPTH, big=CLIENT_BIG)
        self.server.pumps += 1
        try:
            done = OwnedThread(pump.run, name="nbd-pump").start()
        except BaseException:
            self.server.pumps -= 1
            pump.close()
            raise
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            pump.stop()
            await asyncio.wait([done], timeout=PUMP_STOP_WAIT)
            raise
        finally:
            pump.stop()
            if not done.done():
                pump.shut_down_socket()
            for t in self._running:
                t.cancel()
            pump.close()
            self.server.pumps -= 1
            self._pump = None

    def _submit(self, req: Request, big: bool) -> None:
        """A request the pump hands to the loop (called on the loop)."""
        pump = self._pump
        if pump is None:
            return
        try:
            task = self.server.tasks.spawn(self._serve_for(pump, req, big), name="nbd-request")
        except RuntimeError:   # the daemon is shutting down
            return
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _serve_for(self, pump: DataPump, req: Request, big: bool) -> None:
        pump.post(await self._answer(req), big)

    async def _answer(self, req: Request) -> Reply:
        """:return: the reply to ``req`` (errors included), for the codec."""
        try:
            return await self._run_request(req)
        except BlockIOError as exc:
            err = exc.errno or errno.EIO
            message = os.strerror(err)
        except OSError as exc:
            err, message = errno.EIO, str(exc)
        return lambda conn: conn.reply_error(req, err, message)

    async def _serve(self, req: Request, big: bool) -> None:
        try:
            (await self._answer(req))(self.conn)
            self._flush()
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()   # the slot frees once the client reads
        finally:
            self._depth.release()
            if big:
                self._big.release()

    async def _run_request(self, req: Request) -> Reply:
        exp = self.export
        assert exp is not None
        fua = bool(req.flags & CMD_FLAG_FUA)
        if req.cmd == Cmd.READ:
            # DF: one OFFSET_DATA chunk, holes included.  (Structured or
            # not is fixed at the handshake: reading it here is safe.)
            holes = self.conn.structured and not req.flags & CMD_FLAG_DF
            segments = await exp.read(req.offset, req.length, holes=holes)
            return lambda conn: conn.reply_read(req, segments)
        if req.cmd == Cmd.WRITE:
            await exp.write(req.offset, req.data, fua=fua)
        elif req.cmd == Cmd.WRITE_ZEROES:
            await exp.write_zeroes(req.offset, req.length,
                                   may_unmap=not req.flags & CMD_FLAG_NO_HOLE,
                                   fast=bool(req.flags & CMD_FLAG_FAST_ZERO), fua=fua)
        elif req.cmd == Cmd.TRIM:
            await exp.trim(req.offset, req.length, fua=fua)
        elif req.cmd == Cmd.FLUSH:
            await exp.flush()
        elif req.cmd == Cmd.CACHE:
            await exp.cache(req.offset, req.length)
        elif req.cmd == Cmd.BLOCK_STATUS:
            one = bool(req.flags & CMD_FLAG_REQ_ONE)
            answers = [(ctx_id, await exp.block_status(name, req.offset, req.length, one))
                       for ctx_id, name in req.contexts]
            return lambda conn: conn.reply_block_status(req, answers)
        return lambda conn: conn.reply_ok(req)


def listener_of(addr: dict[str, Any]) -> Listener:
    """:return: the listener of a SocketAddress (flat) dict."""
    if addr["type"] == "unix":
        return UnixListener(str(addr["path"]), label="nbd")
    return TcpListener(str(addr["host"]), int(addr["port"]), label="nbd")
