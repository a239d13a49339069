"""QMP over WebSocket passes the UNIX socket's wire checks (tests/integration/test_wire.py).

Each case's input goes out as one text frame; each expected reply comes back
as one text frame holding the same bytes without the CR LF.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration import test_wire
from tests.support.web import TOKEN, WebDaemonProcess, WsQmp

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def web_proc() -> Iterator[WebDaemonProcess]:
    with tempfile.TemporaryDirectory(prefix="qmpd-") as tmp:
        proc = WebDaemonProcess(Path(tmp))
        try:
            yield proc
        finally:
            proc.stop()


def frames(expected: list[bytes]) -> list[str]:
    return [line.removesuffix(b"\r\n").decode("ascii") for line in expected]


@pytest.mark.parametrize("data,expected", test_wire.CASES, ids=[c[0][:40].decode("latin-1") for c in test_wire.CASES])
async def test_exact_replies(web_proc: WebDaemonProcess, data: bytes, expected: list[bytes]) -> None:
    client = await WsQmp.connect(web_proc.url)
    try:
        await client.send(data.decode("utf-8") + "\n")
        assert [await client.recv() for _ in expected] == frames(expected)
        assert await client.exchange('{"execute": "query-name", "id": "after"}') == ['{"return": {}, "id": "after"}']
    finally:
        await client.close()


async def test_greeting(web_proc: WebDaemonProcess) -> None:
    client = await WsQmp.connect(web_proc.url, negotiate=False)
    try:
        assert client.greeting == (
            '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, '
            '"package": "qmpd-0.1.0"}, "capabilities": ["oob"]}}'
        )
    finally:
        await client.close()


async def test_negotiation_mode(web_proc: WebDaemonProcess) -> None:
    client = await WsQmp.connect(web_proc.url, negotiate=False)
    try:
        for req in ('{"execute": "query-version", "id": 1}', '{"execute": "nosuch", "id": 1}'):
            assert await client.exchange(req) == [
                '{"id": 1, "error": {"class": "CommandNotFound", '
                "\"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}"
            ]
        assert await client.exchange('{"id": 2}') == frames([test_wire.ge("QMP input lacks member 'execute'", 2)])
        assert await client.exchange('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 3}') == [
            '{"return": {}, "id": 3}'
        ]
        assert await client.exchange('{"exec-oob": "query-name", "id": 4}') == frames(
            [test_wire.ge("The command query-name does not support OOB", 4)])
    finally:
        await client.close()


async def test_several_requests_per_frame_and_binary_frames(web_proc: WebDaemonProcess) -> None:
    client = await WsQmp.connect(web_proc.url)
    try:
        replies = await client.exchange(b'{"execute":"query-status","id":1}{"execute":"query-name",', 1)
        assert replies == ['{"return": {"status": "running", "running": true}, "id": 1}']
        # the rest of the second request arrives in the next frame
        assert await client.exchange('"id":2}') == ['{"return": {}, "id": 2}']
        # invalid UTF-8 in a binary frame is a parse error, and the session goes on
        await client.send(b'{"execute": "query-name" \xff\xfe garbage }')
        first = json.loads(await client.recv())
        assert first["error"]["class"] == "GenericError"
        await client.send('\x1b{"execute": "query-name", "id": 9}')
        while (msg := json.loads(await client.recv())).get("id") != 9:
            assert "error" in msg
        assert msg == {"return": {}, "id": 9}
    finally:
        await client.close()


async def test_events_reach_websocket_clients(web_proc: WebDaemonProcess, tmp_path: Path) -> None:
    a = await WsQmp.connect(web_proc.url)
    b = await WsQmp.connect(web_proc.url)
    try:
        await a.cmd("blockdev-add", **{"driver": "null-co", "node-name": "n0", "size": 1 << 20})
        await a.send(json.dumps({"execute": "blockdev-create", "id": 1, "arguments": {
            "job-id": "c0", "options": {"driver": "file", "filename": str(tmp_path / "x.img"), "size": 0}}}))
        seen = []
        while not seen or seen[-1] != {"id": "c0", "status": "concluded"}:
            msg = json.loads(await b.recv())
            if msg.get("event") == "JOB_STATUS_CHANGE":
                seen.append(msg["data"])
        assert [s["status"] for s in seen] == ["created", "running", "waiting", "pending", "concluded"]
        while "event" in (reply := json.loads(await a.recv())):
            pass
        assert reply == {"return": {}, "id": 1}
        assert await a.cmd("job-dismiss", id="c0") == {"return": {}, "id": "t"}
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("headers,query", [({}, ""), ({"Authorization": "Bearer wrong"}, ""), ({}, "?token=wrong")])
async def test_token_required(web_proc: WebDaemonProcess, headers: dict[str, str], query: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(web_proc.url + "qmp" + query, headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            body = await resp.json()
            assert body["error"]["status"] == 401
        async with session.post(web_proc.url + "api/jobs/x/pause", headers=headers) as resp:
            assert resp.status == 401


async def test_token_in_query(web_proc: WebDaemonProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(web_proc.url + f"qmp?token={TOKEN}") as ws:
            greeting = await ws.receive_str(timeout=10)
            assert greeting.startswith('{"QMP": ')


async def test_read_only_pages_need_no_token(web_proc: WebDaemonProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("", "metrics", "api/state", "static/dashboard.js"):
            async with session.get(web_proc.url + path) as resp:
                assert resp.status == 200, path
        async with session.get(web_proc.url + "nosuch") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == {"status": 404, "desc": "Not Found"}


async def test_quit_over_websocket(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qmpd-") as tmp:
        proc = WebDaemonProcess(Path(tmp))
        try:
            client = await WsQmp.connect(proc.url)
            replies = await client.exchange('{"execute": "quit", "id": 1}', 2)
            assert json.loads(replies[0])["event"] == "SHUTDOWN"
            assert replies[1] == '{"return": {}, "id": 1}'
            await client.close()
            assert proc.proc.wait(10) == 0
            assert not (Path(tmp) / "qmpd.sock").exists()
            assert (Path(tmp) / "token").exists()  # the operator's file is left alone
        finally:
            proc.stop()
