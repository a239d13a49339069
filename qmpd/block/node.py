"""Block nodes and the generic request path.

A :class:`BlockNode` is one node of the graph (QEMU's BlockDriverState).
Its request methods do what QEMU's generic block layer does around the
driver, then call the driver, which may forward to child nodes::

    raw "drive0" --file--> blkdebug "#block123" --image--> file "#block245"

``write`` on ``drive0``: bounds check, range lock, before-write hooks, then
the raw driver raises ``write_aio`` on the blkdebug node and calls its
``write``, which raises ``pwritev``, checks the rules, writes the file node
and raises ``pwritev_done``; each node marks its own bitmaps when its part
is over, even if it failed (spec 5.2).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from qmpd.bitmap.dirty import BitmapList
from qmpd.block.errors import BlockIOError, NodeInUse
from qmpd.block.rangelock import RangeLock

if TYPE_CHECKING:
    # Type only: the drivers package imports block-copy, which imports this
    # module; a run-time import here would close that cycle.
    from qmpd.block.drivers.base import BlockDriver
    from qmpd.block.persist import NodeJournal

__all__ = ["BeforeWriteHook", "BlockNode", "HookHandle"]

#: ``await hook(node, offset, length)`` runs before a write, write-zeroes or
#: (effective) discard of ``[offset, offset+length)`` lands on ``node``,
#: while the range is locked; raising fails the request, which then never
#: reaches the node (no data change, no dirtying).
BeforeWriteHook = Callable[["BlockNode", int, int], Awaitable[None]]

_WRITE, _ZEROES, _DISCARD = 0, 1, 2


class HookHandle:
    """Returned by :meth:`BlockNode.add_before_write_hook`."""

    __slots__ = ("_node", "_hook")

    def __init__(self, node: BlockNode, hook: BeforeWriteHook) -> None:
        self._node = node
        self._hook = hook

    def remove(self) -> None:
        """Unregister the hook (idempotent)."""
        hooks = list(self._node._hooks)
        if self._hook in hooks:
            hooks.remove(self._hook)
            self._node._hooks = tuple(hooks)


def _is_zero(data: bytes | bytearray | memoryview) -> bool:
    buf = data if not isinstance(data, memoryview) else data.tobytes()
    return buf.count(0) == len(buf)


class BlockNode:
    """One node: options, links, bitmaps, blockers and the request path.

    Created by :class:`~qmpd.block.graph.BlockGraph`; other layers may build
    one directly around their own driver (a filter) and register it with
    :meth:`BlockGraph.add_node`.
    """

    def __init__(
        self,
        node_name: str,
        driver: BlockDriver,
        *,
        children: dict[str, BlockNode] | None = None,
        read_only: bool = False,
        discard: str = "ignore",
        detect_zeroes: str = "off",
        cache_direct: bool = False,
        cache_no_flush: bool = False,
        auto_named: bool = False,
        owned_by_monitor: bool = True,
    ) -> None:
        #: The node-name (user-given or ``#block...``).
        self.node_name = node_name
        self.driver = driver
        #: Child role ("file", "image", ...) -> node.
        self.children: dict[str, BlockNode] = {}
        #: Nodes that have this one as a child (one entry per edge).
        self.parents: list[BlockNode] = []
        self.read_only = read_only
        #: The ``discard`` option: "ignore" or "unmap".
        self.discard_mode = discard
        #: "off", "on" or "unmap".
        self.detect_zeroes = detect_zeroes
        self.cache_direct = cache_direct
        self.cache_no_flush = cache_no_flush
        #: The name was generated.
        self.auto_named = auto_named
        #: blockdev-del may delete it (False for inline children).
        self.owned_by_monitor = owned_by_monitor
        #: Name of a BlockBackend this node is attached to (qmpd has none so far).
        self.backend: str | None = None
        #: Anonymous BlockBackends on this node (an NBD export each), which
        #: make blockdev-del answer "Node %s is in use" as a device does.
        self.anonymous_backends = 0
        #: Op-blocker reasons, newest last ("block device is in use by ...").
        self.blockers: list[str] = []
        #: Extra references held by jobs etc. (see :meth:`hold`).
        self.refs = 0
        #: Incremented by every write-type request; compared by flush.
        self.write_gen = 0
        self.flushed_gen = 0
        #: Bytes read and written (zero writes included) through this node.
        self.bytes_read = 0
        self.bytes_written = 0
        self.bitmaps = BitmapList(driver.length, node_label=lambda: self.node_name)
        self._hooks: tuple[BeforeWriteHook, ...] = ()
        #: Persistent-bitmap journal (qmpd.block.persist): write-ahead dirtying.
        self.write_ahead: NodeJournal | None = None
        self._lock = RangeLock()
        self._debug = driver.debug_event if driver.has_events else None
        for role, child in (children or {}).items():
            self.attach_child(role, child)

    def __repr__(self) -> str:
        return f"<BlockNode {self.node_name!r} drv={self.driver.name}>"

    # ------------------------------------------------------------ structure

    @property
    def drv(self) -> str:
        """The driver name ("raw", "file", ...)."""
        return self.driver.name

    @property
    def length(self) -> int:
        """Size in bytes (``virtual-size``)."""
        return self.driver.length

    @property
    def backing(self) -> BlockNode | None:
        """The ``backing`` child of a format with a backing file (qcow2), or None."""
        return self.children.get("backing")

    @property
    def primary_child(self) -> BlockNode | None:
        """The child blkdebug flush events go to (QEMU's ``bs->file``)."""
        for child in self.children.values():
            return child
        return None

    def attach_child(self, role: str, child: BlockNode) -> None:
        """Make ``child`` this node's ``role`` child (replacing any)."""
        old = self.children.get(role)
        if old is not None:
            old.parents.remove(self)
        self.children[role] = child
        child.parents.append(self)

    def detach_children(self) -> list[BlockNode]:
        """Drop every child edge; :return: the former children."""
        former = list(self.children.values())
        for child in former:
            child.parents.remove(self)
        self.children.clear()
        return former

    @property
    def in_use(self) -> bool:
        """Referenced by a parent node, a holder or a BlockBackend
        (blockdev-del refuses; a parent going away keeps it)."""
        return bool(self.parents) or self.refs > 0 or self.backend is not None

    def hold(self) -> None:
        """Take a reference (e.g. a job's source) that keeps blockdev-del away."""
        self.refs += 1

    def release(self) -> None:
        """Drop a reference taken with :meth:`hold`."""
        self.refs -= 1

    def add_blocker(self, reason: str) -> None:
        """Block operations with ``reason`` (e.g. "block device is in use by
        block job: backup")."""
        self.blockers.append(reason)

    def remove_blocker(self, reason: str) -> None:
        """Undo one :meth:`add_blocker` with the same reason."""
        self.blockers.remove(reason)

    def check_not_busy(self) -> None:
        """:raise NodeInUse: ``"Node '%s' is busy: %s"`` (newest blocker)."""
        if self.blockers:
            raise NodeInUse(f"Node '{self.node_name}' is busy: {self.blockers[-1]}")

    def add_before_write_hook(self, hook: BeforeWriteHook) -> HookHandle:
        """Run ``hook`` before every write-type request on this node (in
        registration order).  The hook may read this node (reads take no
        lock) but must not write an overlapping range of it.

        :return: a handle whose ``remove()`` unregisters the hook.
        """
        self._hooks = (*self._hooks, hook)
        return HookHandle(self, hook)

    @property
    def has_hooks(self) -> bool:
        """Some before-write hook is registered (e.g. copy-before-write);
        block-copy's fast path must then not write this node's file directly."""
        wal = self.write_ahead
        return bool(self._hooks) or (wal is not None and wal.active)

    def debug_event(self, event: str) -> None:
        """Raise blkdebug event ``event`` on this node (no-op unless blkdebug)."""
        if self._debug is not None:
            self._debug(event)

    # ------------------------------------------------------------ requests

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.driver.length:
            raise BlockIOError(errno.EIO)

    async def read(self, offset: int, length: int) -> bytes:
        """:return: ``length`` bytes at ``offset``.

        :raise BlockIOError: out of range (EIO) or the I/O failed.
        """
        self._check(offset, length)
        self.bytes_read += length
        return await self.driver.pread(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (an all-zero buffer becomes a zero
        write when ``detect-zeroes`` is on).

        :raise BlockIOError: out of range (EIO), read-only (EPERM), a hook or
            the I/O failed.
        """
        length = len(data)
        self._check_write(offset, length)
        if self.detect_zeroes != "off" and _is_zero(data):
            await self._request(_ZEROES, offset, length, None, self.detect_zeroes == "unmap")
        else:
            await self._request(_WRITE, offset, length, data, False)

    async def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, addressed: bool = False
    ) -> None:
        """Make the range read as zeroes.  Errors as :meth:`write`.

        :param may_unmap: a hole is fine.  A parent (or block-copy) handing
            the request to this node keeps it only if this node has
            ``discard: unmap`` (QEMU's bdrv_co_pwrite_zeroes); a request
            addressed to the node through a BlockBackend (qemu-io,
            ``addressed=True``) keeps it as given (blk_co_pwrite_zeroes), so
            ``write -z -u`` on a raw node over an inline file child leaves a
            hole, as in QEMU 7.2.
        """
        self._check_write(offset, length)
        unmap = may_unmap and (addressed or self.discard_mode == "unmap")
        await self._request(_ZEROES, offset, length, None, unmap)

    async def discard(self, offset: int, length: int) -> None:
        """Discard the range; dropped (nothing happens) unless ``discard`` is
        ``"unmap"``.  Errors as :meth:`write`."""
        self._check_write(offset, length)
        if self.discard_mode != "unmap":
            return
        await self._request(_DISCARD, offset, length, None, True)

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.read_only:
            raise BlockIOError(errno.EPERM)

    async def _request(
        self, kind: int, offset: int, length: int, data: Any, may_unmap: bool
    ) -> None:
        end = offset + length
        lock = self._lock
        held = lock.try_acquire(offset, end) or await lock.acquire(offset, end)
        try:
            for hook in self._hooks:
                await hook(self, offset, length)
            # --- persistent bitmaps: the covering bits durable first ---
            wal = self.write_ahead
            if wal is not None:
                await wal.before_write(offset, length)
            # ---
            debug = self._debug
            try:
                if kind == _WRITE:
                    if debug is not None:
                        debug("pwritev")
                    await self.driver.pwrite(offset, data)
                elif kind == _ZEROES:
                    if debug is not None:
                        debug("pwritev_zero")
                    await self.driver.pwrite_zeroes(offset, length, may_unmap)
                else:
                    await self.driver.pdiscard(offset, length)
            finally:
                if debug is not None and kind != _DISCARD:
                    debug("pwritev_done")
                self.record_write(offset, length, data=kind != _DISCARD)
                if wal is not None:  # persistent bitmaps: fine bits set
                    wal.after_write(offset, length)
        finally:
            lock.release(held)

    def record_write(self, offset: int, length: int, *, data: bool = True) -> None:
        """Account for a write-type request on ``[offset, offset+length)``
        that ended (even in failure): bump the write generation (flush) and
        dirty the bitmaps.  Every path that changes the node's data ends
        here: the request path, and :meth:`write_around` for the nodes below
        a direct file write.  ``data`` (not a discard) counts the bytes as
        written."""
        self.write_gen += 1
        if data:
            self.bytes_written += length
        if self.bitmaps:
            self.bitmaps.mark_dirty(offset, length)

    async def write_around(
        self,
        ranges: Sequence[tuple[int, int]],
        io: Callable[[], Awaitable[None]],
        *,
        below: Sequence[tuple[BlockNode, int]] = (),
    ) -> None:
        """Run a write the caller performs itself around the driver (block-copy's
        fast path writes the image file behind the node directly) with the
        request path's bookkeeping: bounds and read-only checks, the range
        lock over the ranges' span, the before-write hooks for each range,
        ``await io()``, then :meth:`record_write` of each range, here and on
        each ``(node, base)`` of ``below`` at ``base + offset``, even if
        ``io`` failed.  ``io`` may do nothing (a range known to read as
        zeroes already).

        :param ranges: ``(offset, length)`` pairs, ascending, not overlapping.
        :raise BlockIOError: as :meth:`write`, or whatever ``io`` raises.
        """
        if not ranges:
            return
        start = ranges[0][0]
        end = ranges[-1][0] + ranges[-1][1]
        self._check_write(start, end - start)
        lock = self._lock
        held = lock.try_acquire(start, end) or await lock.acquire(start, end)
        try:
            for hook in self._hooks:
                for offset, length in ranges:
                    await hook(self, offset, length)
            # --- persistent bitmaps: the covering bits durable first ---
            wal = self.write_ahead
            started: list[tuple[int, int]] = []
            try:
                if wal is not None:
                    for offset, length in ranges:
                        await wal.before_write(offset, length)
                        started.append((offset, length))
                # ---
                await io()
            finally:
                for offset, length in ranges:
                    self.record_write(offset, length)
                    for node, base in below:
                        node.record_write(base + offset, length)
                if wal is not None:  # persistent bitmaps: fine bits set
                    for offset, length in started:
                        wal.after_write(offset, length)
        finally:
            lock.release(held)

    async def flush(self) -> None:
        """Flush this node and its children (a no-op on read-only nodes).

        Raises ``flush_to_os`` on the primary child, and ``flush_to_disk``
        plus the driver's own flush only if written since the last flush.

        :raise BlockIOError: the first failure.
        """
        if self.read_only:
            return
        gen = self.write_gen
        primary = self.primary_child
        if primary is not None:
            primary.debug_event("flush_to_os")
        if not self.cache_no_flush and self.flushed_gen != gen:
            if primary is not None:
                primary.debug_event("flush_to_disk")
            await self.driver.flush_to_disk()
        first: BlockIOError | None = None
        for child in self.children.values():
            try:
                await child.flush()
            except BlockIOError as exc:
                first = first or exc
        if first is not None:
            raise first
        self.flushed_gen = gen

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """:return: ``(is_data, n)``: the ``n`` bytes (1 <= n <= length,
        clipped to the node end) from ``offset`` are all data or all zero.

        :raise BlockIOError: ``offset`` outside the node (EIO), or injected.
        """
        size = self.driver.length
        if offset < 0 or length <= 0 or offset >= size:
            raise BlockIOError(errno.EIO)
        return await self.driver.block_status(offset, min(length, size - offset))

    async def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """:return: ``(allocated, n)``: the ``n`` bytes (1 <= n <= length,
        clipped to the node end) from ``offset`` are all provided by this
        node's own layer (True) or all by its backing child (False).  A
        filter answers for its filtered child.

        :raise BlockIOError: ``offset`` outside the node (EIO), or injected.
        """
        size = self.driver.length
        if offset < 0 or length <= 0 or offset >= size:
            raise BlockIOError(errno.EIO)
        child = self.filtered_child
        if child is not None:
            return await child.is_allocated(offset, min(length, size - offset))
        return await self.driver.is_allocated(offset, min(length, size - offset))

    def dirty_flag(self) -> bool | None:
        """ImageInfo ``dirty-flag`` as QEMU 7.2 lists it (when its
        bdrv_get_info() works), or None: the driver's answer, or for a
        filter that has none, its filtered child's."""
        flag = self.driver.dirty_flag()
        if flag is None and (child := self.filtered_child) is not None:
            return child.dirty_flag()
        return flag

    # ------------------------------------------------------------ queries

    @property
    def filtered_child(self) -> BlockNode | None:
        """The child a filter (blkdebug, copy-before-write) passes data to."""
        return self.primary_child if self.driver.is_filter else None

    @property
    def filter_or_cow_child(self) -> BlockNode | None:
        """QEMU's bdrv_filter_or_cow_bs(): the filtered child of a filter, else
        the ``backing`` child of a format with a backing file, else None.
        Query output nests this chain as ``backing-image``."""
        child = self.filtered_child
        return child if child is not None else self.backing

    def close(self) -> None:
        """Close the driver (files); the node must be out of the graph."""
        self.driver.close()
