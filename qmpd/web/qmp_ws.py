"""QMP over WebSocket: one QMP session per socket, one JSON message per frame.

The adapter is as thin as :mod:`qmpd.server.connection`: frames (text or
binary) are fed to the same stream parser, so a frame may carry one request,
several, or part of one, exactly like bytes on a UNIX socket; the sans-I/O
:class:`~qmpd.protocol.session.Session` checks each request and
:meth:`Daemon.execute <qmpd.server.daemon.Daemon.execute>` runs it.  Every
greeting, reply and event goes out as its own text frame holding QEMU's
encoding of the message without the trailing CR LF.  Replies and events share
one outbound queue, so events never overtake the ``qmp_capabilities`` reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from qmpd.protocol.framing import FramingError, JsonStreamParser, encode
from qmpd.protocol.session import Call, Session, SessionState

if TYPE_CHECKING:
    from qmpd.server.daemon import Daemon

__all__ = ["WsQmpSession", "MAX_FRAME", "MAX_QUEUED_OUT"]

_counter = itertools.count(1)
#: Largest frame accepted (as the UNIX socket's parser cap).
MAX_FRAME = 64 << 20
#: Outbound messages a client may leave unsent before it is disconnected.
MAX_QUEUED_OUT = 65536


class WsQmpSession:
    """One QMP client over a prepared :class:`aiohttp.web.WebSocketResponse`."""

    def __init__(self, daemon: Daemon, ws: web.WebSocketResponse, peer: str) -> None:
        self._daemon = daemon
        self._ws = ws
        self.name = f"websocket#{next(_counter)}"
        self.peer = peer
        self.log = logging.getLogger(f"qmpd.connection.{self.name}")
        self.session = Session(daemon.command_names, daemon.oob_commands)
        self._parser = JsonStreamParser()
        self._out: asyncio.Queue[str | None] = asyncio.Queue()
        self._pending_negotiation = False
        self._negotiate_oob = False
        self._closed = False

    # -- SessionControl ---------------------------------------------------
    @property
    def negotiating(self) -> bool:
        return self.session.state is SessionState.NEGOTIATING

    def negotiate(self, oob: bool) -> None:
        self._pending_negotiation = True
        self._negotiate_oob = oob

    # -- driver -----------------------------------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        if self._closed:
            return
        text = encode(msg)[:-2].decode("ascii")
        if self._daemon.trace:
            self.log.info("<-- %s", text)
        if self._out.qsize() >= MAX_QUEUED_OUT:
            self.log.warning("client is not reading its replies; disconnecting")
            self._closed = True
            self._out.put_nowait(None)
            return
        self._out.put_nowait(text)

    async def _writer(self) -> None:
        ws = self._ws
        while (text := await self._out.get()) is not None:
            try:
                await ws.send_str(text)
            except (ConnectionError, RuntimeError):
                break
        await ws.close()

    async def run(self) -> None:
        """Serve the session until the client or the daemon closes it."""
        daemon = self._daemon
        self.log.info("client connected from %s", self.peer)
        writer = daemon.tasks.spawn(self._writer(), name=f"{self.name}-writer")
        unsubscribe = None
        try:
            self._send(daemon.greeting)
            async for frame in self._ws:
                if frame.type is WSMsgType.TEXT:
                    data = frame.data.encode("utf-8", "surrogatepass")
                elif frame.type is WSMsgType.BINARY:
                    data = frame.data
                else:
                    break
                for item in self._parser.feed(data):
                    if daemon.trace:
                        shown = item.desc if isinstance(item, FramingError) else encode(item)[:-2].decode()
                        self.log.info("--> %s", shown)
                    work = self.session.handle(item)
                    reply = await daemon.execute(work, self) if isinstance(work, Call) else work.msg
                    self._send(reply)
                    if self._pending_negotiation:
                        self._pending_negotiation = False
                        self.session.negotiated(self._negotiate_oob)
                        unsubscribe = daemon.events.subscribe(self._send)
                    if self._closed or daemon.stopping:
                        break
                if self._closed or daemon.stopping:
                    break
        finally:
            if unsubscribe is not None:
                unsubscribe()
            self._closed = True
            self._out.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await writer
            self.log.info("client disconnected")
