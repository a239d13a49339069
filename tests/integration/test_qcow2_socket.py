"""qcow2 over the wire: blockdev-create driver=qcow2 as a job, blockdev-add
with a backing chain, drive-backup into new qcow2 targets (full, top with
the source's backing file, none with the source as backing, compressed),
each image checked with ``qemu-img check`` and compared with
``qemu-img compare``."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import AsyncRawClient, RunningDaemon

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def check_clean(path: Path) -> str:
    r = sh("qemu-img", "check", str(path))
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr
    return r.stdout


def same(a: Path, b: Path) -> None:
    r = sh("qemu-img", "compare", str(a), str(b))
    assert r.returncode == 0, r.stdout + r.stderr


async def ok(client: AsyncRawClient, command: str, **args: Any) -> Any:
    reply, _ = await client.execute({"execute": command, "arguments": args})
    assert "return" in reply, reply
    return reply["return"]


async def err(client: AsyncRawClient, name: str, **args: Any) -> str:
    reply, _ = await client.execute({"execute": name, "arguments": args})
    assert "error" in reply, reply
    return str(reply["error"]["desc"])


async def until(client: AsyncRawClient, event: str, **data: Any) -> dict[str, Any]:
    while True:
        msg = json.loads(await asyncio.wait_for(client.reader.readline(), 30))
        if msg.get("event") == event and all(msg["data"].get(k) == v for k, v in data.items()):
            return msg


async def qemu_io(client: AsyncRawClient, node: str, cmd: str) -> None:
    await ok(client, "human-monitor-command", **{"command-line": f'qemu-io {node} "{cmd}"'})


async def test_create_add_write_and_full_backup(qmpd: RunningDaemon, tmp_path: Path) -> None:
    disk, target = tmp_path / "disk.qcow2", tmp_path / "target.qcow2"
    disk.touch()
    c = await AsyncRawClient.connect(qmpd.path)
    await ok(c, "blockdev-add", driver="file", filename=str(disk), **{"node-name": "proto"})
    await ok(c, "blockdev-create", **{"job-id": "create", "options": {
        "driver": "qcow2", "file": "proto", "size": 16 * MiB, "cluster-size": 65536}})
    await until(c, "JOB_STATUS_CHANGE", id="create", status="concluded")
    await ok(c, "job-dismiss", id="create")
    check_clean(disk)
    await ok(c, "blockdev-add", driver="qcow2", file="proto", **{"node-name": "drive0"})
    await qemu_io(c, "drive0", "write -P 0x5a 0 3M")
    await qemu_io(c, "drive0", "write -P 0x11 10M 100k")
    await qemu_io(c, "drive0", "write -z 1M 64k")
    await ok(c, "drive-backup", device="drive0", target=str(target), sync="full",
             format="qcow2", **{"job-id": "b"})
    await until(c, "BLOCK_JOB_COMPLETED", device="b")
    nodes = await ok(c, "query-named-block-nodes")
    info = next(n for n in nodes if n["node-name"] == "drive0")
    assert info["drv"] == "qcow2" and info["image"]["format"] == "qcow2"
    await ok(c, "blockdev-del", **{"node-name": "drive0"})
    await c.close()
    check_clean(disk)
    check_clean(target)
    same(disk, target)
    r = sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 64k",
           "-c", "read -P 0x11 10M 100k", str(target))
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


async def test_create_refusals(qmpd: RunningDaemon, tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.touch()
    c = await AsyncRawClient.connect(qmpd.path)
    await ok(c, "blockdev-add", driver="file", filename=str(disk), **{"node-name": "proto"})
    base = {"driver": "qcow2", "file": "proto", "size": MiB}
    for extra, text in [
        ({"cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
        ({"refcount-bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
        ({"version": "v2", "lazy-refcounts": True},
         "Lazy refcounts only supported with compatibility level 1.1 and above "
         "(use version=v3 or greater)"),
        ({"backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ]:
        assert await err(c, "blockdev-create", **{"job-id": "j", "options": {**base, **extra}}) == text
    assert disk.stat().st_size == 0
    await c.close()


async def test_sync_top_and_none(qmpd: RunningDaemon, tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    t_top, t_none = tmp_path / "t_top.qcow2", tmp_path / "t_none.qcow2"
    assert sh("qemu-img", "create", "-f", "raw", str(base), "8M").returncode == 0
    assert sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", str(base)).returncode == 0
    assert sh("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)).returncode == 0
    assert sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 128k", str(top)).returncode == 0
    c = await AsyncRawClient.connect(qmpd.path)
    await ok(c, "blockdev-add", driver="qcow2", **{"node-name": "drive0"},
             file={"driver": "file", "filename": str(top)})
    await ok(c, "drive-backup", device="drive0", target=str(t_top), sync="top",
             format="qcow2", **{"job-id": "top"})
    await until(c, "BLOCK_JOB_COMPLETED", device="top")
    same(t_top, top)                     # the chain under t_top reads like top
    await ok(c, "drive-backup", device="drive0", target=str(t_none), sync="none",
             format="qcow2", **{"job-id": "none"})
    await qemu_io(c, "drive0", "write -P 0x33 4M 64k")     # copied before write
    # An idle sync=none job ends before the reply, as in QEMU 7.2.
    reply, events = await c.execute({"execute": "block-job-cancel", "arguments": {"device": "none"}})
    assert reply == {"return": {}}
    assert [e["data"]["device"] for e in events if e["event"] == "BLOCK_JOB_CANCELLED"] == ["none"]
    await ok(c, "blockdev-del", **{"node-name": "drive0"})
    await c.close()
    out = check_clean(t_top)
    assert out.startswith("No errors were found on the image.\n2/128 = 1.56% allocated"), out
    info = json.loads(sh("qemu-img", "info", "--output=json", str(t_top)).stdout)
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "raw"
    info = json.loads(sh("qemu-img", "info", "--output=json", str(t_none)).stdout)
    assert info["backing-filename"] == str(top)
    out = check_clean(t_none)
    assert "1/128 = 0.78% allocated" in out, out
    r = sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x11 4M 64k", str(t_none))
    assert "Pattern verification failed" not in r.stdout


async def test_compressed_backup_and_not_qcow2(qmpd: RunningDaemon, tmp_path: Path) -> None:
    src, dst, raw = tmp_path / "src.qcow2", tmp_path / "dst.qcow2", tmp_path / "raw.img"
    for p in (src, dst):
        assert sh("qemu-img", "create", "-f", "qcow2", str(p), "4M").returncode == 0
    assert sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", str(src)).returncode == 0
    raw.write_bytes(bytes(4 * MiB))
    c = await AsyncRawClient.connect(qmpd.path)
    for name, path in (("s", src), ("d", dst)):
        await ok(c, "blockdev-add", driver="qcow2", **{"node-name": name},
                 file={"driver": "file", "filename": str(path)})
    await ok(c, "blockdev-backup", device="s", target="d", sync="full", compress=True,
             **{"job-id": "c"})
    await until(c, "BLOCK_JOB_COMPLETED", device="c")
    text = await err(c, "drive-backup", device="s", target=str(raw), sync="full",
                     format="qcow2", mode="existing")
    assert text == "Image is not in qcow2 format"
    for name in ("s", "d"):
        await ok(c, "blockdev-del", **{"node-name": name})
    await c.close()
    out = check_clean(dst)
    assert "100.00% compressed clusters" in out, out
    same(src, dst)


QCOW2_SPECIFIC = {"type": "qcow2", "data": {
    "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False, "refcount-bits": 16,
    "corrupt": False, "extended-l2": False}}


async def test_query_backing_chain_as_qemu(qmpd: RunningDaemon, tmp_path: Path) -> None:
    """The shape recorded from qemu-storage-daemon 7.2 for the same chain
    (``actual-size`` left out: it depends on the file system)."""
    base, top = tmp_path / "base2.qcow2", tmp_path / "top2.qcow2"
    assert sh("qemu-img", "create", "-f", "qcow2", str(base), "8M").returncode == 0
    assert sh("qemu-img", "create", "-f", "qcow2", "-b", "base2.qcow2", "-F", "qcow2",
              str(top)).returncode == 0
    c = await AsyncRawClient.connect(qmpd.path)
    await ok(c, "blockdev-add", driver="qcow2", **{"node-name": "d"},
             file={"driver": "file", "filename": str(top)})
    nodes = await ok(c, "query-named-block-nodes")
    await c.close()
    assert [(n["drv"], n["ro"]) for n in nodes] == [
        ("qcow2", True), ("file", True), ("qcow2", False), ("file", False)]
    d = next(n for n in nodes if n["node-name"] == "d")
    assert d["backing_file"] == str(base) and d["backing_file_depth"] == 1
    image = d["image"]
    for level in (image, image["backing-image"]):
        level.pop("actual-size")
    assert image == {
        "filename": str(top), "format": "qcow2", "dirty-flag": False, "virtual-size": 8 * MiB,
        "cluster-size": 65536, "backing-filename": "base2.qcow2",
        "full-backing-filename": str(base), "backing-filename-format": "qcow2",
        "format-specific": QCOW2_SPECIFIC,
        "backing-image": {
            "filename": str(base), "format": "qcow2", "dirty-flag": False,
            "virtual-size": 8 * MiB, "cluster-size": 65536, "format-specific": QCOW2_SPECIFIC}}


async def test_persistent_bitmap_survives_restart(tmp_path: Path, sock_dir: Path) -> None:
    from tests.support.daemon import running_daemon
    disk = tmp_path / "disk.qcow2"
    assert sh("qemu-img", "create", "-f", "qcow2", str(disk), "16M").returncode == 0
    add = {"driver": "qcow2", "node-name": "drive0",
           "file": {"driver": "file", "filename": str(disk)}}
    async with running_daemon(sock_dir) as d1:
        c = await AsyncRawClient.connect(d1.path)
        await ok(c, "blockdev-add", **add)
        await ok(c, "block-dirty-bitmap-add", node="drive0", name="bitmap0", persistent=True)
        await qemu_io(c, "drive0", "write 1M 2M")
        await ok(c, "quit")
        await c.close()
    info = json.loads(sh("qemu-img", "info", "--output=json", str(disk)).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "bitmap0", "granularity": 65536}]
    check_clean(disk)
    async with running_daemon(sock_dir) as d2:
        c = await AsyncRawClient.connect(d2.path)
        await ok(c, "blockdev-add", **add)
        nodes = await ok(c, "query-named-block-nodes")
        node = next(n for n in nodes if n["node-name"] == "drive0")
        assert node["dirty-bitmaps"] == [{"name": "bitmap0", "count": 2 * MiB, "granularity": 65536,
                                          "recording": True, "busy": False, "persistent": True}]
        await ok(c, "blockdev-del", **{"node-name": "drive0"})
        await c.close()
    check_clean(disk)


async def test_sync_top_without_backing_copies_allocated_only(qmpd: RunningDaemon, tmp_path: Path) -> None:
    """QEMU skips what the top layer does not hold also when there is no
    backing file (iotest 257's ``top`` rows: len = the written clusters)."""
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    for p in (src, dst):
        assert sh("qemu-img", "create", "-f", "qcow2", str(p), "64M").returncode == 0
    assert sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 1M 128k", "-c",
              "write -z 8M 64k", str(src)).returncode == 0
    c = await AsyncRawClient.connect(qmpd.path)
    for name, path in (("s", src), ("d", dst)):
        await ok(c, "blockdev-add", driver="qcow2", **{"node-name": name},
                 file={"driver": "file", "filename": str(path)})
    await ok(c, "blockdev-backup", device="s", target="d", sync="top", **{"job-id": "j"})
    done = await until(c, "BLOCK_JOB_COMPLETED", device="j")
    assert done["data"]["len"] == done["data"]["offset"] == 3 * 65536   # data + zero cluster
    for name in ("s", "d"):
        await ok(c, "blockdev-del", **{"node-name": name})
    await c.close()
    same(src, dst)
