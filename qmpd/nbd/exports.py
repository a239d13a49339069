"""NBD exports as domain objects: what a client reads, writes and maps.

An :class:`Export` serves one block node over NBD.  Every request goes
through the node graph (:class:`~qmpd.block.node.BlockNode`), so exporting
a ``snapshot-access`` node serves the point-in-time view while the disk
keeps changing.  The export holds its node in use for its whole life
(``blockdev-del`` answers QEMU's ``"Node %s is in use"``) and marks each
exported dirty bitmap busy.

Meta contexts (QEMU's docs/interop/nbd.txt): ``base:allocation`` (flags
HOLE=1, ZERO=2), ``qemu:allocation-depth`` (1: allocated in the node
itself, 0: not; qmpd's nodes have no backing files, so every byte is
depth 1) and ``qemu:dirty-bitmap:NAME`` (flag 1: dirty).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field

from qmpd.bitmap import DirtyBitmap
from qmpd.block.errors import BlockIOError
from qmpd.block.fastcopy import FileView, file_view, mark_read
from qmpd.block.node import BlockNode
from qmpd.nbd.protocol import ExportInfo

__all__ = ["Export", "ExportSettings", "MAX_EXTENTS"]

STATE_HOLE, STATE_ZERO = 1, 2
STATE_DIRTY = 1
#: Most extents one BLOCK_STATUS chunk carries (QEMU's cap is 1 MiB of them).
MAX_EXTENTS = 1 << 20
#: Largest extent length (the wire field is 32 bits; keep it block-aligned).
_MAX_EXTENT = (1 << 32) - 4096


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """What ``block-export-add type=nbd`` asked for."""

    id: str
    name: str
    description: str = ""
    writable: bool = False
    writethrough: bool = False
    allocation_depth: bool = False


@dataclass(eq=False)
class Export:
    """One NBD export of ``node``.

    :param bitmaps: the exported bitmaps, by name (already checked).
    """

    settings: ExportSettings
    node: BlockNode
    bitmaps: dict[str, DirtyBitmap] = field(default_factory=dict)
    #: block-export-del mode=hard (or nbd-server-stop) began.
    shutting_down: bool = False
    #: Clients attached (counted by the server).
    clients: int = 0
    _backend_taken: bool = False

    @property
    def id(self) -> str:
        """The export id (``query-block-exports``)."""
        return self.settings.id

    @property
    def name(self) -> str:
        """The NBD export name clients ask for."""
        return self.settings.name

    def open(self) -> None:
        """Take the node (in use, as QEMU's anonymous BlockBackend) and the
        bitmaps (busy)."""
        self.node.anonymous_backends += 1
        self._backend_taken = True
        for bm in self.bitmaps.values():
            bm.busy = True
            # Load the extent search now (numpy), not on the first request.
            next(iter(bm.hbitmap.dirty_extents(0, bm.size)), None)

    def close(self) -> None:
        """Give back what :meth:`open` took (idempotent)."""
        if self._backend_taken:
            self.node.anonymous_backends -= 1
            self._backend_taken = False
        for bm in self.bitmaps.values():
            bm.busy = False
        self.bitmaps = {}

    def info(self) -> ExportInfo:
        """:return: the handshake's view of this export."""
        contexts = ["base:allocation"]
        if self.settings.allocation_depth:
            contexts.append("qemu:allocation-depth")
        contexts += [f"qemu:dirty-bitmap:{n}" for n in self.bitmaps]
        return ExportInfo(
            name=self.name,
            size=self.node.length,
            read_only=not self.settings.writable,
            description=self.settings.description,
            contexts=tuple(contexts),
            # QEMU 7.2 advertises multi-conn on every export (its flush
            # reaches the one node all connections share).
            multi_conn=True,
        )

    # ------------------------------------------------------------ requests

    def read_cached(self, offset: int, length: int) -> list[tuple[int, bytes | bytearray | int]] | None:
        """A structured READ answered at once from the page cache, when the
        node is a plain raw/file chain and every byte is cached; else None
        (then :meth:`read`)."""
        node = self.node
        if length == 0 or offset + length > node.length:
            return None
        view = file_view(node, for_write=False)
        if view is None:
            return None
        direct = view.image.read_sparse_cached(offset + view.base, length, base=view.base)
        if direct is not None:
            mark_read(view, length)
        return direct

    def file_view_for_read(self, offset: int, length: int) -> FileView | None:
        """The file behind the node when a READ of the range may be read
        straight from it (a plain raw/file chain, the test of
        :meth:`send_cached`), else None.  Only reads the graph: a
        connection's data pump calls it from its own thread."""
        node = self.node
        if length == 0 or offset + length > node.length:
            return None
        return file_view(node, for_write=False)

    def send_cached(self, out_fd: int, head: bytes, offset: int, length: int) -> bytes | None:
        """A READ of a plain raw/file chain whose range is all data and all
        in the page cache, sent as ``head`` then the file's bytes straight
        to the socket ``out_fd`` (sendfile); None, nothing sent, otherwise.
        :return: what the socket did not take at once (see
        :meth:`~qmpd.block.io.ImageFile.send_cached`)."""
        node = self.node
        if length == 0 or offset + length > node.length:
            return None
        view = file_view(node, for_write=False)
        if view is None:
            return None
        rest = view.image.send_cached(out_fd, head, offset + view.base, length)
        if rest is not None:
            mark_read(view, length)
        return rest

    async def read(self, offset: int, length: int, *,
                   holes: bool) -> list[tuple[int, bytes | bytearray | int]]:
        """:return: READ segments: ``(offset, data)``, or ``(offset, n)`` for
        a run of zeroes the node reports as a hole (only if ``holes``)."""
        node = self.node
        if not holes or length == 0:
            return [(offset, await node.read(offset, length))]
        view = file_view(node, for_write=False)
        if view is not None:   # a plain raw/file chain: one pool call
            if offset + length > node.length:
                raise BlockIOError(errno.EIO)
            direct = await view.image.read_sparse(offset + view.base, length, base=view.base)
            mark_read(view, length)
            return direct
        segments: list[tuple[int, bytes | bytearray | int]] = []
        pos, end = offset, offset + length
        while pos < end:
            is_data, n = await node.block_status(pos, end - pos)
            if is_data:
                data = await node.read(pos, n)
                if segments and isinstance(prev := segments[-1][1], (bytes, bytearray)):
                    segments[-1] = (segments[-1][0], prev + data)
                else:
                    segments.append((pos, data))
            elif segments and isinstance(prev_n := segments[-1][1], int):
                segments[-1] = (segments[-1][0], prev_n + n)
            else:
                segments.append((pos, n))
            pos += n
        return segments

    async def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        """WRITE (FUA or writethrough: flushed before the reply)."""
        await self.node.write(offset, data)
        if fua or self.settings.writethrough:
            await self.node.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool,
                           fast: bool, fua: bool) -> None:
        """WRITE_ZEROES; with FAST_ZERO, fail with ENOTSUP unless the range
        can become zeroes without writing data (a hole on a discard=unmap
        node)."""
        if fast and not (may_unmap and self.node.discard_mode == "unmap"):
            raise BlockIOError(errno.ENOTSUP)
        await self.node.write_zeroes(offset, length, may_unmap=may_unmap)
        if fua or self.settings.writethrough:
            await self.node.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """TRIM (dropped unless the node has ``discard: unmap``)."""
        await self.node.discard(offset, length)
        if fua or self.settings.writethrough:
            await self.node.flush()

    async def flush(self) -> None:
        """FLUSH."""
        await self.node.flush()

    async def cache(self, offset: int, length: int) -> None:
        """CACHE: a hint; qmpd reads nothing ahead."""

    async def block_status(self, context: str, offset: int, length: int,
                           one: bool) -> list[tuple[int, int]]:
        """:return: ``(length, flags)`` extents of ``context`` covering
        ``[offset, offset+length)`` (one extent if ``one``)."""
        if context.startswith("qemu:dirty-bitmap:"):
            return self._bitmap_extents(self.bitmaps[context[18:]], offset, length, one)
        if context == "qemu:allocation-depth":
            return [(min(length, _MAX_EXTENT), 1)]
        return await self._allocation(offset, length, one)

    async def _allocation(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end and len(out) < MAX_EXTENTS:
            is_data, n = await self.node.block_status(pos, min(end - pos, _MAX_EXTENT))
            flags = 0 if is_data else STATE_HOLE | STATE_ZERO
            if out and out[-1][1] == flags and out[-1][0] + n <= _MAX_EXTENT:
                out[-1] = (out[-1][0] + n, flags)
            else:
                if one and out:
                    break
                out.append((n, flags))
            pos += n
        return out

    @staticmethod
    def _bitmap_extents(bm: DirtyBitmap, offset: int, length: int,
                        one: bool) -> list[tuple[int, int]]:
        hb = bm.hbitmap
        end = min(offset + length, bm.size)
        out: list[tuple[int, int]] = []
        pos = offset
        for start, n in hb.dirty_extents(offset, end):
            if start > pos:
                out.append((start - pos, 0))
            out.append((n, STATE_DIRTY))
            pos = start + n
            if one or len(out) >= MAX_EXTENTS:
                break
        if pos < end and (not out or not one) and len(out) < MAX_EXTENTS:
            out.append((end - pos, 0))
        return _split_long(out[:1] if one else out)


def _split_long(extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, flags in extents:
        while n > _MAX_EXTENT:
            out.append((_MAX_EXTENT, flags))
            n -= _MAX_EXTENT
        out.append((n, flags))
    return out
