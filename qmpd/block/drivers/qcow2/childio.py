"""What :class:`~.image.Qcow2Image` needs from its file child, and the
callables the driver hands it (growing the file, filling mapped writes,
chained writes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

__all__ = ["ChildIO", "Grow", "Fill", "Buffer", "ChainWrite", "ChainWriter"]


class ChildIO(Protocol):
    """What the image needs from a child node (``qmpd.block.node.BlockNode``)."""

    @property
    def length(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    def debug_event(self, event: str) -> None: ...

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]: ...


#: ``await grow(new_length)`` makes the file at least that long.
Grow = Callable[[int], Awaitable[None]]
#: ``await fill(extents)`` puts the data of a mapped write at its host
#: offsets: ``(guest offset, host offset, n)``.
Fill = Callable[[list[tuple[int, int, int]]], Awaitable[None]]
Buffer = bytes | bytearray | memoryview
#: ``await write(writes)`` pwrites each ``(file offset, bytes)`` in turn in
#: one worker call (raises :class:`~qmpd.block.io.SeqWriteError`).
ChainWrite = Callable[[list[tuple[int, Buffer]]], Coroutine[Any, Any, None]]
#: :attr:`Qcow2Image.chain_writer`: a :data:`ChainWrite` for the file child
#: now, or None (it is not a plain file).
ChainWriter = Callable[[], ChainWrite | None]
