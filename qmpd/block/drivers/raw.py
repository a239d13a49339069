"""Driver ``raw``: the format layer over a ``file`` child, with an optional
``offset``/``size`` window.  It raises the blkdebug events ``read_aio`` and
``write_aio`` on its child before forwarding reads and writes."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverSpec, FileWindow, OpenContext
from qmpd.block.errors import BlockIOError, NodeOpenError
from qmpd.qapi.ghash import qdict_json

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["RawDriver", "SPEC", "open_raw"]

SECTOR = 512


class RawDriver(BaseDriver):
    """Maps node offsets to ``offset + n`` on the ``file`` child."""

    name = "raw"
    is_format = True

    def __init__(self, file: BlockNode, offset: int, size: int | None,
                 explicit: dict[str, Any] | None = None) -> None:
        self.file = file
        self.offset = offset
        self.size = size
        #: ``offset``/``size`` as given: QEMU then names the node ``json:{...}``.
        self.explicit = explicit or {}

    @property
    def length(self) -> int:
        avail = max(0, self.file.length - self.offset)
        return avail if self.size is None else min(self.size, avail)

    @property
    def _inherits_filename(self) -> bool:
        """QEMU reuses the child's filename only with no strong options and a
        protocol child that has a plain (not ``json:``) filename itself."""
        child = self.file.driver
        return not self.explicit and child.is_protocol and not child.filename.startswith("json:")

    @property
    def filename(self) -> str:
        if not self._inherits_filename:
            return "json:" + qdict_json(self.full_options())
        return self.file.driver.filename

    def full_options(self) -> dict[str, Any]:
        return {"driver": "raw", "file": self.file.driver.full_options(), **self.explicit}

    async def pread(self, offset: int, length: int) -> bytes:
        self.file.debug_event("read_aio")
        return await self.file.read(self.offset + offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.file.debug_event("write_aio")
        await self.file.write(self.offset + offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.file.write_zeroes(self.offset + offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.file.discard(self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        return await self.file.block_status(self.offset + offset, length)

    async def truncate(self, size: int) -> None:
        if self.size is not None:
            raise BlockIOError(errno.ENOTSUP)
        await self.file.driver.truncate(self.offset + size)

    def dirty_flag(self) -> bool | None:
        """raw has no header: whatever its file child reports."""
        return self.file.dirty_flag()

    def file_window(self) -> FileWindow | None:
        """``offset`` bytes into the file child."""
        return FileWindow(self.offset, child=self.file)

    def actual_size(self) -> int | None:
        return self.file.driver.actual_size()


async def open_raw(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Open the ``file`` child, then check ``offset``/``size`` against it.

    :raise NodeOpenError: QEMU's offset/size texts (a size not given prints as 0).
    """
    file = await ctx.open_child(options["file"], "file")
    offset = int(options.get("offset", 0))
    size = options.get("size")
    real = file.length
    if offset > real:
        raise NodeOpenError(
            f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
        )
    if size is not None and real - offset < int(size):
        raise NodeOpenError(
            f"The sum of offset ({offset}) and size ({int(size)}) has to be smaller or equal to the "
            f" actual size of the containing file ({real})"
        )
    if size is not None and int(size) % SECTOR:
        raise NodeOpenError(f"Specified size is not multiple of {SECTOR}")
    explicit = {k: options[k] for k in ("offset", "size") if k in options}
    return RawDriver(file, offset, None if size is None else int(size), explicit), {"file": file}


#: ``blockdev-add`` driver ``raw``.
SPEC = DriverSpec(open_raw, is_format=RawDriver.is_format)
