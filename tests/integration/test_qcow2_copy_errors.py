"""Backup errors on block-copy's mapped path (qcow2 ends copied file to
file): the failed range is redone with a separate read and write, so
``on-source-error``/``on-target-error`` apply as on the node path, and the
clusters the failed copy had allocated are given back (``qemu-img check``
finds no leak).  The failing side is a FUSE file (tests/support/faultfs.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import AsyncRawClient, RunningDaemon
from tests.support.faultfs import FaultyFile

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 4 * MiB


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def make_qcow2(path: Path, *cmds: str) -> None:
    assert sh("qemu-img", "create", "-f", "qcow2", str(path), str(SIZE)).returncode == 0
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    if cmds:
        assert sh(*argv, str(path)).returncode == 0


def put_image(image: Path, ff: FaultyFile) -> None:
    """Copy a qcow2 image into the FUSE file (its tail stays zeroes)."""
    with open(ff.path, "r+b") as f:
        f.write(image.read_bytes())


def check_clean(path: str) -> None:
    r = sh("qemu-img", "check", "-U", path)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


async def _until(client: AsyncRawClient, pred: Any) -> list[dict[str, Any]]:
    out = []
    while True:
        msg = json.loads(await asyncio.wait_for(client.reader.readline(), 60))
        out.append(msg)
        if pred(msg):
            return out


async def _add(client: AsyncRawClient, node: str, path: str) -> None:
    reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": path}}})
    assert reply == {"return": {}}


def _event(msgs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(m for m in msgs if m.get("event") == name)


async def test_target_write_error_stop_resume(qmpd: RunningDaemon, tmp_path: Path) -> None:
    src = tmp_path / "disk.qcow2"
    make_qcow2(src, "write -P 0x5a 0 4M")
    fresh = tmp_path / "fresh.qcow2"
    make_qcow2(fresh)
    with FaultyFile(tmp_path, 4 * SIZE) as target:
        put_image(fresh, target)
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
        await client.close()
        r = sh("qemu-img", "compare", "-U", str(src), target.path)
        assert "Images are identical." in r.stdout, r.stdout + r.stderr
        check_clean(target.path)


async def test_source_read_error_during_the_copy(qmpd: RunningDaemon, tmp_path: Path) -> None:
    """The source's L2 table is cached, so the mapping works and the file
    copy itself fails; the redo reads and fails: a read error."""
    image = tmp_path / "disk.qcow2"
    make_qcow2(image, "write -P 0x33 0 4M")
    tgt = tmp_path / "target.qcow2"
    make_qcow2(tgt)
    with FaultyFile(tmp_path, 4 * SIZE) as source:
        put_image(image, source)
        client = await AsyncRawClient.connect(qmpd.path)
        await _add(client, "drive0", source.path)
        await _add(client, "target", str(tgt))
        reply, _ = await client.execute({"execute": "human-monitor-command", "arguments": {
            "command-line": 'qemu-io drive0 "read 0 64k"'}})
        assert "error" not in reply
        source.fail_reads(True)
        reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
            "device": "drive0", "target": "target", "sync": "full", "job-id": "j",
            "on-source-error": "report", "on-target-error": "stop"}})
        assert reply == {"return": {}}
        msgs = await _until(client, lambda m: m.get("event") == "BLOCK_JOB_COMPLETED")
        assert _event(msgs, "BLOCK_JOB_ERROR")["data"] == {
            "device": "j", "operation": "read", "action": "report"}
        assert _event(msgs, "BLOCK_JOB_COMPLETED")["data"]["error"] == "Input/output error"
        await client.execute({"execute": "blockdev-del", "arguments": {"node-name": "target"}})
        source.fail_reads(False)
        await client.execute({"execute": "blockdev-del", "arguments": {"node-name": "drive0"}})
        await client.close()
    check_clean(str(tgt))
