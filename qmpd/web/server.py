"""The web layer: an aiohttp application in the daemon's event loop.

Routes (``--http HOST:PORT``):

==========================  =====  ================================================
``GET /``                   open   the dashboard (assets under ``/static/``)
``GET /live``               open   WebSocket: a dashboard snapshot pushed on change
``GET /api/state``          open   the same snapshot once, as JSON
``GET /metrics``            open   Prometheus text format
``GET /qmp``                token  WebSocket: one QMP session per socket
``POST /api/jobs/ID/VERB``  token  ``pause``, ``resume`` or ``cancel`` a job
==========================  =====  ================================================

It reads the domain through :class:`~qmpd.web.model.WebModel` and changes
state only through :meth:`Daemon.execute <qmpd.server.daemon.Daemon.execute>`,
the dispatcher QMP uses.  One middleware (:func:`_errors`) turns every
exception into an HTTP error with a JSON body, after refusing requests
that a foreign web page could make (:func:`check_origin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from qmpd.protocol.session import Call
from qmpd.web.auth import Token, is_loopback
from qmpd.web.metrics import CONTENT_TYPE, Metrics
from qmpd.web.model import WebModel
from qmpd.web.qmp_ws import MAX_FRAME, WsQmpSession

if TYPE_CHECKING:
    from qmpd.server.daemon import Daemon

__all__ = ["WebServer", "STATIC_DIR", "PUSH_INTERVAL", "QMPReplyError"]

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Seconds between two dashboard pushes while something changes.
PUSH_INTERVAL = 0.5
#: Job verbs the dashboard's buttons may send, and the QMP command of each.
JOB_VERBS = {"pause": "job-pause", "resume": "job-resume", "cancel": "job-cancel"}


class QMPReplyError(Exception):
    """A command sent for a button failed; carries the QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class _WebControl:
    """The SessionControl of requests made by the dashboard's buttons."""

    negotiating = False

    def negotiate(self, oob: bool) -> None:  # pragma: no cover - never negotiates
        raise AssertionError("the dashboard does not negotiate")


#: Host names a loopback-bound server answers to (DNS rebinding defence).
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def check_origin(request: web.Request, loopback_only: bool) -> None:
    """Refuse requests a web page elsewhere could make on the user's behalf.

    * On a loopback-bound server the ``Host`` must be a loopback name, so a
      DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) is refused.
    * A WebSocket handshake carrying an ``Origin`` (browsers always send one)
      must come from this very server: browsers let any page open a
      WebSocket anywhere, and ``/live`` needs no token.

    :raise web.HTTPForbidden: either check failed.
    """
    host = request.host
    if loopback_only:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK_NAMES:
            raise web.HTTPForbidden(reason=f"Host '{host}' is not this server")
    origin = request.headers.get("Origin")
    if origin is not None and request.headers.get("Upgrade", "").lower() == "websocket":
        if origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
            raise web.HTTPForbidden(reason=f"Origin '{origin}' is not this server")


def _errors_middleware(loopback_only: bool) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        return await _errors(request, handler, loopback_only)
    return errors


async def _errors(request: web.Request, handler: Any, loopback_only: bool) -> web.StreamResponse:
    """The one place that turns exceptions into HTTP errors (and that checks
    where a request comes from, see :func:`check_origin`)."""
    try:
        check_origin(request, loopback_only)
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return web.json_response({"error": {"status": err.status, "desc": err.reason}},
                                 status=err.status, headers=_auth_headers(err))
    except QMPReplyError as err:
        return web.json_response({"error": {"class": err.error_class, "desc": err.desc}}, status=409)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("web request %s %s failed", request.method, request.path)
        return web.json_response({"error": {"status": 500, "desc": "Internal error in qmpd; see its log"}},
                                 status=500)


def _auth_headers(err: web.HTTPException) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}


