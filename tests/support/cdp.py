"""A minimal Chrome DevTools Protocol client over aiohttp's WebSocket client.

:func:`headless_chromium` starts Debian's ``chromium`` headless with an empty
profile and yields a :class:`Page` for a new tab; :meth:`Page.evaluate` runs
JavaScript (awaiting promises) and :meth:`Page.screenshot` returns a PNG.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

__all__ = ["find_chromium", "headless_chromium", "Page", "CDPError"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1100", "--remote-debugging-port=0"]
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class CDPError(Exception):
    """The browser answered a command with an error."""


def find_chromium() -> str | None:
    """:return: the Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Page:
    """One tab, driven over its own DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = msg.json()
            if "method" in data:
                waiter = self._events.pop(data["method"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data.get("params", {}))
                continue
            fut = self._waiting.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(CDPError("browser connection closed"))

    async def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """:return: the command's ``result``.  :raise CDPError: on an error reply."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` in the page (promises are awaited); :return: its value."""
        result = await self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(f"page exception: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str, timeout: float = 30.0) -> None:
        """Open ``url`` and return once its load event fired."""
        await self.send("Page.enable")
        loaded: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events["Page.loadEventFired"] = loaded
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, timeout)

    async def screenshot(self) -> bytes:
        """:return: a PNG of the page as rendered."""
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@contextlib.asynccontextmanager
async def headless_chromium(executable: str) -> AsyncIterator[Page]:
    """Start Chromium with an empty profile; yield a new blank tab."""
    with tempfile.TemporaryDirectory(prefix="qmpd-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            executable, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stderr is not None
            browser_url = None
            while browser_url is None:
                line = await asyncio.wait_for(proc.stderr.readline(), 60)
                if not line:
                    raise CDPError("chromium exited before listening")
                if match := _LISTENING.search(line):
                    browser_url = match.group(1).decode()
            drain = asyncio.get_running_loop().create_task(proc.stderr.read())
            http_base = "http://" + browser_url.split("/")[2]
            async with aiohttp.ClientSession() as session:
                async with session.put(http_base + "/json/new?about:blank") as resp:
                    target = await resp.json(content_type=None)
                ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20)
                page = Page(ws)
                try:
                    yield page
                finally:
                    await page.close()
            drain.cancel()
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
