"""``snapshot-access`` over a ``copy-before-write`` filter: the point-in-time
view, byte for byte, and QEMU 7.2's errors (observed with qemu-io on
qemu-system-x86_64 7.2: writes "Operation not supported", reads after a
discard or a broken snapshot "Permission denied")."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import pytest

from qmpd.block import BlockGraph, BlockIOError, BlockNode
from qmpd.block.errors import NodeOpenError

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 4 * MiB


async def world(tmp_path: Path, *, fleece_error: bool = False, **cbw: Any) -> tuple[BlockGraph, BlockNode, BlockNode, BlockNode]:
    disk = tmp_path / "disk.img"
    rng = random.Random(7)
    disk.write_bytes(rng.randbytes(SIZE))
    (tmp_path / "fleece.img").write_bytes(b"")
    with open(tmp_path / "fleece.img", "wb") as f:
        f.truncate(SIZE)
    g = BlockGraph()
    await g.add({"driver": "raw", "node-name": "drive0",
                 "file": {"driver": "file", "filename": str(disk)}})
    proto: dict[str, Any] = {"driver": "file", "filename": str(tmp_path / "fleece.img")}
    if fleece_error:
        proto = {"driver": "blkdebug", "image": proto,
                 "inject-error": [{"event": "pwritev", "errno": errno.EIO, "immediately": True}]}
    await g.add({"driver": "raw", "node-name": "fleece", "file": proto})
    filt = await g.add({"driver": "copy-before-write", "node-name": "cbw", "file": "drive0",
                        "target": "fleece", **cbw})
    snap = await g.add({"driver": "snapshot-access", "node-name": "snap", "file": "cbw",
                        "discard": "unmap"})
    drive0 = g.lookup("drive0")
    return g, drive0, filt, snap


async def test_view_is_point_in_time(tmp_path: Path) -> None:
    g, drive0, filt, snap = await world(tmp_path)
    before = await drive0.read(0, SIZE)
    rng = random.Random(1)
    for _ in range(40):
        off = rng.randrange(0, SIZE - 3 * CLUSTER)
        await filt.write(off, rng.randbytes(rng.randrange(1, 3 * CLUSTER)))
        assert await snap.read(0, SIZE) == before
    assert await drive0.read(0, SIZE) != before
    await g.close()


async def test_writes_refused_discard_drops_clusters(tmp_path: Path) -> None:
    g, drive0, filt, snap = await world(tmp_path)
    for op in (snap.write(0, b"x" * CLUSTER), snap.write_zeroes(0, CLUSTER)):
        with pytest.raises(BlockIOError) as exc:
            await op
        assert exc.value.errno == errno.ENOTSUP
    await snap.discard(MiB, CLUSTER)
    with pytest.raises(BlockIOError) as exc:
        await snap.read(MiB, CLUSTER)
    assert exc.value.errno == errno.EACCES
    # The discarded cluster is no longer copied before writes.
    await filt.write(MiB, b"\x55" * CLUSTER)
    assert await g.lookup("fleece").read(MiB, CLUSTER) == bytes(CLUSTER)
    assert len(await snap.read(0, MiB)) == MiB
    await g.close()


async def test_break_snapshot(tmp_path: Path) -> None:
    g, drive0, filt, snap = await world(tmp_path, fleece_error=True, **{"on-cbw-error": "break-snapshot"})
    await snap.read(0, CLUSTER)
    await filt.write(0, b"\x22" * CLUSTER)   # the copy fails; the write goes through
    assert await drive0.read(0, CLUSTER) == b"\x22" * CLUSTER
    with pytest.raises(BlockIOError) as exc:
        await snap.read(CLUSTER, CLUSTER)
    assert exc.value.errno == errno.EACCES
    await g.close()


async def test_bitmap_limits_access_and_hosts_bitmaps(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(SIZE))
    with open(tmp_path / "f.img", "wb") as f:
        f.truncate(SIZE)
    g = BlockGraph()
    drive0 = await g.add({"driver": "raw", "node-name": "drive0",
                          "file": {"driver": "file", "filename": str(disk)}})
    bm = drive0.bitmaps.add("b0", disabled=True)
    bm.hbitmap.set(MiB, CLUSTER)
    await g.add({"driver": "raw", "node-name": "fleece",
                 "file": {"driver": "file", "filename": str(tmp_path / "f.img")}})
    await g.add({"driver": "copy-before-write", "node-name": "cbw", "file": "drive0",
                 "target": "fleece", "bitmap": {"node": "drive0", "name": "b0"}})
    snap = await g.add({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
    assert await snap.read(MiB, CLUSTER) == bytes(CLUSTER)
    with pytest.raises(BlockIOError):
        await snap.read(0, CLUSTER)
    snap.bitmaps.add("sb")
    assert [b.name for b in snap.bitmaps] == ["sb"]
    await g.close()


async def test_file_must_be_cbw(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    g = BlockGraph()
    await g.add({"driver": "raw", "node-name": "drive0",
                 "file": {"driver": "file", "filename": str(disk)}})
    with pytest.raises(NodeOpenError) as exc:
        await g.add({"driver": "snapshot-access", "node-name": "snap", "file": "drive0"})
    assert exc.value.desc == "'drive0' is not a copy-before-write node"
    assert "snap" not in g
    await g.close()
