"""Block and bitmap commands over a real socket with qemu.qmp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.support.daemon import RunningDaemon
from tests.support.qmp import bitmaps, hmp, next_event, qemu_io

SIZE = 16 << 20


async def _setup(qmpd: RunningDaemon, tmp_path: Path) -> QMPClient:
    for name in ("disk.img", "target.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(SIZE)
    qmp = QMPClient("block")
    await qmp.connect(qmpd.path)
    for node, name in (("drive0", "disk.img"), ("target", "target.img")):
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": node,
                                           "file": {"driver": "file", "filename": str(tmp_path / name)}})
    return qmp


@pytest.mark.asyncio
async def test_qemu_io_writes_land_in_the_image(qmpd: RunningDaemon, tmp_path: Path) -> None:
    qmp = await _setup(qmpd, tmp_path)
    try:
        await qemu_io(qmp, "drive0", "write -P 0x5a 1M 128k")
        await qemu_io(qmp, "drive0", "write -P 0x33 0x800200 512")
        await qemu_io(qmp, "drive0", "flush")
        data = (tmp_path / "disk.img").read_bytes()
        assert data[1 << 20:(1 << 20) + (128 << 10)] == b"\x5a" * (128 << 10)
        assert data[0x800200:0x800400] == b"\x33" * 512
        assert data.count(0) == SIZE - (128 << 10) - 512
        # holes are preserved where nothing was written
        fd = os.open(tmp_path / "disk.img", os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) >= (1 << 20) - 4096
            assert os.lseek(fd, 12 << 20, os.SEEK_HOLE) == 12 << 20
        finally:
            os.close(fd)
        # HMP answers "" even when the pattern does not match or the node is unknown
        assert await hmp(qmp, 'qemu-io drive0 "read -P 0x00 1M 4k"') == ""
        assert await hmp(qmp, 'qemu-io nosuch "read 0 512"') == (
            "Error: Cannot find device='' nor node-name='nosuch'\r\n")
    finally:
        await qmp.disconnect()


@pytest.mark.asyncio
async def test_busy_bitmap_refuses_changes(qmpd: RunningDaemon, tmp_path: Path) -> None:
    qmp = await _setup(qmpd, tmp_path)
    listener = EventListener()
    qmp.register_listener(listener)
    try:
        await qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "b0"})
        await qemu_io(qmp, "drive0", "write -P 1 0 64k")
        await qmp.execute("blockdev-backup", {"device": "drive0", "target": "target", "sync": "bitmap",
                                              "bitmap": "b0", "bitmap-mode": "on-success", "job-id": "j",
                                              "auto-finalize": False})
        await next_event(listener, "BLOCK_JOB_PENDING")
        busy = "Bitmap 'b0' is currently in use by another operation and cannot be used"
        for cmd, args in [
            ("block-dirty-bitmap-remove", {"node": "drive0", "name": "b0"}),
            ("block-dirty-bitmap-clear", {"node": "drive0", "name": "b0"}),
            ("block-dirty-bitmap-enable", {"node": "drive0", "name": "b0"}),
            ("block-dirty-bitmap-disable", {"node": "drive0", "name": "b0"}),
            ("block-dirty-bitmap-merge", {"node": "drive0", "target": "b0", "bitmaps": []}),
            ("blockdev-backup", {"device": "drive0", "target": "target", "sync": "bitmap", "bitmap": "b0",
                                 "bitmap-mode": "always", "job-id": "j2"}),
        ]:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute(cmd, args)
            assert info.value.error.error.desc == busy, cmd
        # the sha256 of a busy bitmap still works
        assert len((await qmp.execute("x-debug-block-dirty-bitmap-sha256",
                                      {"node": "drive0", "name": "b0"}))["sha256"]) == 64
        jobs = await qmp.execute("query-block-jobs")
        assert jobs == [{"type": "backup", "device": "j", "len": 65536, "offset": 65536, "busy": False,
                         "paused": False, "speed": 0, "io-status": "ok", "ready": False, "status": "pending",
                         "auto-finalize": False, "auto-dismiss": True}]
        assert await qmp.execute("query-jobs") == [{"id": "j", "type": "backup", "status": "pending",
                                                    "current-progress": 65536, "total-progress": 65536}]
        assert await hmp(qmp, "info block-jobs") == (
            "Type backup, device j: Completed 65536 of 65536 bytes, speed limit 0 bytes/s\r\n")
        await qmp.execute("job-finalize", {"id": "j"})
        assert [b["count"] for b in await bitmaps(qmp, "drive0") or []] == [0]
        assert await hmp(qmp, "info block-jobs") == "No active jobs\r\n"
    finally:
        await qmp.disconnect()
