"""Driver ``file``: a raw image file on the host (QEMU's file-posix)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverSpec, FileWindow, OpenContext
from qmpd.block.errors import BlockIOError, NodeOpenError
from qmpd.block.fdsets import FdsetOpenError
from qmpd.block.io import ImageFile, NotRegularFile
from qmpd.block.locking import PermLocks, supported

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["FileDriver", "SPEC", "open_file"]

SECTOR = 512


class FileDriver(BaseDriver):
    """Requests go straight to :class:`~qmpd.block.io.ImageFile`.

    The length is the file size rounded up to 512 bytes, as QEMU reports it;
    reads of the padding return zeroes.
    """

    name = "file"
    is_protocol = True

    def __init__(self, image: ImageFile, size: int, locking: bool = False) -> None:
        self.image = image
        #: QEMU's permission lock bytes on the file (None: ``locking=off``).
        self.perm_locks = PermLocks(image.fd) if locking else None
        self._length = -(-size // SECTOR) * SECTOR

    @property
    def length(self) -> int:
        return self._length

    @property
    def filename(self) -> str:
        return self.image.path

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.image.read(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.image.write(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.image.write_zeroes(offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.image.discard(offset, length)

    async def flush_to_disk(self) -> None:
        await self.image.flush()

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        try:
            return await self.image.block_status(offset, length)
        except BlockIOError:
            return True, length

    def dirty_flag(self) -> bool | None:
        """A plain file has no dirty bit; QEMU lists ``dirty-flag: false``."""
        return False

    def file_window(self) -> FileWindow | None:
        """The whole file."""
        return FileWindow(0, image=self.image)

    def actual_size(self) -> int | None:
        n = self.image.allocated_size()
        return n if n >= 0 else None

    async def truncate(self, size: int) -> None:
        """Resize the file (used by ``blockdev-create``-style callers)."""
        await self.image.truncate(size)
        self._length = -(-size // SECTOR) * SECTOR

    def close(self) -> None:
        if self.perm_locks is not None:
            self.perm_locks.fd = -1  # closing the descriptor drops its locks
        self.image.close()


async def open_file(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Open ``options["filename"]`` read-write, or O_RDONLY when read-only.

    :raise NodeOpenError: ``"Could not open '%s': <strerror>"``.
    """
    path = str(options["filename"])
    try:
        image = await ImageFile.open(path, read_only=ctx.read_only, direct=ctx.direct, pool=ctx.pool)
    except FdsetOpenError as exc:
        raise NodeOpenError(exc.desc) from None
    except NotRegularFile:
        raise NodeOpenError(f"'file' driver requires '{path}' to be a regular file") from None
    except BlockIOError as exc:
        raise NodeOpenError(f"Could not open '{path}': {exc.strerror}") from exc
    try:
        size = await image.size()
    except BlockIOError as exc:
        image.close()
        raise NodeOpenError(f"Could not open '{path}': {exc.strerror}") from exc
    locking = str(options.get("locking") or "auto")
    return FileDriver(image, size, locking != "off" and supported(image.fd)), {}


#: ``blockdev-add`` driver ``file``.
SPEC = DriverSpec(open_file, is_format=FileDriver.is_format)
