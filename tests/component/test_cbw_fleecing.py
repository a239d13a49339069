"""Standalone copy-before-write (``blockdev-add`` driver ``copy-before-write``,
qmpbackup's fleecing): what lands in the fleece target, byte for byte.

The fleece image starts filled with a sentinel byte, so any cluster the
filter copied shows, and any it did not still reads as the sentinel.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from qmpd.bitmap import BitmapNotFound
from qmpd.block import BlockGraph, BlockIOError, BlockNode
from qmpd.block.drivers.cbw import CopyBeforeWrite
from qmpd.commands.views import bitmap_infos, named_block_nodes

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 4 * MiB
SENTINEL = 0xEE
#: The disk before fleecing: data in clusters 0-1 and 3, the rest holes.
OLD = {0: b"\x11" * 2 * CLUSTER, 3 * CLUSTER: b"\x13" * CLUSTER}


def make_images(tmp_path: Path) -> tuple[Path, Path]:
    disk, fleece = tmp_path / "disk.img", tmp_path / "fleece.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        for off, data in OLD.items():
            f.seek(off)
            f.write(data)
    fleece.write_bytes(bytes([SENTINEL]) * SIZE)
    return disk, fleece


def old_byte(offset: int) -> int:
    for off, data in OLD.items():
        if off <= offset < off + len(data):
            return data[offset - off]
    return 0


async def open_world(
    tmp_path: Path, *, fleece_blkdebug: dict[str, Any] | None = None, **cbw: Any
) -> tuple[BlockGraph, BlockNode, BlockNode, BlockNode, Path]:
    disk, fleece_path = make_images(tmp_path)
    g = BlockGraph()
    drive0 = await g.add({"driver": "raw", "node-name": "drive0",
                          "file": {"driver": "file", "filename": str(disk)}})
    proto: dict[str, Any] = {"driver": "file", "filename": str(fleece_path)}
    if fleece_blkdebug is not None:
        proto = {"driver": "blkdebug", "image": proto, **fleece_blkdebug}
    fleece = await g.add({"driver": "raw", "node-name": "fleece", "file": proto})
    filt = await g.add({"driver": "copy-before-write", "node-name": "cbw",
                        "file": "drive0", "target": "fleece", **cbw})
    return g, drive0, fleece, filt, fleece_path


def copied_clusters(fleece_path: Path) -> dict[int, bytes]:
    """:return: cluster index -> content, for every cluster not all sentinel."""
    data = fleece_path.read_bytes()
    out = {}
    for i in range(SIZE // CLUSTER):
        chunk = data[i * CLUSTER:(i + 1) * CLUSTER]
        if chunk != bytes([SENTINEL]) * CLUSTER:
            out[i] = chunk
    return out


def old_cluster(i: int) -> bytes:
    return bytes(old_byte(i * CLUSTER + k) for k in range(CLUSTER))


async def test_first_write_per_cluster_is_preserved(tmp_path: Path) -> None:
    g, drive0, fleece, filt, fleece_path = await open_world(tmp_path)
    # a write inside cluster 0, one spanning clusters 1-2 (2 is a hole), one
    # in the hole cluster 8, and a rewrite of cluster 0
    await filt.write(100, b"\xa0" * 10)
    await filt.write(2 * CLUSTER - 4096, b"\xa1" * 8192)
    await filt.write(8 * CLUSTER + 5, b"\xa2" * 3)
    await filt.write(0, b"\xa3" * CLUSTER)
    # writes addressed to the disk node itself bypass the filter (as QEMU)
    await drive0.write(3 * CLUSTER, b"\xa4" * 512)
    copied = copied_clusters(fleece_path)
    assert sorted(copied) == [0, 1, 2, 8]
    for i, content in copied.items():
        assert content == old_cluster(i), i
    # the disk has the new data; the filter reads through to it
    assert await filt.read(0, 4) == b"\xa3" * 4
    assert await drive0.read(2 * CLUSTER, 4) == b"\xa1" * 4
    assert await fleece.read(8 * CLUSTER, 8) == bytes(8)
    # bitmaps as QEMU 7.2: access/done on the filter, copy bitmap on the disk
    drv = filt.driver
    assert isinstance(drv, CopyBeforeWrite)
    assert drv.done_bitmap is not None and drv.done_bitmap.hbitmap.dirty_bytes() == 4 * CLUSTER
    assert drv.copy.dirty_bytes == SIZE - 4 * CLUSTER
    await g.delete("cbw")
    assert not drive0.bitmaps and not drive0.has_hooks and not fleece.in_use
    await g.close()


async def test_bitmap_limits_copying_to_its_clusters(tmp_path: Path) -> None:
    disk, fleece_path = make_images(tmp_path)
    g = BlockGraph()
    drive0 = await g.add({"driver": "raw", "node-name": "drive0",
                          "file": {"driver": "file", "filename": str(disk)}})
    await g.add({"driver": "raw", "node-name": "fleece",
                 "file": {"driver": "file", "filename": str(fleece_path)}})
    bm = drive0.bitmaps.add("b0", granularity=4096)
    bm.hbitmap.set(CLUSTER + 4096, 4096)  # one 4 KiB piece of cluster 1
    bm.hbitmap.set(3 * CLUSTER, 4096)
    filt = await g.add({"driver": "copy-before-write", "node-name": "cbw", "file": "drive0",
                        "target": "fleece", "bitmap": {"node": "drive0", "name": "b0"}})
    for i in (0, 1, 2, 3):
        await filt.write(i * CLUSTER + 8192, b"\x55" * 100)
    copied = copied_clusters(fleece_path)
    assert sorted(copied) == [1, 3]  # whole clusters, only those in the bitmap
    assert copied[1] == old_cluster(1) and copied[3] == old_cluster(3)
    await g.close()


async def test_missing_bitmap_leaves_nothing_behind(tmp_path: Path) -> None:
    g, drive0, _, _, _ = await open_world(tmp_path)
    before = g.names()
    with pytest.raises(BitmapNotFound) as ei:
        await g.add({"driver": "copy-before-write", "node-name": "cbw2", "file": "drive0",
                     "target": "fleece", "bitmap": {"node": "drive0", "name": "zz"}})
    assert ei.value.desc == "Dirty bitmap 'zz' not found"
    assert g.names() == before and len(bitmap_infos(drive0.bitmaps)) == 1  # cbw's copy bitmap only
    await g.close()


async def test_break_guest_write_on_failing_target(tmp_path: Path) -> None:
    rule = {"inject-error": [{"event": "write_aio", "errno": errno.EIO}]}
    g, drive0, _, filt, fleece_path = await open_world(tmp_path, fleece_blkdebug=rule)
    with pytest.raises(BlockIOError) as ei:
        await filt.write(0, b"\x66" * 512)
    assert ei.value.errno == errno.EIO
    # the guest write failed: the disk is unchanged, nothing copied, and the
    # cluster is still to be copied
    assert await drive0.read(0, 512) == b"\x11" * 512
    assert copied_clusters(fleece_path) == {}
    drv = filt.driver
    assert isinstance(drv, CopyBeforeWrite) and drv.copy.dirty_bytes == SIZE
    assert drv.done_bitmap is not None and drv.done_bitmap.hbitmap.dirty_bytes() == 0
    await g.close()


async def test_break_snapshot_lets_writes_through(tmp_path: Path) -> None:
    rule = {"inject-error": [{"event": "write_aio", "errno": errno.EIO}]}
    g, drive0, _, filt, fleece_path = await open_world(
        tmp_path, fleece_blkdebug=rule, **{"on-cbw-error": "break-snapshot", "cbw-timeout": 45})
    await filt.write(0, b"\x66" * 512)
    await filt.write(5 * CLUSTER, b"\x67" * 512)
    assert await drive0.read(0, 512) == b"\x66" * 512
    drv = filt.driver
    assert isinstance(drv, CopyBeforeWrite) and drv.snapshot_error is not None
    assert copied_clusters(fleece_path) == {}
    await g.close()


async def test_cbw_timeout_fails_the_write(tmp_path: Path) -> None:
    disk, _ = make_images(tmp_path)
    g = BlockGraph()
    drive0 = await g.add({"driver": "raw", "node-name": "drive0",
                          "file": {"driver": "file", "filename": str(disk)}})
    await g.add({"driver": "null-co", "node-name": "slow", "size": SIZE, "latency-ns": 300_000_000})
    filt = await g.add({"driver": "copy-before-write", "node-name": "cbw",
                        "file": "drive0", "target": "slow", "cbw-timeout": 1})
    drv = filt.driver
    assert isinstance(drv, CopyBeforeWrite) and drv.timeout == 1
    drv.timeout = 0.05  # the QMP option is in whole seconds; keep the test fast
    with pytest.raises(BlockIOError) as ei:
        await filt.write(0, b"\x66" * 512)
    assert ei.value.errno == errno.ETIMEDOUT
    assert await drive0.read(0, 1) == b"\x11"
    # copy_range waits for the chunk still in flight there (the background
    # copy); it then finds the cluster copied and copies nothing more.
    await drv.copy.copy_range(0, 512)
    assert drv.copy.dirty_bytes == SIZE - CLUSTER
    await g.close()


async def test_timed_out_copy_is_awaited_before_the_filter_goes(tmp_path: Path) -> None:
    disk, _ = make_images(tmp_path)
    g = BlockGraph()
    await g.add({"driver": "raw", "node-name": "drive0", "file": {"driver": "file", "filename": str(disk)}})
    await g.add({"driver": "null-co", "node-name": "slow", "size": SIZE, "latency-ns": 300_000_000})
    filt = await g.add({"driver": "copy-before-write", "node-name": "cbw",
                        "file": "drive0", "target": "slow", "cbw-timeout": 1})
    drv = filt.driver
    assert isinstance(drv, CopyBeforeWrite)
    drv.timeout = 0.05
    with pytest.raises(BlockIOError):
        await filt.write(0, b"\x66" * 512)
    late = list(drv.late_copies)
    assert len(late) == 1 and not late[0].done()
    await g.remove_node(filt)
    assert late[0].done() and not drv.late_copies
    await g.close()


async def test_listing_order_as_qemu(tmp_path: Path) -> None:
    """query-named-block-nodes order, recorded from QEMU 7.2: newest first; a
    raw or copy-before-write node before its inline ``file`` child, a
    blkdebug node after its ``image`` child, a filter's inline ``target``
    before the filter."""
    disk, fleece = make_images(tmp_path)
    g = BlockGraph()

    def f(path: Path) -> dict[str, Any]:
        return {"driver": "file", "filename": str(path)}

    await g.add({"driver": "blkdebug", "node-name": "dbg", "image": f(fleece)})
    await g.add({"driver": "raw", "node-name": "rdbg", "file": {"driver": "blkdebug", "image": f(fleece)}})
    await g.add({"driver": "copy-before-write", "node-name": "c10",
                 "file": {"driver": "raw", "file": f(disk)}, "target": f(fleece)})
    listed = [(n.node_name if not n.auto_named else "#", n.drv) for n in g]
    assert listed == [
        ("#", "file"), ("c10", "copy-before-write"), ("#", "raw"), ("#", "file"),
        ("rdbg", "raw"), ("#", "file"), ("#", "blkdebug"),
        ("#", "file"), ("dbg", "blkdebug"),
    ]
    assert [i["node-name"] for i in named_block_nodes(g)] == g.names()
    await g.close()
