"""Helpers for the web layer: a daemon with ``--http``, WebSocket QMP clients."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from qmpd.web import Token, WebServer
from tests.support.daemon import DaemonProcess, RunningDaemon, running_daemon

TOKEN = "test-token-0123456789"
_URL = re.compile(rb"dashboard at (http://\S+/)")


class WebDaemonProcess(DaemonProcess):
    """``python -m qmpd --http 127.0.0.1:0`` with a known token; ``url`` is its base."""

    def __init__(self, sock_dir: Path, *extra: str) -> None:
        token_file = sock_dir / "token"
        token_file.write_text(TOKEN + "\n")
        super().__init__(sock_dir, "--http", "127.0.0.1:0", "--http-token-file", str(token_file), *extra)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        match = _URL.search(line)
        assert match, line
        self.url = match.group(1).decode()


@dataclass
class WebDaemon:
    running: RunningDaemon
    web: WebServer

    @property
    def url(self) -> str:
        return self.web.url


@contextlib.asynccontextmanager
async def web_daemon(sock_dir: Path, **config: Any) -> AsyncIterator[WebDaemon]:
    """An in-process daemon with its web server on an ephemeral loopback port."""
    async with running_daemon(sock_dir, **config) as running:
        server = WebServer(running.daemon, "127.0.0.1", 0, Token(TOKEN))
        await server.start()
        try:
            yield WebDaemon(running, server)
        finally:
            await server.stop()


class WsQmp:
    """A raw QMP client over WebSocket: frames in, frames out."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws
        self.greeting = ""

    @classmethod
    async def connect(cls, base_url: str, negotiate: bool = True, token: str = TOKEN) -> WsQmp:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(base_url + "qmp", headers={"Authorization": f"Bearer {token}"})
        except BaseException:
            await session.close()
            raise
        client = cls(session, ws)
        client.greeting = await client.recv()
        if negotiate:
            await client.send('{"execute": "qmp_capabilities"}')
            assert await client.recv() == '{"return": {}}'
        return client

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def recv(self, timeout: float = 10.0) -> str:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        text: str = msg.data
        return text

    async def exchange(self, data: str | bytes, replies: int = 1) -> list[str]:
        await self.send(data)
        return [await self.recv() for _ in range(replies)]

    async def cmd(self, name: str, **arguments: Any) -> dict[str, Any]:
        """Execute ``name``; :return: its reply (events before it are dropped)."""
        req: dict[str, Any] = {"execute": name, "id": "t"}
        if arguments:
            req["arguments"] = arguments
        await self.send(json.dumps(req))
        while True:
            msg: dict[str, Any] = json.loads(await self.recv())
            if "event" not in msg:
                return msg

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
