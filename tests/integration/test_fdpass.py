"""File descriptor passing over the QMP UNIX socket (issue 7, confinement):
getfd/closefd, add-fd/remove-fd/query-fdsets and /dev/fdset/N, against
QEMU 7.2's recorded transcript, with no descriptor leaked."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpd.commands.context import DaemonConfig
from qmpd.server.daemon import Daemon
from qmpd.server.listeners import UnixListener
from tests.support.fdpass import GOLDEN, FdClient, run_script

pytestmark = pytest.mark.asyncio


def open_fds() -> set[int]:
    """This process's open descriptors, after a collection: garbage an
    earlier test left (a socket in a reference cycle) must not be closed by
    the collector in the middle of the comparison."""
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextlib.asynccontextmanager
async def daemon_at(sock_dir: Path, allowed: list[str] | None = None) -> AsyncIterator[Daemon]:
    path = str(sock_dir / "qmpd.sock")
    daemon = Daemon(DaemonConfig(), [UnixListener(path)], allowed_dirs=allowed or [])
    daemon.setup()
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.request_shutdown("host-qmp-quit")
        await daemon.cleanup()


async def test_transcript_equals_qemu(sock_dir: Path, tmp_path: Path) -> None:
    """The whole script (errors, ids, query-fdsets shapes and lifetimes)
    gives exactly what QEMU 7.2 gave (tests/transcripts/record_fdpass.py)."""
    golden = json.loads(GOLDEN.read_text())
    before = open_fds()
    async with daemon_at(sock_dir) as daemon:
        got = await asyncio.to_thread(run_script, str(sock_dir / "qmpd.sock"), str(tmp_path))
        assert got == golden
        # Left: set 6 (a member; its node is gone but a client was connected
        # when it closed) and set 0 (member and the node n0 using a duplicate).
        assert [s["fdset-id"] for s in daemon.fdsets.query()] == [6, 0]
    assert open_fds() == before


class AllGone:
    """Set once the daemon has no QMP connection left (its own callback)."""

    def __init__(self, daemon: Daemon) -> None:
        self.event = asyncio.Event()
        inner = daemon.connection_closed

        def closed(conn: Any) -> None:
            inner(conn)
            if not daemon.connection_count:
                self.event.set()
        daemon.connection_closed = closed  # type: ignore[method-assign]

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), 10)


async def test_descriptors_never_leak(sock_dir: Path, tmp_path: Path) -> None:
    """Received descriptors are bounded per message (16, like QEMU), the
    unused ones are closed, and a disconnect closes what was not handed to
    an fdset in use."""
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 65536)
    before = open_fds()
    async with daemon_at(sock_dir) as daemon:
        path = str(sock_dir / "qmpd.sock")
        started = open_fds()
        gone = AllGone(daemon)
        mine = [os.open(img, os.O_RDONLY) for _ in range(20)]

        def session() -> list[dict[str, Any]]:
            c = FdClient(path)
            try:
                return [
                    c.cmd({"execute": "query-status"}, mine),          # 20 sent, 16 received, none taken
                    c.cmd({"execute": "getfd", "arguments": {"fdname": "a"}}, mine[:3]),
                    c.cmd({"execute": "getfd", "arguments": {"fdname": "b"}}, mine[:1]),
                    c.cmd({"execute": "add-fd", "arguments": {"fdset-id": 2}}, mine[:2]),
                    c.cmd({"execute": "add-fd"}, mine[:1]),
                ]
            finally:
                c.close()

        replies = await asyncio.to_thread(session)
        assert [list(r) for r in replies] == [["return"]] * 5
        await gone.wait()
        for fd in mine:
            os.close(fd)
        # getfd names and the unused fdsets are gone with the last client.
        assert daemon.fdsets.query() == []
        assert open_fds() == started
    assert open_fds() == before


async def test_qemu_qmp_send_fd_scm(sock_dir: Path, tmp_path: Path) -> None:
    """qemu.qmp's QMPClient.send_fd_scm (one space byte carries the fd)
    then getfd / add-fd, as its users do."""
    img = tmp_path / "y.img"
    img.write_bytes(b"y" * 65536)
    async with daemon_at(sock_dir) as daemon:
        gone = AllGone(daemon)
        qmp = QMPClient("fdpass-test")
        await qmp.connect(str(sock_dir / "qmpd.sock"))
        fd = os.open(img, os.O_RDWR)
        try:
            qmp.send_fd_scm(fd)
            assert await qmp.execute("getfd", {"fdname": "disk"}) == {}
            qmp.send_fd_scm(fd)
            info = await qmp.execute("add-fd", {"fdset-id": 4, "opaque": "rw"})
            assert isinstance(info, dict) and info["fdset-id"] == 4
            assert await qmp.execute("query-fdsets") == [
                {"fdset-id": 4, "fds": [{"fd": info["fd"], "opaque": "rw"}]}]
            assert await qmp.execute("blockdev-add", {"driver": "file", "node-name": "d",
                                                       "filename": "/dev/fdset/4"}) == {}
            assert await qmp.execute("closefd", {"fdname": "disk"}) == {}
        finally:
            os.close(fd)
            await qmp.disconnect()
        await gone.wait()
        # In use by node d: kept after the last client left.
        assert daemon.fdsets.query() == [{"fdset-id": 4, "fds": [{"fd": info["fd"], "opaque": "rw"}]}]


async def test_backup_to_a_passed_target_and_allowed_dir(sock_dir: Path, tmp_path: Path) -> None:
    """drive-backup and blockdev-create onto /dev/fdset/N: the caller opened
    the targets (outside every --allowed-dir, which fdset names bypass)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    src = allowed / "src.img"
    src.write_bytes(bytes(range(256)) * 4096)
    target = outside / "t.img"
    target.write_bytes(b"")
    created = outside / "c.img"
    created.write_bytes(b"junk")
    async with daemon_at(sock_dir, [str(allowed)]):
        path = str(sock_dir / "qmpd.sock")

        def session() -> list[dict[str, Any]]:
            c = FdClient(path)
            t = os.open(target, os.O_RDWR)
            k = os.open(created, os.O_RDWR)
            try:
                out = [
                    c.cmd({"execute": "blockdev-add", "arguments": {
                        "driver": "file", "node-name": "src", "filename": str(src)}}),
                    c.cmd({"execute": "blockdev-add", "arguments": {
                        "driver": "file", "node-name": "no", "filename": str(target)}}),
                    c.cmd({"execute": "add-fd", "arguments": {"fdset-id": 5}}, [t]),
                    c.cmd({"execute": "add-fd", "arguments": {"fdset-id": 8}}, [k]),
                    c.cmd({"execute": "drive-backup", "arguments": {
                        "device": "src", "job-id": "j", "target": "/dev/fdset/5", "sync": "full",
                        "format": "raw", "mode": "absolute-paths"}}),
                ]
                c.wait_event({"id": "j", "status": "null"})
                out.append(c.cmd({"execute": "blockdev-create", "arguments": {
                    "job-id": "c", "options": {"driver": "file", "filename": "/dev/fdset/8",
                                               "size": 1 << 20}}}))
                c.wait_event({"id": "c", "status": "concluded"})
                out.append(c.cmd({"execute": "job-dismiss", "arguments": {"id": "c"}}))
                out.append(c.cmd({"execute": "query-fdsets"}))
                return out
            finally:
                os.close(t)
                os.close(k)
                c.close()

        replies = await asyncio.to_thread(session)
        assert replies[0] == {"return": {}}
        assert replies[1] == {"error": {"class": "GenericError", "desc": (
            f"Could not open '{target}': Permission denied (outside every --allowed-dir)")}}
        assert replies[4] == {"return": {}}
        assert replies[5:7] == [{"return": {}}, {"return": {}}]
        assert [s["fdset-id"] for s in replies[7]["return"]] == [8, 5]
    assert target.read_bytes() == src.read_bytes()
    assert created.read_bytes() == b"\0" * (1 << 20)


