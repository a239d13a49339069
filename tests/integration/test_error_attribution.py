"""Backup I/O errors on real failing file systems (issue 7, item 3).

The target (or source) is a FUSE file whose writes (or reads) fail with EIO
while a trigger file exists.  copy_file_range cannot tell which side
failed; qmpd redoes the range with a separate read and write and applies
``on-target-error`` / ``on-source-error`` as QEMU does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import AsyncRawClient, RunningDaemon
from tests.support.faultfs import FaultyFile

pytestmark = pytest.mark.asyncio

SIZE = 4 << 20


async def _until(client: AsyncRawClient, pred: Any) -> list[dict[str, Any]]:
    out = []
    while True:
        msg = json.loads(await asyncio.wait_for(client.reader.readline(), 60))
        out.append(msg)
        if pred(msg):
            return out


async def _add(client: AsyncRawClient, node: str, path: str) -> None:
    reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
        "driver": "raw", "node-name": node, "file": {"driver": "file", "filename": path}}})
    assert reply == {"return": {}}


def _event(msgs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(m for m in msgs if m.get("event") == name)


async def test_target_write_error_is_a_write_error_and_stop_then_resume_completes(
        qmpd: RunningDaemon, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(bytes(range(256)) * (SIZE // 256))
    with FaultyFile(tmp_path, SIZE) as target:
        client = await AsyncRawClient.connect(qmpd.path)
        await _add(client, "drive0", str(src))
        await _add(client, "target", target.path)
        target.fail_writes(True)
        reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
            "device": "drive0", "target": "target", "sync": "full", "job-id": "j",
            "on-target-error": "stop"}})
        assert reply == {"return": {}}
        msgs = await _until(client, lambda m: m.get("event") == "BLOCK_JOB_ERROR")
        assert _event(msgs, "BLOCK_JOB_ERROR")["data"] == {
            "device": "j", "operation": "write", "action": "stop"}
        await _until(client, lambda m: m.get("data") == {"id": "j", "status": "paused"})
        target.fail_writes(False)
        client.writer.write(b'{"execute": "job-resume", "arguments": {"id": "j"}}')
        msgs = await _until(client, lambda m: m.get("event") == "BLOCK_JOB_COMPLETED")
        done = _event(msgs, "BLOCK_JOB_COMPLETED")["data"]
        assert "error" not in done and done["offset"] == SIZE == done["len"]
        await client.execute({"execute": "blockdev-del", "arguments": {"node-name": "target"}})
        with open(target.path, "rb") as f:
            assert f.read() == src.read_bytes()
        await client.close()


async def test_target_write_error_report_is_a_write_error(qmpd: RunningDaemon, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(b"\x5a" * SIZE)
    with FaultyFile(tmp_path, SIZE) as target:
        client = await AsyncRawClient.connect(qmpd.path)
        await _add(client, "drive0", str(src))
        await _add(client, "target", target.path)
        target.fail_writes(True)
        reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
            "device": "drive0", "target": "target", "sync": "full", "job-id": "j"}})
        assert reply == {"return": {}}
        msgs = await _until(client, lambda m: m.get("event") == "BLOCK_JOB_COMPLETED")
        assert _event(msgs, "BLOCK_JOB_ERROR")["data"] == {
            "device": "j", "operation": "write", "action": "report"}
        done = _event(msgs, "BLOCK_JOB_COMPLETED")["data"]
        assert done["error"] == "Input/output error" and done["offset"] == 0
        await client.execute({"execute": "blockdev-del", "arguments": {"node-name": "target"}})
        await client.close()


async def test_source_read_error_is_a_read_error(qmpd: RunningDaemon, tmp_path: Path) -> None:
    tgt = tmp_path / "target.img"
    with open(tgt, "wb") as f:
        f.truncate(SIZE)
    with FaultyFile(tmp_path, SIZE) as source:
        client = await AsyncRawClient.connect(qmpd.path)
        await _add(client, "drive0", source.path)
        await _add(client, "target", str(tgt))
        source.fail_reads(True)
        reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
            "device": "drive0", "target": "target", "sync": "full", "job-id": "j",
            "on-source-error": "report", "on-target-error": "stop"}})
        assert reply == {"return": {}}
        msgs = await _until(client, lambda m: m.get("event") == "BLOCK_JOB_COMPLETED")
        assert _event(msgs, "BLOCK_JOB_ERROR")["data"] == {
            "device": "j", "operation": "read", "action": "report"}
        assert _event(msgs, "BLOCK_JOB_COMPLETED")["data"]["error"] == "Input/output error"
        await client.execute({"execute": "blockdev-del", "arguments": {"node-name": "drive0"}})
        await client.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs the right to mount; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_enospc_offset_counts_what_was_written(qmpd: RunningDaemon, tmp_path: Path,
                                                    small_fs: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(SIZE))
    tgt = small_fs / "target.img"
    with open(tgt, "wb") as f:
        f.truncate(SIZE)  # sparse: the file system runs full half-way
    client = await AsyncRawClient.connect(qmpd.path)
    await _add(client, "drive0", str(src))
    await _add(client, "target", str(tgt))
    reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
        "device": "drive0", "target": "target", "sync": "full", "job-id": "j"}})
    assert reply == {"return": {}}
    msgs = await _until(client, lambda m: m.get("event") == "BLOCK_JOB_COMPLETED")
    assert _event(msgs, "BLOCK_JOB_ERROR")["data"] == {
        "device": "j", "operation": "write", "action": "report"}
    done = _event(msgs, "BLOCK_JOB_COMPLETED")["data"]
    assert done["error"] == "No space left on device"
    # QEMU counts every chunk that was written before the failure; so does qmpd
    # (it used to report 0 when a batched fast-path copy failed).
    allocated = os.stat(tgt).st_blocks * 512
    assert 0 < done["offset"] <= allocated <= 2 << 20
    assert done["offset"] % (64 << 10) == 0
    data = tgt.read_bytes()
    source = src.read_bytes()
    copied = sum(data[i:i + (64 << 10)] == source[i:i + (64 << 10)] for i in range(0, SIZE, 64 << 10))
    assert copied * (64 << 10) >= done["offset"]
    await client.execute({"execute": "blockdev-del", "arguments": {"node-name": "target"}})
    await client.close()
