"""Bounded input, output and connections (issue 7, items 1 and 2).

In-process daemons with small limits; real UNIX sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpd.commands.context import DaemonConfig
from qmpd.server.daemon import Daemon
from qmpd.server.limits import Limits
from qmpd.server.listeners import UnixListener
from tests.support.daemon import AsyncRawClient

pytestmark = pytest.mark.asyncio

GE_EXPECTING = b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'
GE_COUNT = b'{"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"}}\r\n'


@contextlib.asynccontextmanager
async def daemon_with(sock_dir: Path, **limits: object) -> AsyncIterator[Daemon]:
    path = str(sock_dir / "qmpd.sock")
    daemon = Daemon(DaemonConfig(qemu_version=(9, 0, 0), package="qmpd-test"), [UnixListener(path)],
                    limits=Limits(**limits))  # type: ignore[arg-type]
    daemon.setup()
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.request_shutdown("host-qmp-quit")
        await daemon.cleanup()


def sock(daemon: Daemon) -> str:
    spec = daemon.listeners[0]
    assert isinstance(spec, UnixListener)
    return spec.path


@pytest.mark.slow
async def test_huge_message_neither_stalls_others_nor_floods_errors(sock_dir: Path) -> None:
    async with daemon_with(sock_dir) as daemon:
        hostile = await AsyncRawClient.connect(sock(daemon))
        witness = await AsyncRawClient.connect(sock(daemon))
        # 1.25 Mi elements: over QEMU's 2 Mi token limit.
        body = b'{"execute": "query-status", "arguments": {"x": [' + b"1," * (5 << 18) + b'1]}}'
        hostile.writer.write(body + b'{"execute": "query-name", "id": 2}')
        first = asyncio.ensure_future(hostile.reader.readline())
        for _ in range(3):
            reply, _ = await witness.execute({"execute": "query-status", "id": "w"})
            assert reply["id"] == "w" and reply["return"]["status"] == "running"
        # The witness was answered while the huge message was still being lexed.
        assert not first.done()
        assert await first == GE_COUNT
        # One error for the whole message, then the next request.
        assert await hostile.reader.readline() == b'{"return": {}, "id": 2}\r\n'
        await hostile.close()
        await witness.close()


async def test_client_that_never_reads_is_aborted(sock_dir: Path) -> None:
    async with daemon_with(sock_dir, max_output=1 << 20) as daemon:
        witness = await AsyncRawClient.connect(sock(daemon))
        reader, writer = await asyncio.open_unix_connection(sock(daemon))
        writer.write(b'{"execute": "qmp_capabilities"}')
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while True:  # never read: replies pile up in the daemon
                writer.write(b'{"execute": "query-qmp-schema"}' * 16)
                await writer.drain()
        reply, _ = await witness.execute({"execute": "query-status", "id": 1})
        assert reply["id"] == 1
        assert daemon.connection_count == 1  # the aborted connection is gone
        writer.close()
        await witness.close()


async def test_max_connections_refuses_clearly_and_frees_slots(sock_dir: Path) -> None:
    async with daemon_with(sock_dir, max_connections=2) as daemon:
        a = await AsyncRawClient.connect(sock(daemon))
        b = await AsyncRawClient.connect(sock(daemon))
        reader, writer = await asyncio.open_unix_connection(sock(daemon))
        assert await reader.readline() == (
            b'{"error": {"class": "GenericError", "desc": "qmpd: too many connections"}}\r\n')
        assert await reader.read() == b""
        writer.close()
        # Closing a connection frees its slot.
        a.writer.write_eof()
        assert await a.reader.read() == b""
        await a.close()
        reply, _ = await b.execute({"execute": "query-name", "id": 1})
        assert reply == {"return": {}, "id": 1}
        assert daemon.connection_count == 1
        c = await AsyncRawClient.connect(sock(daemon))
        assert daemon.connection_count == 2
        await b.close()
        await c.close()


async def test_consecutive_framing_errors_close_the_connection(sock_dir: Path) -> None:
    async with daemon_with(sock_dir, max_framing_errors=5) as daemon:
        client = await AsyncRawClient.connect(sock(daemon))
        client.writer.write(b'}}{"execute": "query-name"}' + b"}" * 10)
        assert await client.reader.readline() == GE_EXPECTING
        assert await client.reader.readline() == GE_EXPECTING
        assert await client.reader.readline() == b'{"return": {}}\r\n'  # resets the count
        for _ in range(5):
            assert await client.reader.readline() == GE_EXPECTING
        assert await client.reader.read() == b""
        await client.close()


async def test_daemon_wide_buffer_budget(sock_dir: Path) -> None:
    async with daemon_with(sock_dir, max_buffer=5 << 20) as daemon:
        first = await AsyncRawClient.connect(sock(daemon))
        second = await AsyncRawClient.connect(sock(daemon))
        head = b'{"execute": "query-name", "id": 1, "arguments": {"a": "'
        first.writer.write(head + b"x" * (3 << 20))
        await first.writer.drain()
        # The first 3 MiB are buffered before the second client starts.
        reply, _ = await second.execute({"execute": "query-status", "id": 0})
        assert reply["id"] == 0
        second.writer.write(head + b"y" * (3 << 20))
        with contextlib.suppress(ConnectionError):
            assert await second.reader.read() == b""  # dropped
        first.writer.write(b'"}}')
        reply = json.loads(await first.reader.readline())
        assert reply["id"] == 1 and reply["error"]["class"] == "GenericError"
        assert daemon.connection_count == 1
        await first.close()
        await second.close()


async def test_unnegotiated_connection_times_out(sock_dir: Path) -> None:
    async with daemon_with(sock_dir, negotiation_timeout=0.05) as daemon:
        reader, writer = await asyncio.open_unix_connection(sock(daemon))
        assert (await reader.readline()).startswith(b'{"QMP"')
        assert await reader.read() == b""
        writer.close()
        # Negotiated connections are not affected.
        client = await AsyncRawClient.connect(sock(daemon))
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.1, done.set_result, None)
        await done
        reply, _ = await client.execute({"execute": "query-name", "id": 1})
        assert reply == {"return": {}, "id": 1}
        await client.close()