async def test_a_descriptor_no_command_takes_is_closed(sock_dir: Path) -> None:
    async with daemon_at(sock_dir):
        def session() -> dict[str, Any]:
            c = FdClient(str(sock_dir / "qmpd.sock"))
            try:
                # A descriptor sent with a lone space byte, then closefd of
                # a name never kept: the waiting descriptor stays unused.
                r, w = os.pipe()
                socket.send_fds(c.sock, [b" "], [r])
                os.close(r)
                os.close(w)
                return c.cmd({"execute": "closefd", "arguments": {"fdname": "zz"}})
            finally:
                c.close()
        assert await asyncio.to_thread(session) == {"error": {
            "class": "GenericError", "desc": "File descriptor named 'zz' not found"}}


async def test_drive_backup_onto_its_own_source_through_an_fdset(sock_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"s" * 65536)
    async with daemon_at(sock_dir):
        def session() -> list[dict[str, Any]]:
            c = FdClient(str(sock_dir / "qmpd.sock"))
            fd = os.open(src, os.O_RDWR)
            try:
                return [
                    c.cmd({"execute": "blockdev-add", "arguments": {
                        "driver": "file", "node-name": "src", "filename": str(src)}}),
                    c.cmd({"execute": "add-fd", "arguments": {"fdset-id": 1}}, [fd]),
                    c.cmd({"execute": "drive-backup", "arguments": {
                        "device": "src", "job-id": "j", "target": "/dev/fdset/1", "sync": "full"}}),
                ]
            finally:
                os.close(fd)
                c.close()
        replies = await asyncio.to_thread(session)
    assert replies[2] == {"error": {"class": "GenericError", "desc": 'Failed to get shared "write" lock'}}
    assert src.read_bytes() == b"s" * 65536
