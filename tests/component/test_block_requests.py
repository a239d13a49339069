"""The request path: data, holes, zeroes, discard, bitmaps, hooks, locking."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from qmpd.block import BlockGraph, BlockIOError, BlockNode, run_qemu_io
from tests.component.test_job_helpers import settle

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SIZE = 64 << 20
K64 = 65536


def image(tmp_path: Path, name: str = "a.img", size: int = SIZE) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


async def drive(tmp_path: Path, **extra: Any) -> tuple[BlockGraph, BlockNode, str]:
    path = image(tmp_path)
    g = BlockGraph()
    node = await g.add({"driver": "raw", "node-name": "drive0",
                        "file": {"driver": "file", "filename": path}, **extra})
    return g, node, path


def file_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def data_extents(path: str) -> list[tuple[int, int]]:
    """[(start, end)] of data per SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def bits(node: BlockNode, name: str = "b0") -> int:
    bm = node.bitmaps.lookup(name)
    return bm.count // bm.granularity


async def test_qemu_io_write_read_pattern_and_file(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    out = await run_qemu_io(node, "write -P0x49 0 64k")
    assert out.startswith("wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; ")
    assert out.endswith(" ops/sec)\n")
    assert "read 65536/65536" in await run_qemu_io(node, "read -P 0x49 0 0x10000")
    bad = await run_qemu_io(node, "r -P 0x48 0 64k")
    assert bad.startswith("Pattern verification failed at offset 0, 65536 bytes\nread 65536/")
    assert await run_qemu_io(node, "read -q -P 0x49 -s 4096 -l 512 0 64k") == ""
    assert await run_qemu_io(node, "read -q -P 0 -s 4096 -l 512 0 64k") == (
        "Pattern verification failed at offset 4096, 512 bytes\n")
    assert file_bytes(path, 0, K64) == b"\x49" * K64
    assert await run_qemu_io(node, "w 0x3ff0000 64k") != ""
    assert file_bytes(path, 0x3FF0000, K64) == b"\xcd" * K64  # default pattern
    # holes preserved where nothing was written
    assert data_extents(path) == [(0, K64), (0x3FF0000, SIZE)]
    assert await node.block_status(0, SIZE) == (True, K64)
    assert await node.block_status(K64, SIZE) == (False, 0x3FF0000 - K64)
    await g.close()


async def test_partial_cluster_block_status(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    await run_qemu_io(node, "write -P0x77 0x00f8000 64k")  # 257 group 1, second write
    assert await node.block_status(0xF0000, K64) == (False, 0x8000)
    assert await node.block_status(0xF8000, 1 << 20) == (True, K64)
    await g.close()


async def test_out_of_range_and_read_only(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    with pytest.raises(BlockIOError) as ei:
        await node.write(SIZE - 512, bytes(1024))
    assert ei.value.errno == errno.EIO and ei.value.strerror == "Input/output error"
    with pytest.raises(BlockIOError):
        await node.read(SIZE, 1)
    with pytest.raises(BlockIOError):
        await node.read(-1, 1)
    assert await run_qemu_io(node, f"write {SIZE} 512") == "write failed: Input/output error\n"
    assert await run_qemu_io(node, f"read {SIZE - 512} 1k") == "read failed: Input/output error\n"
    assert os.path.getsize(path) == SIZE
    ro = await g.add({"driver": "raw", "node-name": "ro", "read-only": True,
                      "file": {"driver": "file", "filename": path}})
    with pytest.raises(BlockIOError) as ei:
        await ro.write(0, b"x")
    assert ei.value.errno == errno.EPERM
    await g.close()


async def test_write_zeroes_and_discard(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    await run_qemu_io(node, "write -P1 0 1M")
    # zero without unmap: data reads as zero
    assert await run_qemu_io(node, "write -q -z 0 64k") == ""
    assert file_bytes(path, 0, K64) == bytes(K64)
    # discard on discard=ignore: dropped, no bitmap dirtying
    node.bitmaps.add("b0")
    assert (await run_qemu_io(node, "discard 128k 64k")).startswith("discard 65536/65536 bytes")
    assert file_bytes(path, 2 * K64, K64) == b"\x01" * K64 and bits(node) == 0
    # -u without unmap on the node: still zeroes, file keeps its data layout
    await node.write_zeroes(3 * K64, K64, may_unmap=True)
    assert file_bytes(path, 3 * K64, K64) == bytes(K64) and bits(node) == 1
    await g.close()

    g, node, path = await drive(tmp_path, discard="unmap")
    await run_qemu_io(node, "write -P1 0 1M")
    node.bitmaps.add("b0")
    assert data_extents(path) == [(0, 1 << 20)]
    await run_qemu_io(node, "write -z -u 0 64k")
    await run_qemu_io(node, "discard 128k 64k")
    assert file_bytes(path, 0, K64) == bytes(K64)
    assert file_bytes(path, 2 * K64, K64) == bytes(K64)
    assert data_extents(path) == [(K64, 2 * K64), (3 * K64, 1 << 20)]
    assert bits(node) == 2
    await g.close()


async def test_detect_zeroes(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path, **{"detect-zeroes": "unmap", "discard": "unmap"})
    await node.write(0, b"\x01" * K64)
    await node.write(0, bytes(K64))
    assert data_extents(path) == []
    await g.close()


async def test_bitmaps_dirtied_after_write_even_on_failure(tmp_path: Path) -> None:
    path = image(tmp_path)
    g = BlockGraph()
    node = await g.add({"driver": "raw", "node-name": "drive0", "file": {
        "driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "file", "filename": path, "node-name": "img"},
        "inject-error": [{"event": "write_aio", "iotype": "write"}]}})
    dbg, img = g.lookup("dbg"), g.lookup("img")
    for n in (node, dbg, img):
        n.bitmaps.add("b0")
    dis = node.bitmaps.add("off", disabled=True)
    assert await run_qemu_io(node, "write 0x00f8000 64k") == "write failed: Input/output error\n"
    assert bits(node) == 2 and bits(dbg) == 2  # failed in blkdebug, both marked
    assert bits(img) == 0  # never reached
    assert dis.count == 0
    assert data_extents(path) == []
    # reads never dirty
    await node.read(0x2000000, K64)
    assert bits(node) == 2
    await g.close()


async def test_before_write_hooks(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    await node.write(0, b"\x01" * K64)
    node.bitmaps.add("b0")
    seen: list[tuple[str, int, int, bytes]] = []

    async def first(n: BlockNode, off: int, length: int) -> None:
        # the hook can read the old data of the locked range
        seen.append(("first", off, length, await n.read(off, 4)))

    async def second(n: BlockNode, off: int, length: int) -> None:
        seen.append(("second", off, length, b""))

    h1 = node.add_before_write_hook(first)
    node.add_before_write_hook(second)
    await node.write(0, b"\x02" * 512)
    assert seen == [("first", 0, 512, b"\x01" * 4), ("second", 0, 512, b"")]
    await node.write_zeroes(K64, 512)
    assert seen[-1][:3] == ("second", K64, 512)
    h1.remove()
    h1.remove()
    seen.clear()
    await node.write(0, b"\x03")
    assert [s[0] for s in seen] == ["second"]

    async def fail(n: BlockNode, off: int, length: int) -> None:
        raise BlockIOError(errno.ENOSPC)

    node.bitmaps.lookup("b0").clear()
    node.add_before_write_hook(fail)
    before = file_bytes(path, 0, K64)
    assert await run_qemu_io(node, "write -P9 0 4k") == "write failed: No space left on device\n"
    assert file_bytes(path, 0, K64) == before
    assert bits(node) == 0  # the request never reached the node
    await g.close()


async def test_overlapping_writes_serialised(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    order: list[str] = []
    gate = asyncio.Event()

    async def hook(n: BlockNode, off: int, length: int) -> None:
        order.append(f"start {off}")
        if off == 0:
            await gate.wait()
        order.append(f"end {off}")

    node.add_before_write_hook(hook)
    t1 = asyncio.create_task(node.write(0, b"\x01" * K64))
    await settle()
    t2 = asyncio.create_task(node.write(4096, b"\x02" * 4096))  # overlaps t1
    t3 = asyncio.create_task(node.write(2 * K64, b"\x03" * 4096))  # disjoint
    await settle()
    assert order == ["start 0", f"start {2 * K64}", f"end {2 * K64}"]
    gate.set()
    await asyncio.gather(t1, t2, t3)
    assert order[3:] == ["end 0", "start 4096", "end 4096"]
    assert file_bytes(path, 0, 8192) == b"\x01" * 4096 + b"\x02" * 4096
    await g.close()


async def test_flush_and_qemu_io_misc(tmp_path: Path) -> None:
    g, node, path = await drive(tmp_path)
    assert await run_qemu_io(node, "flush") == ""
    assert await run_qemu_io(node, "f") == ""
    await node.write(0, b"x")
    assert node.flushed_gen != node.write_gen
    await node.flush()
    assert node.flushed_gen == node.write_gen
    await g.close()
