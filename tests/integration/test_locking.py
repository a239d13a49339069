"""Image locking with QEMU's OFD lock bytes (issue 7, item 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import AsyncRawClient, RunningDaemon

pytestmark = pytest.mark.asyncio
SIZE = 4 << 20
SHARED_WRITE = {"error": {"class": "GenericError", "desc": 'Failed to get shared "write" lock'}}


def _image(path: Path, byte: int = 0) -> Path:
    path.write_bytes(bytes([byte]) * SIZE)
    return path


async def _add(client: AsyncRawClient, node: str, path: Path, **file_opts: Any) -> None:
    reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
        "driver": "raw", "node-name": node, "file": {"driver": "file", "filename": str(path), **file_opts}}})
    assert reply == {"return": {}}


def _qemu_io_write(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", str(path)],
                          capture_output=True, text=True, timeout=30)


async def test_backup_onto_its_own_source_is_refused(qmpd: RunningDaemon, tmp_path: Path) -> None:
    src = _image(tmp_path / "a.img", 0x11)
    client = await AsyncRawClient.connect(qmpd.path)
    await _add(client, "a", src)
    for mode in ("existing", "absolute-paths"):
        reply, _ = await client.execute({"execute": "drive-backup", "arguments": {
            "device": "a", "target": str(src), "sync": "full", "job-id": "j", "mode": mode, "format": "raw"}})
        assert reply == SHARED_WRITE
    await _add(client, "b", src)  # a second node on the same file: QEMU allows it
    reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
        "device": "a", "target": "b", "sync": "full", "job-id": "j"}})
    assert reply == SHARED_WRITE
    assert src.read_bytes() == b"\x11" * SIZE
    reply, _ = await client.execute({"execute": "query-block-jobs"})
    assert reply == {"return": []}
    await client.close()


async def test_qemu_io_sees_qmpds_locks_while_a_backup_runs(qmpd: RunningDaemon, tmp_path: Path) -> None:
    if not shutil.which("qemu-io"):
        pytest.skip("needs qemu-io")
    src = _image(tmp_path / "a.img", 0x22)
    tgt = _image(tmp_path / "t.img")
    client = await AsyncRawClient.connect(qmpd.path)
    await _add(client, "a", src)
    await _add(client, "t", tgt)
    reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
        "device": "a", "target": "t", "sync": "full", "job-id": "j", "speed": 1}})
    assert reply == {"return": {}}
    out = _qemu_io_write(src)
    assert out.returncode != 0
    assert f'can\'t open device {src}: Failed to get "write" lock' in out.stderr
    assert _qemu_io_write(tgt).returncode == 0  # the target shares writes, as in QEMU
    client.writer.write(b'{"execute": "job-cancel", "arguments": {"id": "j"}}')
    while True:
        msg = json.loads(await client.reader.readline())
        if msg.get("event") == "JOB_STATUS_CHANGE" and msg["data"]["status"] == "null":
            break
    assert _qemu_io_write(src).returncode == 0  # released at clean-up
    await client.close()


async def test_locking_off_takes_no_locks(qmpd: RunningDaemon, tmp_path: Path) -> None:
    src = _image(tmp_path / "a.img")
    tgt = _image(tmp_path / "t.img")
    client = await AsyncRawClient.connect(qmpd.path)
    await _add(client, "a", src, locking="off")
    await _add(client, "t", tgt)
    reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
        "device": "a", "target": "t", "sync": "full", "job-id": "j", "speed": 1}})
    assert reply == {"return": {}}
    assert _qemu_io_write(src).returncode == 0
    reply, _ = await client.execute({"execute": "job-cancel", "arguments": {"id": "j"}})
    assert reply == {"return": {}}
    await client.close()


async def test_qmpd_sees_a_running_qemus_locks(qmpd: RunningDaemon, tmp_path: Path) -> None:
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("needs qemu-storage-daemon")
    img = _image(tmp_path / "a.img")
    other = _image(tmp_path / "o.img")
    mine = _image(tmp_path / "m.img")
    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=fa,filename={img}",
         "--blockdev", "driver=raw,node-name=a,file=fa",
         "--blockdev", f"driver=file,node-name=fo,filename={other}",
         "--blockdev", "driver=raw,node-name=o,file=fo",
         "--chardev", "stdio,id=m", "--monitor", "chardev=m"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert qsd.stdin is not None and qsd.stdout is not None

        def qsd_cmd(cmd: dict[str, Any]) -> dict[str, Any]:
            assert qsd.stdin is not None and qsd.stdout is not None
            qsd.stdin.write(json.dumps(cmd) + "\n")
            qsd.stdin.flush()
            while True:
                msg: dict[str, Any] = json.loads(qsd.stdout.readline())
                if "event" not in msg:
                    return msg

        qsd.stdout.readline()
        assert qsd_cmd({"execute": "qmp_capabilities"}) == {"return": {}}
        # QEMU backs up a.img slowly: it unshares "write" on a.img.
        assert qsd_cmd({"execute": "blockdev-backup", "arguments": {
            "device": "a", "target": "o", "sync": "full", "job-id": "q", "speed": 1}}) == {"return": {}}
        client = await AsyncRawClient.connect(qmpd.path)
        await _add(client, "m", mine)
        await _add(client, "a", img)  # opening is fine, as in QEMU
        reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
            "device": "m", "target": "a", "sync": "full", "job-id": "j"}})
        assert reply == {"error": {"class": "GenericError", "desc": 'Failed to get "write" lock'}}
        # Reading it as a backup source is compatible with QEMU's job.
        reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
            "device": "a", "target": "m", "sync": "full", "job-id": "j", "speed": 1}})
        assert reply == {"return": {}}
        reply, _ = await client.execute({"execute": "job-cancel", "arguments": {"id": "j"}})
        assert reply == {"return": {}}
        await client.close()
    finally:
        qsd.kill()
        qsd.wait()
