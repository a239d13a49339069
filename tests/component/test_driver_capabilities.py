"""Driver capabilities (qmpd/block/drivers/base.py): the generic block code
asks drivers instead of recognising them by name or class."""

from __future__ import annotations

import ast
import asyncio
import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpd.bitmap import DirtyBitmap
from qmpd.block import BlockGraph, BlockIOError, BlockNode
from qmpd.block.copy import BlockCopy
from qmpd.block.drivers import DRIVERS, BaseDriver, FileWindow
from qmpd.block.fastcopy import file_view
from tests.component.test_job_helpers import settle
from qmpd.commands.views import block_device_info, image_info

pytestmark = [pytest.mark.timeout(30)]

PKG = Path(__file__).resolve().parents[2] / "qmpd"
SIZE = 4 << 20
K64 = 65536


class Shift(BaseDriver):
    """A format that is not ``raw``: node bytes are child bytes at +offset,
    and it has a dirty bit of its own."""

    name = "shift"
    is_format = True

    def __init__(self, child: BlockNode, offset: int, dirty: bool | None = True) -> None:
        self.child = child
        self.offset = offset
        self.dirty = dirty

    @property
    def length(self) -> int:
        return self.child.length - self.offset

    @property
    def filename(self) -> str:
        return self.child.driver.filename

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.child.read(self.offset + offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.child.write(self.offset + offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.child.write_zeroes(self.offset + offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.child.discard(self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        return await self.child.block_status(self.offset + offset, length)

    async def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        return offset < K64, length if offset >= K64 else min(length, K64 - offset)

    def dirty_flag(self) -> bool | None:
        return self.dirty

    def file_window(self) -> FileWindow | None:
        return FileWindow(self.offset, child=self.child)


def image(tmp_path: Path, name: str, fill: bytes = b"") -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(SIZE)
    return str(path)


async def file_node(g: BlockGraph, path: str, name: str) -> BlockNode:
    return await g.add({"driver": "file", "node-name": name, "filename": path})


@pytest.mark.asyncio
async def test_fast_path_asks_file_window_not_driver_class(tmp_path: Path) -> None:
    g = BlockGraph()
    src_file = await file_node(g, image(tmp_path, "s.img", b"\0" * K64 + b"\xab" * K64), "sf")
    src = BlockNode("src", Shift(src_file, K64), children={"file": src_file})
    g.add_node(src)
    dst = await g.add({"driver": "raw", "node-name": "dst",
                       "file": {"driver": "file", "filename": image(tmp_path, "d.img")},
                       "size": SIZE - K64})
    view = file_view(src, for_write=False)
    assert view is not None and view.base == K64 and [n for n, _ in view.chain] == [src, src_file]
    assert file_view(dst, for_write=True) is not None
    bm = DirtyBitmap(src.length, K64)
    bm.hbitmap.fill()
    copy = BlockCopy(src, dst, bm, cluster_size=K64)
    assert copy.fast_path  # the fast path applies to a non-raw window
    assert await copy.run() is None
    assert await dst.read(0, K64) == b"\xab" * K64
    assert await dst.read(K64, K64) == bytes(K64)


@pytest.mark.asyncio
async def test_no_file_window_means_no_fast_path(tmp_path: Path) -> None:
    g = BlockGraph()
    null = await g.add({"driver": "null-co", "node-name": "n0", "size": SIZE})
    assert file_view(null, for_write=False) is None


@pytest.mark.asyncio
async def test_write_around_locks_hooks_and_records_on_the_chain(tmp_path: Path) -> None:
    g = BlockGraph()
    top = await g.add({"driver": "raw", "node-name": "top", "offset": K64,
                       "file": {"driver": "file", "filename": image(tmp_path, "a.img")}})
    below = top.children["file"]
    top_bm = top.bitmaps.add("b0", K64)
    low_bm = below.bitmaps.add("b1", K64)
    seen: list[tuple[str, int, int]] = []

    async def hook(node: BlockNode, offset: int, length: int) -> None:
        seen.append((node.node_name, offset, length))

    handle = top.add_before_write_hook(hook)
    gate, started = asyncio.Event(), asyncio.Event()

    async def io() -> None:
        started.set()
        await gate.wait()

    around = asyncio.ensure_future(top.write_around([(0, K64), (2 * K64, K64)], io,
                                                    below=[(below, K64)]))
    await started.wait()
    writer = asyncio.ensure_future(top.write(K64, b"x" * K64))  # inside the locked span
    await settle()
    assert not writer.done() and len(seen) == 2  # waits for the range lock, before its hook
    gate.set()
    await around
    await writer
    assert seen == [("top", 0, K64), ("top", 2 * K64, K64), ("top", K64, K64)]
    assert top_bm.count == 3 * K64 and low_bm.count == 3 * K64
    assert top.write_gen == 2 + 1 and below.write_gen == 2 + 1
    handle.remove()

    async def failing() -> None:
        raise BlockIOError(errno.EIO)

    with pytest.raises(BlockIOError):
        await top.write_around([(8 * K64, K64)], failing, below=[(below, K64)])
    assert top_bm.count == 4 * K64 and low_bm.count == 4 * K64  # recorded even on failure


@pytest.mark.asyncio
async def test_copy_zero_writes_on_holes_take_the_target_lock(tmp_path: Path) -> None:
    """block-copy's skipped hole zeroing goes through write_around."""
    g = BlockGraph()
    src = await g.add({"driver": "raw", "node-name": "src",
                       "file": {"driver": "file", "filename": image(tmp_path, "s.img")}})
    dst = await g.add({"driver": "raw", "node-name": "dst",
                       "file": {"driver": "file", "filename": image(tmp_path, "d.img")}})
    dst_bm = dst.bitmaps.add("b0", K64)
    calls: list[tuple[Any, ...]] = []
    real = dst.write_around

    async def spy(ranges: Any, io: Any, **kw: Any) -> None:
        calls.append(tuple(ranges))
        await real(ranges, io, **kw)

    dst.write_around = spy  # type: ignore[method-assign]
    bm = DirtyBitmap(SIZE, K64)
    bm.hbitmap.fill()
    assert await BlockCopy(src, dst, bm, cluster_size=K64).run() is None
    assert calls and dst_bm.count == SIZE


@pytest.mark.asyncio
async def test_dirty_flag_and_allocation(tmp_path: Path) -> None:
    g = BlockGraph()
    raw = await g.add({"driver": "raw", "node-name": "r",
                       "file": {"driver": "file", "filename": image(tmp_path, "a.img")}})
    null = await g.add({"driver": "null-co", "node-name": "n"})
    assert raw.dirty_flag() is False and image_info(raw)["dirty-flag"] is False
    assert null.dirty_flag() is None and "dirty-flag" not in image_info(null)
    shifted = BlockNode("s", Shift(raw, K64), children={"file": raw})
    assert image_info(shifted)["dirty-flag"] is True
    dbg = BlockNode("d", _Filter(shifted), children={"image": shifted})
    assert dbg.dirty_flag() is True  # a filter answers for its filtered child
    assert await raw.is_allocated(0, SIZE) == (True, SIZE)
    assert await dbg.is_allocated(0, SIZE) == (True, K64)
    assert await dbg.is_allocated(K64, SIZE) == (False, SIZE - 2 * K64)
    assert shifted.backing is None


class _Filter(BaseDriver):
    name = "filter"
    is_filter = True

    def __init__(self, child: BlockNode) -> None:
        self.child = child

    @property
    def length(self) -> int:
        return self.child.length

    @property
    def filename(self) -> str:
        return self.child.driver.filename

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.child.read(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.child.write(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.child.write_zeroes(offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.child.discard(offset, length)


def test_format_capability_is_declared_by_the_driver() -> None:
    assert {name for name, spec in DRIVERS.items() if spec.is_format} == {"raw", "qcow2"}


@pytest.mark.parametrize("module", ["qmpd.block.copy", "qmpd.block.drivers.cbw",
                                    "qmpd.block.fastcopy", "qmpd.block.node", "qmpd.block"])
def test_block_modules_import_alone(module: str) -> None:
    """No import cycle between block-copy and the drivers, whichever comes first."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True,
                   env=None, cwd=PKG.parent)


def test_no_driver_name_special_cases_outside_the_drivers() -> None:
    """block/*.py outside drivers/ neither compares with driver names nor
    tests driver classes; ``"file"`` is also the child role and is allowed."""
    names = set(DRIVERS) - {"file"}
    problems = []
    for path in sorted((PKG / "block").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names:
                    problems.append(f"{path.name}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "qmpd.block.drivers.") and node.module != "qmpd.block.drivers.base":
                problems.append(f"{path.name}:{node.lineno}: imports {node.module}")
    assert problems == []


@pytest.mark.asyncio
async def test_backing_child_is_nested_as_backing_image(tmp_path: Path) -> None:
    """A format with a ``backing`` child (as qcow2 will have): the views nest
    the backing chain like a filter's, and ``backing`` names the child."""
    g = BlockGraph()
    base = await g.add({"driver": "raw", "node-name": "base",
                        "file": {"driver": "file", "filename": image(tmp_path, "b.img")}})
    top_file = await file_node(g, image(tmp_path, "t.img"), "tf")
    top = BlockNode("top", Shift(top_file, 0), children={"file": top_file, "backing": base})
    assert top.backing is base and top.filter_or_cow_child is base
    assert base.filter_or_cow_child is None
    info = block_device_info(top)
    assert info["backing_file_depth"] == 1
    assert info["image"]["backing-image"] == image_info(base)
    assert "backing-image" not in block_device_info(top, flat=True)["image"]
