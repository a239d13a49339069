"""The qcow2 dirty bit: repaired at a read-write open, set by lazy-refcount
writers, cleared at a clean close (QEMU 7.2's qcow2_do_open,
qcow2_mark_dirty, qcow2_mark_clean).

- :func:`repair` runs :mod:`.repair`'s check and writes its fixes, in
  crash-safe order (refcounts, then the header's refcount table pointer
  after a rebuild, then COPIED flags, then the dirty bit);
- :func:`mark_dirty` sets the bit before the first allocating write of an
  image with lazy refcounts (QEMU sets it in qcow2_alloc_cluster_link_l2);
  qmpd still writes its refcounts eagerly, so the bit only says what QEMU's
  says;
- :func:`mark_clean` clears it when the image is closed.

Read-only opens never repair (QEMU does not either): the image reads as it
is and ``dirty-flag`` stays true.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from qmpd.block.drivers.qcow2.alloc import RefcountState
from qmpd.block.drivers.qcow2.header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, Header
from qmpd.block.drivers.qcow2.image import Qcow2Image
from qmpd.block.drivers.qcow2.repair import (
    CheckResult, copied_fixes, count_references, plan_in_place, plan_rebuild,
)
from qmpd.block.drivers.qcow2.tables import Geometry, Kind

__all__ = ["repair", "mark_dirty", "mark_clean", "needs_allocation", "RepairError"]

log = logging.getLogger(__name__)

#: Byte offset of ``incompatible_features`` in the header.
INCOMPAT_OFFSET = 72


class RepairError(Exception):
    """The check could not complete (QEMU: "Could not repair dirty image")."""


class FileIO(Protocol):
    """What the repair needs from the ``file`` child."""

    @property
    def length(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    async def flush(self) -> None: ...


async def repair(file: FileIO, h: Header, l1: list[int], refs: RefcountState,
                 grow: Callable[[int], Awaitable[Any]], *, unaligned_refblock: bool = False,
                 ) -> tuple[RefcountState, CheckResult]:
    """Check and fix a dirty image (fix-errors and fix-leaks).

    ``await grow(n)`` makes the file at least ``n`` bytes long (a rebuilt
    structure goes past its end).  Changes ``l1`` (COPIED flags) and ``h`` (refcount table after a
    rebuild, the dirty bit) in place.

    :return: the refcount state afterwards and what was found.
    :raise RepairError: internal check errors (unreadable bitmap metadata),
        or an unaligned refcount block: QEMU 7.2 marks the image corrupt
        while rebuilding and fails the open, and so does this.
    """
    if unaligned_refblock:
        h.incompatible_features |= INCOMPAT_CORRUPT
        await file.write(INCOMPAT_OFFSET, h.incompatible_features.to_bytes(8, "big"))
        await file.flush()
        raise RepairError("Input/output error")
    flen = file.length

    async def read(offset: int, length: int) -> bytes:
        if offset >= flen or length <= 0:
            return bytes(max(0, length))
        n = min(length, flen - offset)
        return bytes(await file.read(offset, n)) + bytes(length - n)

    counts, res = await count_references(read, h, flen)
    if res.check_errors:
        raise RepairError("Input/output error")
    plan = plan_in_place(counts, refs, res) or plan_rebuild(counts, refs, res)
    if plan.writes:
        await grow(max(off + len(data) for off, data in plan.writes))
    for off, data in plan.writes:
        await file.write(off, data)
    if plan.new_table is not None:
        await file.flush()
        toff, tclusters = plan.new_table
        await file.write(48, toff.to_bytes(8, "big") + tclusters.to_bytes(4, "big"))
        h.refcount_table_offset, h.refcount_table_clusters = toff, tclusters
    assert plan.final is not None
    g = Geometry(h.cluster_bits)
    old_l1 = list(l1)
    l2_writes = await copied_fixes(read, g, l1, plan.final, res)
    if l2_writes or plan.writes:
        await file.flush()
    for off, data in l2_writes:
        await file.write(off, data)
    if l1 != old_l1:
        await file.write(h.l1_table_offset, b"".join(e.to_bytes(8, "big") for e in l1))
    if res.corruptions == 0:
        await file.flush()
        h.incompatible_features &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        await file.write(INCOMPAT_OFFSET, h.incompatible_features.to_bytes(8, "big"))
        await file.flush()
    for m in res.messages:
        log.debug("qcow2 repair: %s", m)
    log.info("qcow2: repaired dirty image: %d corruptions and %d leaks fixed%s%s",
             res.corruptions_fixed, res.leaks_fixed,
             ", refcount structure rebuilt" if res.rebuilt else "",
             f", {res.corruptions} errors left (dirty bit kept)" if res.corruptions else "")
    return plan.refs, res


async def mark_dirty(image: Qcow2Image) -> None:
    """Set the dirty bit (flushed) before an allocating write with lazy refcounts."""
    if image.header.dirty or image.read_only or image.header.version < 3:
        return
    bits = image.header.incompatible_features | INCOMPAT_DIRTY
    await image.file.write(INCOMPAT_OFFSET, bits.to_bytes(8, "big"))
    await image.file.flush()
    image.header.incompatible_features |= INCOMPAT_DIRTY


async def mark_clean(image: Qcow2Image) -> None:
    """Clear the dirty bit after everything else is on disk (close)."""
    if not image.header.dirty or image.read_only or image.dead:
        return
    await image.file.flush()
    image.header.incompatible_features &= ~INCOMPAT_DIRTY
    await image.file.write(INCOMPAT_OFFSET,
                           image.header.incompatible_features.to_bytes(8, "big"))
    await image.file.flush()


async def needs_allocation(image: Qcow2Image, offset: int, length: int) -> bool:
    """:return: whether a write of ``[offset, offset+length)`` allocates (any
    cluster that is not a normal cluster with ``COPIED`` set)."""
    pos, end = offset, offset + length
    while pos < end:
        m, n = await image.mapping(pos, end - pos)
        if not (m.kind == Kind.NORMAL and m.copied):
            return True
        pos += n
    return False
