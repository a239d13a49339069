"""--allowed-dir, created-file modes and the TCP warning (issue 7, item 7)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmpd.commands.context import DaemonConfig
from qmpd.server.daemon import Daemon
from qmpd.server.listeners import TcpListener, UnixListener
from tests.support.daemon import AsyncRawClient

pytestmark = pytest.mark.asyncio
OUTSIDE = "Permission denied (outside every --allowed-dir)"


@contextlib.asynccontextmanager
async def confined(sock_dir: Path, *dirs: Path) -> AsyncIterator[AsyncRawClient]:
    path = str(sock_dir / "qmpd.sock")
    daemon = Daemon(DaemonConfig(qemu_version=(9, 0, 0), package="qmpd-test"), [UnixListener(path)],
                    allowed_dirs=[str(d) for d in dirs])
    daemon.setup()
    await daemon.start()
    client = await AsyncRawClient.connect(path)
    try:
        yield client
    finally:
        await client.close()
        await daemon.request_shutdown("host-qmp-quit")
        await daemon.cleanup()


async def _add_file(client: AsyncRawClient, node: str, path: str) -> dict[str, Any]:
    reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
        "driver": "file", "node-name": node, "filename": path}})
    return reply


async def test_paths_must_resolve_beneath_an_allowed_dir(sock_dir: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"s" * 65536)
    (allowed / "ok.img").write_bytes(b"o" * 65536)
    (allowed / "link.img").symlink_to(secret)
    (allowed / "abs").symlink_to(tmp_path)
    async with confined(sock_dir, allowed) as client:
        assert await _add_file(client, "ok", str(allowed / "ok.img")) == {"return": {}}
        for i, path in enumerate([str(secret), str(allowed / "link.img"), f"{allowed}/../secret.img",
                                  str(allowed / "abs" / "secret.img")]):
            assert await _add_file(client, f"n{i}", path) == {"error": {
                "class": "GenericError", "desc": f"Could not open '{path}': {OUTSIDE}"}}
        # Creating or truncating outside is refused too, and nothing is written.
        reply, _ = await client.execute({"execute": "drive-backup", "arguments": {
            "device": "ok", "target": str(allowed / "link.img"), "sync": "full", "job-id": "j"}})
        assert reply == {"error": {"class": "GenericError",
                                   "desc": f"Could not create '{allowed / 'link.img'}': {OUTSIDE}"}}
        assert secret.read_bytes() == b"s" * 65536


async def test_created_files_are_private(sock_dir: Path, tmp_path: Path) -> None:
    async with confined(sock_dir, tmp_path) as client:
        (tmp_path / "src.img").write_bytes(b"x" * 65536)
        assert await _add_file(client, "src", str(tmp_path / "src.img")) == {"return": {}}
        reply, events = await client.execute({"execute": "drive-backup", "arguments": {
            "device": "src", "target": str(tmp_path / "copy.img"), "sync": "full", "job-id": "j"}})
        assert reply == {"return": {}}
        seen = events
        while not any(e.get("data") == {"id": "j", "status": "null"} for e in seen):
            seen = [json.loads(await client.reader.readline())]
        assert stat.S_IMODE(os.stat(tmp_path / "copy.img").st_mode) == 0o600
        assert (tmp_path / "copy.img").read_bytes() == b"x" * 65536


async def test_non_loopback_tcp_warns(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        daemon = Daemon(DaemonConfig(package="qmpd-test"), [TcpListener(host, 0)])
        daemon.setup()
        with caplog.at_level(logging.WARNING, logger="qmpd.server.daemon"):
            await daemon.start()
        await daemon.request_shutdown("host-qmp-quit")
        await daemon.cleanup()
        assert any("reachable from the network" in r.getMessage() for r in caplog.records) == warned
