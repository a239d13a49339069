"""Driver ``qcow2``: open an image over its ``file`` child (and its backing
chain) and forward requests to :class:`~.image.Qcow2Image`.

The opener checks the header and tables in QEMU 7.2's order and words
(``qcow2_do_open``) and writes nothing before every check has passed, so a
refused open never modifies the file.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from qmpd.bitmap.errors import BitmapError
from qmpd.block.drivers.base import (
    BaseDriver, BlockDriver, ClusterMap, DriverSpec, FormatDetails, OpenContext,
)
from qmpd.block.drivers.qcow2.alloc import RefcountState
from qmpd.block.drivers.qcow2.bitmaps_ext import BitmapError as Qcow2BitmapError
from qmpd.block.drivers.qcow2.bitmaps_ext import DirEntry, can_store_new
from qmpd.block.drivers.qcow2.bitmaps_io import MemBitmap
from qmpd.block.drivers.qcow2.storedbitmaps import open_bitmaps, store_bitmaps
from qmpd.block.drivers.qcow2.dirty import RepairError, mark_clean, mark_dirty, needs_allocation, repair
from qmpd.block.drivers.qcow2.header import (
    AUTOCLEAR_MASK, EXT_DATA_FILE, INCOMPAT_DATA_FILE, MAGIC, Header, HeaderError, parse_header,
)
from qmpd.block.drivers.qcow2.image import Buffer, ChainWrite, ChainWriter, CorruptImage, Qcow2Image
from qmpd.block.drivers.qcow2.refcount import RefcountBlock
from qmpd.block.drivers.qcow2.repair import SnapshotTableError, snapshot_l1_tables
from qmpd.block.drivers.qcow2.tables import Geometry, unpack_table
from qmpd.block.errors import BlockIOError, NodeOpenError
from qmpd.block.io import ImageFile

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["Qcow2Driver", "SPEC", "open_qcow2", "DEFAULT_L2_CACHE_MAX"]

log = logging.getLogger(__name__)

#: QEMU 7.2's warning for a bitmaps extension whose autoclear bit is clear
#: (qcow2_read_extensions), v3 and v2 wording, and the line it prints after.
BITMAPS_IGNORED_V3 = ("a program lacking bitmap support modified this file, so all bitmaps "
                      "are now considered inconsistent")
BITMAPS_IGNORED_V2 = ("This qcow2 v2 image contains bitmaps, but they may have been modified "
                      "by a program without persistent bitmap support; so now they must all "
                      "be considered inconsistent")
BITMAPS_IGNORED_HINT = ("Some clusters may be leaked, run 'qemu-img check -r' on the image "
                        "file to fix.")

#: QEMU's DEFAULT_L2_CACHE_MAX_SIZE (Linux): the L2 cache covers the whole
#: disk up to this many bytes of tables.
DEFAULT_L2_CACHE_MAX = 32 << 20
#: QCOW_MAX_L1_SIZE and QCOW_MAX_REFTABLE_SIZE (bytes).
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
INT64_MAX = (1 << 63) - 1

#: Options of BlockdevOptionsQcow2 the driver accepts (checked by the schema).
CACHE_OPTIONS = ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                 "cache-clean-interval")


class Qcow2Driver(BaseDriver):
    """A qcow2 image: ``file`` child, optional ``backing`` child."""

    name = "qcow2"
    is_format = True

    def __init__(self, file: BlockNode, image: Qcow2Image, backing: BlockNode | None,
                 options: Mapping[str, Any]) -> None:
        self.file = file
        self.image = image
        self.backing = backing
        self._options = dict(options)
        #: Set by the graph's event hook: ``emit(name, data)``.
        self.emit: Callable[[str, dict[str, Any]], None] | None = None
        self._node_name = ""
        self._node: BlockNode | None = None
        #: Bitmaps read at open, turned into the node's bitmaps by node_opened.
        self.loaded: list[tuple[DirEntry, bytes | None]] = []
        #: The bitmap directory as on disk now.
        self.on_disk: list[DirEntry] = []
        image.on_corrupt = self._corrupted
        #: Lazy refcounts (the option, else the image's bit): allocating
        #: writes set the dirty bit, as QEMU's.
        self.lazy_refcounts = bool(options.get("lazy-refcounts", image.header.lazy_refcounts))
        #: QEMU's corruption message for an unaligned refcount block: raised
        #: at the first request that needs refcounts.
        self.bad_refblock: str | None = None

    @property
    def length(self) -> int:
        return self.image.size

    @property
    def filename(self) -> str:
        return self.file.driver.filename

    def full_options(self) -> dict[str, Any]:
        return {"driver": "qcow2", "file": self.file.driver.full_options()}

    @property
    def header(self) -> Header:
        return self.image.header

    def node_opened(self, node: BlockNode) -> None:
        self._node_name = node.node_name
        self._node = node
        node.bitmaps.can_store_persistent = True
        for entry, bits in self.loaded:
            bm = node.bitmaps.add(entry.name, entry.granularity,
                                  disabled=not entry.auto or bits is None, persistent=True)
            if bits is None:
                bm.inconsistent = True
            else:
                bm.hbitmap.merge_bytes_le(bits)
            bm.readonly = self.image.read_only
        self.loaded = []
        node.bitmaps.persistent_check = self._can_store_new

    def _can_store_new(self, name: str, granularity: int) -> None:
        """QEMU's qcow2 refusals of ``block-dirty-bitmap-add persistent=true``."""
        node = self._node
        assert node is not None
        names = [bm.name for bm in node.bitmaps if bm.persistent and bm.name is not None]
        try:
            can_store_new(name, granularity, node=self._node_name,
                          version=self.image.header.version, disk_size=self.image.size,
                          cluster_size=self.image.g.cluster_size, persistent_names=names)
        except Qcow2BitmapError as exc:
            raise BitmapError(exc.text) from None

    async def before_close(self) -> None:
        """Store the node's persistent bitmaps into the image (blockdev-del,
        quit, SIGTERM), clearing their ``in_use`` flags."""
        node = self._node
        if self.image.read_only or self.image.dead:
            return
        if node is not None:
            await self._store_bitmaps(node)
            await self.image.trim()
        await mark_clean(self.image)

    async def _store_bitmaps(self, node: BlockNode) -> None:
        mine = [bm for bm in node.bitmaps if bm.persistent and bm.name is not None]
        keep = {bm.name for bm in mine if bm.inconsistent and bm.name is not None}
        store = [MemBitmap(bm.name, bm.granularity, not bm.disabled, bm.hbitmap.to_bytes_le())
                 for bm in mine if not bm.inconsistent and bm.name is not None]
        if not store and not self.on_disk:
            return
        try:
            self.on_disk = await store_bitmaps(self.image, self.on_disk, keep, store)
        except Qcow2BitmapError as exc:
            raise BlockIOError(errno.EINVAL, exc.text) from exc

    def _corrupted(self, exc: CorruptImage) -> None:
        data: dict[str, Any] = {"device": "", "node-name": self._node_name, "msg": exc.msg}
        if exc.offset >= 0:
            data["offset"] = exc.offset
        if exc.size >= 0:
            data["size"] = exc.size
        data["fatal"] = True
        if self.emit is not None:
            self.emit("BLOCK_IMAGE_CORRUPTED", data)

    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(await self.image.read(offset, length))

    async def _refcount_access(self) -> None:
        """An unaligned refcount block is corruption once refcounts are needed."""
        if self.bad_refblock is not None and not self.image.dead:
            await self.image.signal_corruption(CorruptImage(self.bad_refblock))
        if self.image.dead:
            raise BlockIOError(errno.EIO)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mark = self.lazy_refcounts and not self.image.header.dirty
        if (mark or self.bad_refblock is not None) \
                and await needs_allocation(self.image, offset, len(data)):
            if self.bad_refblock is not None:
                await self._refcount_access()
            if mark:
                await mark_dirty(self.image)
        await self.image.write(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if self.bad_refblock is not None:
            await self._refcount_access()
        await self.image.write_zeroes(offset, length, may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        if self.bad_refblock is not None and not self.image.dead:
            # QEMU's discard reports success; the image is marked corrupt
            # when it drops the references, and later requests fail.
            await self.image.signal_corruption(CorruptImage(self.bad_refblock))
            return
        await self.image.discard(offset, length)

    async def pwrite_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole clusters compressed (``compress: true`` backups)."""
        if self.bad_refblock is not None:
            await self._refcount_access()
        cs = self.image.g.cluster_size
        view = memoryview(data)
        for at in range(0, len(view), cs):
            await self.image.write_compressed(offset + at, view[at:at + cs])

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        return await self.image.block_status(offset, length)

    async def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """Allocated in this layer (not falling through to ``backing``)."""
        return await self.image.is_allocated(offset, length)

    def dirty_flag(self) -> bool | None:
        return self.image.header.dirty

    def format_details(self) -> FormatDetails | None:
        h = self.image.header
        return FormatDetails(
            format="qcow2", cluster_size=h.cluster_size,
            compat="0.10" if h.version == 2 else "1.1", lazy_refcounts=h.lazy_refcounts,
            refcount_bits=h.refcount_bits, corrupt=self.image.corrupt, extended_l2=False,
            compression_type="zstd" if h.compression_type == 1 else "zlib",
            backing_filename=h.backing_file, backing_format=h.backing_format)

    def actual_size(self) -> int | None:
        return self.file.driver.actual_size()

    def cluster_map(self) -> ClusterMap:
        """Data clusters in the ``file`` child: block-copy copies them file
        to file (:meth:`Qcow2Image.map_data`, :meth:`Qcow2Image.write_mapped`)."""
        image = self.image
        return ClusterMap(self.file, image.g.cluster_size, image.map_data, image.write_mapped)

    def close(self) -> None:
        """Nothing to release: metadata is written through and the file
        belongs to the ``file`` child."""


def _backing_path(image_path: str, backing: str) -> str:
    """QEMU's bdrv_get_full_backing_filename: relative to the image's directory."""
    if os.path.isabs(backing) or ":" in backing.split("/", 1)[0]:
        return backing
    return os.path.join(os.path.dirname(image_path), backing)


def _validate_table(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    if entries > INT64_MAX // entry_len:
        return False
    if INT64_MAX - entries * entry_len < offset:
        return False
    return offset % cluster_size == 0


async def _read_header(file: BlockNode) -> tuple[Header, int]:
    flen = file.length
    head = await file.read(0, min(flen, 4096)) if flen else b""
    if len(head) < 4 or head[:4] != MAGIC:
        raise NodeOpenError("Image is not in qcow2 format")
    h = parse_header(bytes(head) + bytes(max(0, 4096 - len(head))))
    cs = h.cluster_size
    if cs > 4096:
        first = await file.read(0, min(flen, cs))
        h = parse_header(bytes(first) + bytes(cs - len(first)))
    else:
        h = parse_header(bytes(head[:cs]) + bytes(max(0, cs - len(head))))
    return h, flen


async def _load(file: BlockNode, offset: int, length: int) -> bytes:
    """Read metadata; what lies past the end of the file reads as zeroes."""
    flen = file.length
    if offset >= flen or length == 0:
        return bytes(length)
    n = min(length, flen - offset)
    data = await file.read(offset, n)
    return bytes(data) + bytes(length - n)


async def open_qcow2(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Open the ``file`` child, check and load the metadata, open ``backing``.

    :raise NodeOpenError: QEMU's texts (header, table and feature checks).
    """
    file = await ctx.open_child(options["file"], "file")
    try:
        h, flen = await _read_header(file)
    except HeaderError as exc:
        raise NodeOpenError(exc.text) from exc
    except BlockIOError as exc:
        raise NodeOpenError(f"Could not read qcow2 header: {exc.strerror}") from exc
    cs = h.cluster_size
    if h.corrupt and not ctx.read_only:
        raise NodeOpenError("qcow2: Image is corrupt; cannot be opened read/write")
    if options.get("lazy-refcounts") and h.version < 3:
        raise NodeOpenError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                            "compatibility level")
    rt_entries = h.refcount_table_clusters * cs // 8
    if h.refcount_table_clusters == 0:
        raise NodeOpenError("Image does not contain a reference count table")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise NodeOpenError("Reference count table too large")
    if not _validate_table(h.refcount_table_offset, rt_entries, 8, cs):
        raise NodeOpenError("Reference count table offset invalid")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise NodeOpenError("Too many snapshots")
    if not _validate_table(h.snapshots_offset, h.nb_snapshots, 40, cs):
        raise NodeOpenError("Snapshot table offset invalid")
    if h.l1_size > MAX_L1_BYTES // 8:
        raise NodeOpenError("Active L1 table too large")
    g = Geometry(h.cluster_bits)
    if g.l1_entries_for(h.size) > (1 << 31) - 1:
        raise NodeOpenError("Image is too big")
    if h.l1_size < g.l1_entries_for(h.size):
        raise NodeOpenError("L1 table is too small")
    if not _validate_table(h.l1_table_offset, h.l1_size, 8, cs):
        raise NodeOpenError("Active L1 table offset invalid")
    try:
        l1 = unpack_table(await _load(file, h.l1_table_offset, h.l1_size * 8))
        # Reserved bits (0-8) of the entries are ignored, as QEMU does; the
        # allocator writes blocks at the masked offsets.
        table = [e & ~511 for e in
                 unpack_table(await _load(file, h.refcount_table_offset, rt_entries * 8))]
        blocks: dict[int, RefcountBlock] = {}
        bad_refblock: str | None = None
        for bi, entry in enumerate(table):
            off = entry & ~511
            if off:
                if off % cs:
                    # QEMU opens it and marks the image corrupt at the first
                    # refcount access.
                    index = f"{bi:#x}" if bi else "0"     # C's %#x
                    bad_refblock = bad_refblock or (
                        f"Refblock offset {off:#x} unaligned (reftable index: {index})")
                    continue
                blocks[bi] = RefcountBlock(bytearray(await _load(file, off, cs)), h.refcount_bits)
    except BlockIOError as exc:
        raise NodeOpenError(f"Could not read L1 table: {exc.strerror}") from exc
    if h.nb_snapshots:
        try:
            await snapshot_l1_tables(lambda off, n: _load(file, off, n), h)
        except SnapshotTableError as exc:
            raise NodeOpenError(str(exc)) from exc
        except BlockIOError as exc:
            raise NodeOpenError(f"Could not read snapshots: {exc.strerror}") from exc
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        if not any(t == EXT_DATA_FILE for t, _ in h.unknown_extensions):
            raise NodeOpenError("'data-file' is required for this image")
        raise NodeOpenError("Unsupported qcow2 feature(s): external data file")
    refs = RefcountState(h.cluster_bits, h.refcount_bits, table=table, blocks=blocks,
                         table_offset=h.refcount_table_offset,
                         table_clusters=h.refcount_table_clusters)
    children: dict[str, BlockNode] = {"file": file}
    backing = await _open_backing(options, ctx, h, file)
    if backing is not None:
        children["backing"] = backing
    cache = _l2_cache_bytes(options, h, g)
    image = Qcow2Image(
        file, h, [e for e in l1], refs, backing=backing, read_only=ctx.read_only,
        l2_cache_bytes=cache, grow=_grower(file), file_length=flen, shrink=_shrinker(file),
        pass_discard=bool(options.get("pass-discard-request", options.get("discard") in ("unmap", "on"))),
    )
    # Closing trims the file after the last referenced cluster; an L1 or
    # refcount table the header places past the end of the file (which QEMU
    # writes there) must survive that, referenced or not.
    meta_end = max(h.l1_table_offset + h.l1_size * 8,
                   h.refcount_table_offset + h.refcount_table_clusters * cs)
    image.opened_length = max(flen, -(-meta_end // cs) * cs)
    image.chain_writer = _chain_writer(file)
    drv = Qcow2Driver(file, image, backing, options)
    drv.emit = ctx.emit_event
    drv.bad_refblock = bad_refblock
    try:
        drv.on_disk, bits = await open_bitmaps(image, not ctx.read_only)
        drv.loaded = list(zip(drv.on_disk, bits))
    except Qcow2BitmapError as exc:
        raise NodeOpenError(exc.text) from exc
    except BlockIOError as exc:
        raise NodeOpenError(f"Could not read bitmaps: {exc}") from exc
    await _after_load(file, image, ctx.read_only, unaligned_refblock=bad_refblock is not None)
    return drv, children


async def _after_load(file: BlockNode, image: Qcow2Image, read_only: bool, *,
                      unaligned_refblock: bool) -> None:
    """The end of QEMU's qcow2_do_open: the ignored-bitmaps warning, the
    header update that drops unknown autoclear bits and an ignored bitmaps
    extension, then the repair of a dirty image (read-write opens only)."""
    h = image.header
    if h.bitmaps_ignored:
        log.warning("%s: %s\n%s", file.driver.filename,
                    BITMAPS_IGNORED_V2 if h.version < 3 else BITMAPS_IGNORED_V3,
                    BITMAPS_IGNORED_HINT)
    if read_only:
        return
    try:
        if h.bitmaps_ignored or h.autoclear_features & ~AUTOCLEAR_MASK:
            h.autoclear_features &= AUTOCLEAR_MASK
            h.bitmaps_ignored = False
            await image.rewrite_header()
            await file.flush()
        if h.dirty:
            image.refs, _res = await repair(file, h, image.l1, image.refs, _grower(file),
                                            unaligned_refblock=unaligned_refblock)
            image.cache.clear()
            image.file_length = max(image.file_length, file.length)
    except RepairError as exc:
        raise NodeOpenError(f"Could not repair dirty image: {exc}") from exc
    except BlockIOError as exc:
        raise NodeOpenError(f"Could not repair dirty image: {exc.strerror}") from exc


def _l2_cache_bytes(options: Mapping[str, Any], h: Header, g: Geometry) -> int:
    if "l2-cache-size" in options:
        return int(options["l2-cache-size"])
    if "cache-size" in options:
        return int(options["cache-size"])
    whole = g.l1_entries_for(h.size) * g.cluster_size
    return max(2 * g.cluster_size, min(DEFAULT_L2_CACHE_MAX, whole))


def _grower(file: BlockNode) -> Callable[[int], Any]:
    async def grow(size: int) -> None:
        truncate = getattr(file.driver, "truncate", None)
        if truncate is None:
            raise BlockIOError(28)
        if size > file.length:
            await truncate(size)
    return grow


def _chain_writer(file: BlockNode) -> ChainWriter:
    """:return: what :attr:`Qcow2Image.chain_writer` calls: the ``file``
    node as a plain window of an image file (no hooks, blkdebug events,
    detect-zeroes), then ``await write(writes)`` pwrites them in order in
    one worker call, with the file node's range lock and bookkeeping
    (:func:`~qmpd.block.fastcopy.write_direct`); else None."""
    def writer() -> ChainWrite | None:
        from qmpd.block.fastcopy import file_view, write_direct  # import cycle at load time

        view = file_view(file, for_write=True)
        if view is None:
            return None

        async def write(writes: list[tuple[int, Buffer]]) -> None:
            base = view.base
            ranges = sorted((off, len(b)) for off, b in writes)
            await write_direct(view, ranges,
                               lambda: view.image.write_seq([(base + off, b) for off, b in writes]))
        return write
    return writer


def _shrinker(file: BlockNode) -> Callable[[int], Any] | None:
    truncate = getattr(file.driver, "truncate", None)
    if truncate is None:
        return None

    async def shrink(size: int) -> None:
        await truncate(size)
    return shrink


async def _open_backing(options: Mapping[str, Any], ctx: OpenContext, h: Header,
                        file: BlockNode) -> BlockNode | None:
    if "backing" in options:
        ref = options["backing"]
        if ref is None:
            return None
        return await ctx.open_child(ref, "backing")
    if h.backing_file is None:
        return None
    path = _backing_path(file.driver.filename, h.backing_file)
    fmt = h.backing_format or await _probe(path)
    ref = {"driver": fmt, "read-only": True,
           "file": {"driver": "file", "filename": path, "read-only": True}}
    try:
        return await ctx.open_child(ref, "backing")
    except NodeOpenError as exc:
        raise NodeOpenError(f"Could not open backing file: {exc.desc}") from exc


async def _probe(path: str) -> str:
    try:
        img = await ImageFile.open(path, read_only=True)
    except BlockIOError:
        return "raw"
    try:
        magic = await img.read(0, 4)
    finally:
        img.close()
    return "qcow2" if magic == MAGIC else "raw"



SPEC = DriverSpec(open_qcow2, is_format=Qcow2Driver.is_format)
