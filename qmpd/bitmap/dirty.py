"""Named dirty bitmaps of a node: flags, successors, checks, merge (spec 5).

A :class:`DirtyBitmap` wraps an :class:`~qmpd.bitmap.hbitmap.HBitmap` with
QEMU's flags.  A :class:`BitmapList` holds the bitmaps of one node, newest
first, and runs the checks of ``block-dirty-bitmap-*`` that do not need the
node graph.  The successor mechanism freezes a bitmap for a backup job::

    bl = BitmapList(size=1 << 26)
    bm = bl.add("b0")               # enabled, 64 KiB granularity
    succ = bm.create_successor()    # bm: busy, disabled; succ: anonymous, enabled
    bl.mark_dirty(0, 4096)          # only succ records it
    bm.reclaim()                    # bm := bm | succ, enabled again, succ gone
    # ... or bm.abdicate(): succ takes the name "b0", bm is dropped

Nothing here knows about QMP arguments; the command layer resolves node
names and calls these methods in the order QEMU checks things.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from qmpd.bitmap.errors import (
    MAX_NAME_BYTES,
    BitmapBusy,
    BitmapError,
    BitmapInconsistent,
    BitmapNotFound,
    BitmapReadonly,
    already_exists,
    bad_granularity,
    empty_name,
    name_too_long,
    persistent_unsupported,
    sizes_differ,
)
from qmpd.bitmap.hbitmap import HBitmap

__all__ = ["DirtyBitmap", "BitmapList", "merge", "DEFAULT_GRANULARITY"]

#: Granularity of block-dirty-bitmap-add without ``granularity`` on raw nodes.
DEFAULT_GRANULARITY = 64 * 1024

#: A value, or a callable asked each time the value is needed.
_Lazy = Callable[[], bool] | bool


class DirtyBitmap:
    """One dirty bitmap with QEMU's flags (spec 5.1).

    :param size: bytes covered (the node length at creation).
    :param granularity: bytes per bit, a power of two.
    :param name: None for anonymous (internal) bitmaps.
    """

    def __init__(
        self,
        size: int,
        granularity: int,
        name: str | None = None,
        *,
        disabled: bool = False,
        persistent: bool = False,
    ) -> None:
        #: Unique per node; None for anonymous bitmaps.
        self.name = name
        #: The bits.
        self.hbitmap = HBitmap(size, granularity)
        #: Not recording writes.
        self.disabled = disabled
        #: Frozen by an operation; set together with :attr:`successor`.
        self.busy = False
        #: Stored in the image (never true on raw nodes).
        self.persistent = persistent
        #: Persistent bitmap of a read-only image (never true on raw nodes).
        self.readonly = False
        #: Persistent bitmap not saved cleanly (never true on raw nodes).
        self.inconsistent = False
        #: The anonymous bitmap recording for this one while it is frozen.
        self.successor: DirtyBitmap | None = None
        self._owner: BitmapList | None = None

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap({self.name!r}, count={self.count}, granularity="
            f"{self.granularity}, disabled={self.disabled}, busy={self.busy})"
        )

    @property
    def size(self) -> int:
        """Bytes covered."""
        return self.hbitmap.size

    @property
    def granularity(self) -> int:
        """Bytes per bit."""
        return self.hbitmap.granularity

    @property
    def count(self) -> int:
        """Dirty bytes: set bits times granularity (BlockDirtyInfo ``count``)."""
        return self.hbitmap.dirty_bytes()

    @property
    def enabled(self) -> bool:
        """Whether writes to the node set bits in this bitmap."""
        return not self.disabled

    @property
    def recording(self) -> bool:
        """Enabled, or frozen with an enabled successor (spec 5.1)."""
        return not self.disabled or (
            self.successor is not None and not self.successor.disabled
        )

    # ---------------------------------------------------------------- checks

    def check(
        self, *, busy: bool = True, readonly: bool = True, inconsistent: bool = True
    ) -> None:
        """Refuse use of this bitmap, in QEMU's order: busy, readonly, inconsistent.

        Each keyword selects whether that condition is checked.

        :raises BitmapBusy: if selected and busy.
        :raises BitmapReadonly: if selected and read-only.
        :raises BitmapInconsistent: if selected and inconsistent.
        """
        label = self.name or ""
        if busy and self.busy:
            raise BitmapBusy(label)
        if readonly and self.readonly:
            raise BitmapReadonly(label)
        if inconsistent and self.inconsistent:
            raise BitmapInconsistent(label)

    # ---------------------------------------------------------- transactions

    def snapshot(self) -> HBitmap:
        """:return: a copy of the bits, for :meth:`restore` on abort."""
        return self.hbitmap.copy()

    def restore(self, snapshot: HBitmap) -> None:
        """Put back bits saved by :meth:`snapshot`."""
        self.hbitmap.restore_from(snapshot)

    def clear(self) -> None:
        """Clear every bit (block-dirty-bitmap-clear's effect)."""
        self.hbitmap.clear()

    # ------------------------------------------------------------ successors

    def create_successor(self) -> DirtyBitmap:
        """Freeze this bitmap and give it an anonymous successor (spec 5.5).

        The successor has the same size and granularity, copies this
        bitmap's enabled state, and joins the node's list (newest first).
        This bitmap becomes busy and disabled.

        :return: the successor.
        :raises BitmapBusy: if this bitmap is busy.
        :raises BitmapError: if it already has a successor.
        """
        if self.busy:
            raise BitmapBusy(self.name or "")
        if self.successor is not None:
            raise BitmapError("Cannot create a successor for a bitmap that already has one")
        succ = DirtyBitmap(self.size, self.granularity, disabled=self.disabled)
        if self._owner is not None:
            self._owner._insert(succ)
        self.successor = succ
        self.disabled = True
        self.busy = True
        return succ

    def abdicate(self) -> DirtyBitmap:
        """Replace this bitmap by its successor (backup success, spec 4.7).

        The successor takes this bitmap's name and persistence and keeps its
        own enabled state (this bitmap's state before it was frozen); this
        bitmap leaves the node's list and must not be used any more.

        :return: the successor, now the named bitmap.
        :raises BitmapError: if there is no successor.
        """
        succ = self.successor
        if succ is None:
            raise BitmapError("Cannot relinquish control if there's no successor present")
        succ.name, self.name = self.name, None
        succ.persistent, self.persistent = self.persistent, False
        self.successor = None
        self.busy = False
        if self._owner is not None:
            self._owner.remove(self)
        return succ

    def reclaim(self) -> DirtyBitmap:
        """Fold the successor back in (backup failure, spec 4.7).

        This bitmap := this | successor; its enabled state := the
        successor's (its own before it was frozen); busy is cleared and the
        successor leaves the node's list.

        :return: this bitmap.
        :raises BitmapError: if there is no successor.
        """
        succ = self.successor
        if succ is None:
            raise BitmapError("Cannot reclaim a successor when none is present")
        self.hbitmap.merge_from(succ.hbitmap)
        self.disabled = succ.disabled
        self.busy = False
        self.successor = None
        if succ._owner is not None:
            succ._owner.remove(succ)
        return self


def merge(target: DirtyBitmap, sources: Iterable[DirtyBitmap]) -> None:
    """``target |= every source``, all or nothing (block-dirty-bitmap-merge).

    Checks in QEMU 7.2's order (as observed): the first source is looked up,
    then the target is checked (busy, readonly, inconsistent), then each
    source as ``sources`` yields it (busy, inconsistent, size): QEMU merges
    the sources one by one straight into the target, checking the target
    with the first.  With no sources the target is checked at the end.  The
    command layer may pass a generator that looks sources up lazily, so a
    lookup failure of the third source is reported after the checks of the
    first two, as in QEMU; anything it raises propagates.  Sources are ORed
    into a scratch bitmap at the target's granularity first, so the target
    is untouched on any error.  The target may be one of the sources; any
    granularities may be mixed; no sources is a no-op.

    :raises BitmapBusy: if the target or a source is busy.
    :raises BitmapReadonly: if the target is read-only.
    :raises BitmapInconsistent: if the target or a source is inconsistent.
    :raises BitmapError: if a source covers a different size.
    """
    scratch: HBitmap | None = None
    for src in sources:
        if scratch is None:
            target.check()
        src.check(readonly=False)
        if src.size != target.size:
            raise sizes_differ(target.size, src.size)
        if scratch is None:
            scratch = HBitmap(target.size, target.granularity)
        scratch.merge_from(src.hbitmap)
    if scratch is None:
        target.check()
    else:
        target.hbitmap.merge_from(scratch)


class BitmapList:
    """The dirty bitmaps of one node, newest first.

    :param size: the node length; new bitmaps cover this many bytes.  The
        block layer may update :attr:`size` if the node is resized.
    :param node_label: the node's device-or-node name for error texts, or a
        callable returning it.
    :param can_store_persistent: whether the node's format can store
        bitmaps (False for raw), or a callable returning it.
    :param default_granularity: used by :meth:`add` without a granularity.
    """

    def __init__(
        self,
        size: int,
        *,
        node_label: str | Callable[[], str] = "",
        can_store_persistent: _Lazy = False,
        default_granularity: int = DEFAULT_GRANULARITY,
    ) -> None:
        #: Node length in bytes, the size of bitmaps created from now on.
        self.size = size
        self.default_granularity = default_granularity
        self._label = node_label
        #: Whether ``persistent: true`` is accepted (a value or a callable);
        #: the block layer sets it where the bitmaps can be stored.
        self.can_store_persistent = can_store_persistent
        #: The format's own refusals of a new persistent bitmap (name,
        #: granularity), run after "already exists"; raises BitmapError.
        self.persistent_check: Callable[[str, int], None] | None = None
        self._bitmaps: list[DirtyBitmap] = []

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(list(self._bitmaps))

    def truncate(self, size: int) -> None:
        """The node now has ``size`` bytes: every bitmap (and successor)
        follows, new areas clean (``block_resize``)."""
        self.size = size
        for bitmap in self._bitmaps:
            bitmap.hbitmap.truncate(size)
            if bitmap.successor is not None:
                bitmap.successor.hbitmap.truncate(size)

    def __len__(self) -> int:
        return len(self._bitmaps)

    def __bool__(self) -> bool:
        return bool(self._bitmaps)

    def __contains__(self, bitmap: object) -> bool:
        return any(bitmap is bm for bm in self._bitmaps)

    def _insert(self, bitmap: DirtyBitmap) -> None:
        bitmap._owner = self
        self._bitmaps.insert(0, bitmap)

    # -------------------------------------------------------------- creation

    def add(
        self,
        name: str,
        granularity: int | None = None,
        *,
        disabled: bool = False,
        persistent: bool = False,
    ) -> DirtyBitmap:
        """Create a named bitmap: block-dirty-bitmap-add after the node lookup.

        Checks, in QEMU's order: empty name (the command layer must test it
        before looking the node up, as QEMU does; repeated here), granularity,
        persistence, name taken, name too long.

        :param granularity: None for :attr:`default_granularity`.
        :return: the new, empty bitmap (enabled unless ``disabled``).
        :raises BitmapError: with QEMU's text for the first failed check.
        """
        if not name:
            raise empty_name()
        if granularity is None:
            granularity = self.default_granularity
        elif granularity < 512 or granularity & (granularity - 1):
            raise bad_granularity()
        if persistent:
            can_p = self.can_store_persistent
            can = can_p() if callable(can_p) else can_p
            if not can:
                label = self._label() if callable(self._label) else self._label
                raise persistent_unsupported(label)
        if self.find(name) is not None:
            raise already_exists(name)
        if persistent and self.persistent_check is not None:
            self.persistent_check(name, granularity)
        if len(name.encode()) > MAX_NAME_BYTES:
            raise name_too_long(name)
        bitmap = DirtyBitmap(
            self.size, granularity, name, disabled=disabled, persistent=persistent
        )
        self._insert(bitmap)
        return bitmap

    def create_anonymous(
        self, granularity: int, *, disabled: bool = False, size: int | None = None
    ) -> DirtyBitmap:
        """Create an internal bitmap (no name, no checks), e.g. a copy bitmap.

        :param size: bytes covered; defaults to :attr:`size`.
        """
        bitmap = DirtyBitmap(
            self.size if size is None else size, granularity, disabled=disabled
        )
        self._insert(bitmap)
        return bitmap

    def remove(self, bitmap: DirtyBitmap) -> None:
        """Drop ``bitmap`` from the node (no QMP checks; see :meth:`check_can_remove`).

        :raises ValueError: if it is not on this node.
        :raises RuntimeError: if it is busy (a programming error).
        """
        if bitmap.busy:
            raise RuntimeError(f"removing busy bitmap {bitmap!r}")
        for i, bm in enumerate(self._bitmaps):
            if bm is bitmap:
                del self._bitmaps[i]
                bitmap._owner = None
                return
        raise ValueError(f"{bitmap!r} is not on this node")

    # ---------------------------------------------------------------- lookup

    def find(self, name: str) -> DirtyBitmap | None:
        """:return: the bitmap called ``name``, or None."""
        for bm in self._bitmaps:
            if bm.name == name:
                return bm
        return None

    def lookup(self, name: str) -> DirtyBitmap:
        """:return: the bitmap called ``name``.

        :raises BitmapNotFound: ``"Dirty bitmap '%s' not found"``.
        """
        bm = self.find(name)
        if bm is None:
            raise BitmapNotFound(name)
        return bm

    # ------------------------------------------------------------- the write path

    def mark_dirty(self, offset: int, length: int) -> None:
        """Set ``[offset, offset+length)`` in every enabled bitmap (spec 5.2).

        The range is clipped to each bitmap's size, so a request past the end
        of a bitmap created before the node grew cannot fail the write.
        """
        for bm in self._bitmaps:
            if bm.disabled:
                continue
            hb = bm.hbitmap
            if offset + length <= hb.size:
                hb.set(offset, length)
            elif offset < hb.size:
                hb.set(offset, hb.size - offset)

    # -------------------------------------------------- per-command checks

    @staticmethod
    def check_can_remove(bitmap: DirtyBitmap) -> None:
        """block-dirty-bitmap-remove: busy, then readonly.

        :raises BitmapBusy: if busy.
        :raises BitmapReadonly: if read-only.
        """
        bitmap.check(inconsistent=False)

    @staticmethod
    def check_can_clear(bitmap: DirtyBitmap) -> None:
        """block-dirty-bitmap-clear: busy, readonly, inconsistent.

        :raises BitmapBusy: if busy.
        :raises BitmapReadonly: if read-only.
        :raises BitmapInconsistent: if inconsistent.
        """
        bitmap.check()

    @staticmethod
    def check_can_enable(bitmap: DirtyBitmap) -> None:
        """block-dirty-bitmap-enable: busy, then inconsistent.

        :raises BitmapBusy: if busy.
        :raises BitmapInconsistent: if inconsistent.
        """
        bitmap.check(readonly=False)

    #: block-dirty-bitmap-disable checks exactly what enable checks.
    check_can_disable = check_can_enable