class WebServer:
    """The HTTP side of one daemon.

    :param daemon: a daemon after :meth:`~qmpd.server.daemon.Daemon.setup`.
    :param token: grants ``/qmp`` and the job buttons.
    """

    def __init__(self, daemon: Daemon, host: str, port: int, token: Token) -> None:
        self._daemon = daemon
        self.host, self.port = host, port
        self.token = token
        self.model = WebModel(daemon)
        self.metrics = Metrics(self.model)
        self._runner: web.AppRunner | None = None
        self._sessions: set[web.WebSocketResponse] = set()
        self._viewers = 0
        self._snapshot_text = ""
        self._pushed = asyncio.Event()
        self._pusher: asyncio.Task[None] | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------
    def build_app(self) -> web.Application:
        """:return: the application with its route table (frozen by the runner)."""
        app = web.Application(middlewares=[_errors_middleware(is_loopback(self.host))],
                              client_max_size=1 << 20)
        app.add_routes([
            web.get("/", self._index),
            web.get("/live", self._live),
            web.get("/api/state", self._state),
            web.get("/metrics", self._metrics),
            web.get("/qmp", self._qmp),
            web.post("/api/jobs/{id}/{verb}", self._job_verb),
            web.static("/static", STATIC_DIR),
        ])
        return app

    async def start(self) -> None:
        """Bind and serve; :raise OSError: the address cannot be bound."""
        if not is_loopback(self.host):
            log.warning("--http binds %s, which is not a loopback address: the dashboard, "
                        "the metrics and the event history are readable from the network", self.host)
        self._daemon.request_observer = self.metrics.observe_request
        runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
        except OSError:
            await self.stop()
            raise
        host, port = runner.addresses[0][:2]
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/"
        log.info("dashboard at %s", self.url)

    async def stop(self) -> None:
        """Close every WebSocket, stop serving, forget the token file."""
        if self._daemon.request_observer == self.metrics.observe_request:
            self._daemon.request_observer = None
        for ws in list(self._sessions):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1001, message=b"qmpd is shutting down"), 1.0)
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
            self._pusher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.model.close()
        self.token.remove_file()

    # -- access -----------------------------------------------------------------
    def _require_token(self, request: web.Request) -> None:
        """:raise web.HTTPUnauthorized: no valid token in the header or query."""
        header = request.headers.get("Authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else request.query.get("token")
        if not self.token.check(presented):
            raise web.HTTPUnauthorized(reason="a valid token is required (Authorization: Bearer TOKEN "
                                              "or ?token=TOKEN)")

    # -- read-only pages -------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.model.snapshot())

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _live(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
        await ws.prepare(request)
        self._sessions.add(ws)
        self._viewers += 1
        if self._pusher is None or self._pusher.done():
            self._pusher = self._daemon.tasks.spawn(self._push_loop(), name="web-push")
        sender = self._daemon.tasks.spawn(self._feed(ws), name="web-feed")
        try:
            async for _ in ws:  # nothing to receive; reading handles close and pings
                pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            self._viewers -= 1
            self._sessions.discard(ws)
        return ws

    async def _feed(self, ws: web.WebSocketResponse) -> None:
        await ws.send_str(self._render_snapshot())
        while not ws.closed:
            pushed = self._pushed
            await pushed.wait()
            await ws.send_str(self._snapshot_text)

    def _render_snapshot(self) -> str:
        self.model.changed = False
        self._snapshot_text = json.dumps(self.model.snapshot(), separators=(",", ":"))
        return self._snapshot_text

    async def _push_loop(self) -> None:
        """While anyone watches: a snapshot per interval when something moved."""
        while self._viewers > 0:
            await asyncio.sleep(PUSH_INTERVAL)
            if self.model.changed or self.model.live_jobs():
                self._render_snapshot()
                pushed, self._pushed = self._pushed, asyncio.Event()
                pushed.set()

    # -- state-changing --------------------------------------------------------
    async def _qmp(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, compress=False)
        await ws.prepare(request)
        session = WsQmpSession(self._daemon, ws, request.remote or "?")
        self._sessions.add(ws)
        self.model.web_clients[session.name] = {"name": session.name, "transport": "websocket",
                                                "peer": session.peer}
        try:
            await session.run()
        finally:
            self._sessions.discard(ws)
            self.model.web_clients.pop(session.name, None)
        return ws

    async def _job_verb(self, request: web.Request) -> web.StreamResponse:
        self._require_token(request)
        command = JOB_VERBS.get(request.match_info["verb"])
        if command is None:
            raise web.HTTPNotFound(reason=f"unknown job verb '{request.match_info['verb']}'")
        call = Call(command, {"id": request.match_info["id"]}, None, False)
        reply = await self._daemon.execute(call, _WebControl())
        if "error" in reply:
            raise QMPReplyError(reply["error"]["class"], reply["error"]["desc"])
        log.info("dashboard: %s %s", command, request.match_info["id"])
        return web.json_response({"return": reply["return"]})
