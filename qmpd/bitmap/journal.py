"""Crash-consistent persistent bitmaps: the on-disk format and its rules (pure).

qmpd keeps the persistent bitmaps of an image that has no place of its own
for them (a raw file) in a *state directory*, as two files per image::

    <name>-<key>.qbm   the snapshot: every persistent bitmap, replaced atomically
    <name>-<key>.qwi   the write-intent layer: coarse bits, updated in place

``<key>`` is the first 20 hex digits of the SHA-256 of the image's real
path; the snapshot also records the image's device and inode, so an image
replaced under the same path is recognised.  This module encodes, decodes
and checks both files, and holds the bookkeeping of the write-intent layer;
the block layer (``qmpd.block.persist``) does the I/O.

Snapshot, format version 1 (little-endian throughout)::

    0   8  magic  b"QMPDBMAP"
    8   2  version (1)
    10  2  flags: bit 0 CLEAN (written at a clean close)
    12  4  number of bitmap records
    16  8  image size in bytes
    24  8  image st_mtime_ns   } content-independent identity of the image,
    32  8  image st_ctime_ns   } compared at open only after a clean close;
    40  8  image st_dev        } dev and ino are always compared
    48  8  image st_ino        }
    56  8  sequence number (+1 per store)
    64  4  coarse shift (log2 of the bytes per write-intent bit)
    68  4  length of the image path
    72  .. image path (UTF-8), then the records, then
    -4  4  CRC-32 of everything before it

    record:
    0   2  name length         8   8  bytes covered (the node length)
    2   1  flags: bit 0 RECORDING (enabled, or frozen with an enabled
           successor), bit 1 INCONSISTENT, bit 2 TRANSIENT (added with
           ``persistent: false``, kept by ``--state-keep-transient-bitmaps``)
    3   1  reserved (0)        16  4  length of the bits in bytes
    4   4  granularity         20  4  CRC-32 of the bits
    24  .. name (UTF-8), then the bits (``HBitmap.to_bytes_le`` layout)

A snapshot is never modified: a new one is written to ``.tmp``, synced,
renamed over the old one and the directory synced, so a reader sees the
old or the new one whole.  A frozen bitmap (a backup is running) is stored
as its bits ORed with its successor's: what a failed backup would give back.

Write-intent layer, version 1::

    0   8  magic  b"QMPDWINT"
    8   2  version (1)     10  2  reserved
    12  4  coarse shift    16  8  image size   24  4  number of bits
    28  4  CRC-32 of bytes 0..28
    64  .. the write lease (below), in the header's padding
    512 .. the bits (bit i covers [i << shift, (i+1) << shift))

    write lease (optional: a file without it is judged by the snapshot):
    64  8  magic  b"QMPDLEAS"
    72  1  state: 1 HELD, 2 RELEASED      73  7  reserved (0)
    80  8  HELD: qmpd may write the image until this CLOCK_REALTIME time (ns);
           RELEASED: when it stopped writing
    88  40 RELEASED: the image's size, mtime, ctime, dev, ino then
    128 4  CRC-32 of bytes 64..128

Rule (write-ahead dirtying): before a write to ``[off, off+len)`` reaches the
image, the coarse bits covering it are set on disk (``fdatasync``); writes
that arrive while a sync runs share the next one (group commit).  A
sequential stream also sets as many bits ahead of it as it has covered so
far (like readahead), so N MiB written in order cost about log2(N) syncs.  After the
write, the fine bits are set in memory and reach the snapshot lazily.  A
coarse bit is cleared again only by a *reset* after a snapshot: it keeps every
bit touched by a write that was running when the snapshot was captured or
began after it (:meth:`WriteIntent.capture`, :meth:`WriteIntent.reset_mask`).

The bits carry no checksum on purpose: between resets they are only ever
set, and a reset only clears bits the durable snapshot covers, so any mix of
old and new sectors after a torn write is a safe state.

Writes behind qmpd's back (:class:`WriteLease`, :func:`judge_lease`): the
bits only know qmpd's writes, so after a crash recovery must also know
that nobody else wrote the image before qmpd opened it again.  The kernel
stamps every write into the image's mtime and ctime (ctime cannot be set
back by anyone), so qmpd keeps a *write lease* in the write-intent file:

* before a write reaches the image qmpd holds a lease: HELD until ``t``,
  with ``t`` at least ``now + length``, renewed (one ``pwrite``, no sync)
  when less than three quarters of it is left: qmpd's own writes then
  stamp the image with times before ``t``;
* when a lazy store finds no write in flight it RELEASES the lease,
  recording the image's size, mtime, ctime, device and inode; the next
  write takes a new lease first.

At recovery (:func:`judge_lease`) a RELEASED lease must find the image
exactly as recorded; a HELD one must find its mtime and ctime not after
``t``.  Anything else is a write qmpd did not make, and the bitmaps are
loaded inconsistent.  A lease lost in a power cut leaves an older one on
disk, which only makes the verdict stricter.  What it cannot see: a
foreign write stamped before ``t``, i.e. made within ``length`` of a crash
that hit while qmpd was writing (or with the clock stepped back).

Recovery (:func:`recover`): after a clean close the snapshot is exact (if the
image's size, mtime and ctime still match; otherwise every bitmap is marked
inconsistent).  After a crash every RECORDING bitmap gets the coarse bits ORed
in (expanded to its granularity): it may then hold more than was written,
never less.  Example::

    wi = WriteIntent(size=8 << 20, shift=20)
    need = wi.begin(3 << 20, 4096)      # [3]: bit 3 must be made durable
    wi.request(need); bits = wi.take_pending()   # [3] ... write + fdatasync
    wi.mark_durable(bits)
    wi.begin(3 << 20, 8192)             # []: already durable, no sync
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bitarray import bitarray
from bitarray.util import zeros

from qmpd.bitmap.hbitmap import HBitmap

__all__ = [
    "DEFAULT_COARSE_SHIFT",
    "FORMAT_VERSION",
    "INTENT_BITS_OFFSET",
    "MAX_AHEAD",
    "BitmapRecord",
    "ImageIdentity",
    "JournalFormatError",
    "LEASE_OFFSET",
    "Lease",
    "Snapshot",
    "WriteLease",
    "WriteIntent",
    "decode_intent",
    "decode_lease",
    "decode_snapshot",
    "encode_intent",
    "encode_intent_header",
    "encode_lease",
    "judge_lease",
    "encode_snapshot",
    "recover",
    "state_file_stem",
]

FORMAT_VERSION = 1
#: 1 MiB per write-intent bit.
DEFAULT_COARSE_SHIFT = 20
#: Most coarse bits made durable ahead of a sequential stream (4 GiB at 1 MiB).
MAX_AHEAD = 4096
#: Where the write-intent bits start in the ``.qwi`` file.
INTENT_BITS_OFFSET = 512

_SNAP_MAGIC = b"QMPDBMAP"
_INTENT_MAGIC = b"QMPDWINT"
_SNAP_HEAD = struct.Struct("<8sHHIqqqqqqII")  # 72 bytes
_RECORD_HEAD = struct.Struct("<HBBIqII")  # 24 bytes
_INTENT_HEAD = struct.Struct("<8sHHIqI")  # 28 bytes, then the CRC
_LEASE_MAGIC = b"QMPDLEAS"
_LEASE = struct.Struct("<8sB7xqqqqqq")  # 64 bytes, then the CRC
#: Where the write lease sits in the ``.qwi`` file (inside the header's padding).
LEASE_OFFSET = 64
_HELD = 1
_RELEASED = 2
_FLAG_CLEAN = 1
_REC_RECORDING = 1
_REC_INCONSISTENT = 2
_REC_TRANSIENT = 4
_MAX_NAME = 1023


class JournalFormatError(ValueError):
    """A state file is truncated, corrupt or of an unknown version."""


@dataclass(frozen=True, slots=True)
class ImageIdentity:
    """What identifies an image without reading its contents."""

    size: int
    mtime_ns: int
    ctime_ns: int
    dev: int
    ino: int

    def same_file(self, other: ImageIdentity) -> bool:
        """:return: same device and inode."""
        return (self.dev, self.ino) == (other.dev, other.ino)

    def unchanged(self, other: ImageIdentity) -> bool:
        """:return: same file, size, mtime and ctime."""
        return self == other


@dataclass(slots=True)
class BitmapRecord:
    """One persistent bitmap as stored."""

    name: str
    granularity: int
    size: int
    recording: bool
    inconsistent: bool
    #: ``HBitmap.to_bytes_le`` of the bits.
    bits: bytes
    #: Added with ``persistent: false`` and kept anyway (the TRANSIENT flag).
    transient: bool = False

    def to_hbitmap(self) -> HBitmap:
        """:return: the bits as an HBitmap of this size and granularity."""
        hb = HBitmap(self.size, self.granularity)
        hb.merge_bytes_le(self.bits)
        return hb


@dataclass(slots=True)
class Snapshot:
    """The decoded ``.qbm`` file."""

    path: str
    identity: ImageIdentity
    clean: bool
    sequence: int
    coarse_shift: int
    records: list[BitmapRecord] = field(default_factory=list)


def state_file_stem(realpath: str) -> str:
    """:return: ``<basename>-<key>``, the state files' name without suffix
    (the basename reduced to ``[A-Za-z0-9._-]``, at most 40 characters)."""
    import hashlib

    base = realpath.rsplit("/", 1)[-1]
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in base)[:40]
    key = hashlib.sha256(realpath.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"{safe.lstrip('.') or 'image'}-{key}"


# ------------------------------------------------------------------ snapshot


def encode_snapshot(snap: Snapshot) -> bytes:
    """:return: the bytes of a ``.qbm`` file."""
    path = snap.path.encode("utf-8", "surrogateescape")
    ident = snap.identity
    parts = [_SNAP_HEAD.pack(
        _SNAP_MAGIC, FORMAT_VERSION, _FLAG_CLEAN if snap.clean else 0, len(snap.records),
        ident.size, ident.mtime_ns, ident.ctime_ns, ident.dev, ident.ino, snap.sequence,
        snap.coarse_shift, len(path)), path]
    for rec in snap.records:
        name = rec.name.encode()
        flags = ((_REC_RECORDING if rec.recording else 0) | (_REC_INCONSISTENT if rec.inconsistent else 0)
                 | (_REC_TRANSIENT if rec.transient else 0))
        parts.append(_RECORD_HEAD.pack(len(name), flags, 0, rec.granularity, rec.size,
                                       len(rec.bits), zlib.crc32(rec.bits)))
        parts.append(name)
        parts.append(rec.bits)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_snapshot(data: bytes) -> Snapshot:
    """:return: the snapshot in ``data``.

    :raise JournalFormatError: wrong magic or version, bad checksum, truncated.
    """
    if len(data) < _SNAP_HEAD.size + 4 or data[:8] != _SNAP_MAGIC:
        raise JournalFormatError("not a qmpd bitmap snapshot")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise JournalFormatError("snapshot checksum mismatch")
    (_, version, flags, nrec, size, mtime, ctime, dev, ino, seq, shift,
     plen) = _SNAP_HEAD.unpack_from(body)
    if version != FORMAT_VERSION:
        raise JournalFormatError(f"snapshot format version {version} is not supported")
    pos = _SNAP_HEAD.size
    path = body[pos:pos + plen].decode("utf-8", "surrogateescape")
    pos += plen
    records = []
    for _ in range(nrec):
        if pos + _RECORD_HEAD.size > len(body):
            raise JournalFormatError("snapshot truncated")
        nlen, rflags, _r, gran, rsize, blen, bcrc = _RECORD_HEAD.unpack_from(body, pos)
        pos += _RECORD_HEAD.size
        name = body[pos:pos + nlen].decode()
        pos += nlen
        bits = body[pos:pos + blen]
        pos += blen
        if len(bits) != blen or zlib.crc32(bits) != bcrc or nlen > _MAX_NAME:
            raise JournalFormatError(f"bitmap record '{name}' is corrupt")
        if gran < 1 or gran & (gran - 1) or blen != -(-(-(-rsize // gran)) // 8):
            raise JournalFormatError(f"bitmap record '{name}' has a bad shape")
        records.append(BitmapRecord(name, gran, rsize, bool(rflags & _REC_RECORDING),
                                    bool(rflags & _REC_INCONSISTENT), bits,
                                    bool(rflags & _REC_TRANSIENT)))
    if pos != len(body):
        raise JournalFormatError("snapshot has trailing bytes")
    return Snapshot(path, ImageIdentity(size, mtime, ctime, dev, ino), bool(flags & _FLAG_CLEAN),
                    seq, shift, records)


# ------------------------------------------------------------ write intent


def _nbits(size: int, shift: int) -> int:
    return -(-size >> shift) if size else 0


def encode_intent_header(size: int, shift: int, lease: Lease | None = None) -> bytes:
    """:return: the 512-byte header of a ``.qwi`` file (with ``lease``)."""
    head = _INTENT_HEAD.pack(_INTENT_MAGIC, FORMAT_VERSION, 0, shift, size, _nbits(size, shift))
    head += struct.pack("<I", zlib.crc32(head))
    head += bytes(LEASE_OFFSET - len(head))
    if lease is not None:
        head += encode_lease(lease)
    return head + bytes(INTENT_BITS_OFFSET - len(head))


def encode_intent(size: int, shift: int, bits: bitarray | None = None,
                  lease: Lease | None = None) -> bytes:
    """:return: a whole ``.qwi`` file (all bits clear unless ``bits``)."""
    n = _nbits(size, shift)
    body = bits.tobytes() if bits is not None else bytes(-(-n // 8))
    return encode_intent_header(size, shift, lease) + body


# ------------------------------------------------------------ write lease


@dataclass(frozen=True, slots=True)
class Lease:
    """The write lease of an image (see the module docstring).

    ``held``: qmpd may be writing the image until ``until`` (ns since the
    epoch, CLOCK_REALTIME, the clock that stamps mtime and ctime).
    Released: qmpd stopped writing at ``until`` and the image was then
    ``image``.
    """

    held: bool
    until: int
    image: ImageIdentity | None = None


def encode_lease(lease: Lease) -> bytes:
    """:return: the 68 bytes of a lease record (at :data:`LEASE_OFFSET`)."""
    im = lease.image or ImageIdentity(0, 0, 0, 0, 0)
    body = _LEASE.pack(_LEASE_MAGIC, _HELD if lease.held else _RELEASED, lease.until,
                       im.size, im.mtime_ns, im.ctime_ns, im.dev, im.ino)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_lease(data: bytes) -> Lease | None:
    """:return: the lease recorded in a ``.qwi`` file (its first bytes will
    do), or None if it has none (older file, or a torn record)."""
    end = LEASE_OFFSET + _LEASE.size
    if len(data) < end + 4:
        return None
    body = data[LEASE_OFFSET:end]
    (crc,) = struct.unpack_from("<I", data, end)
    if zlib.crc32(body) != crc:
        return None
    magic, state, until, size, mtime, ctime, dev, ino = _LEASE.unpack(body)
    if magic != _LEASE_MAGIC or state not in (_HELD, _RELEASED):
        return None
    if state == _HELD:
        return Lease(True, until)
    return Lease(False, until, ImageIdentity(size, mtime, ctime, dev, ino))


class WriteLease:
    """When qmpd must renew its write lease before writing (pure: the
    caller passes the time and writes the record).

    :param length_ns: how far ahead a lease reaches.
    """

    def __init__(self, length_ns: int) -> None:
        self.length = length_ns
        #: The lease on disk (None: none recorded yet).
        self.current: Lease | None = None

    def due(self, now: int) -> bool:
        """:return: a write starting at ``now`` must first renew the lease
        (none held, or less than three quarters of it left)."""
        cur = self.current
        return cur is None or not cur.held or cur.until - now < self.length - self.length // 4

    def renewed(self, now: int) -> Lease:
        """:return: the lease to record before writing at ``now`` (never
        shorter than the one held)."""
        cur = self.current
        until = now + self.length
        if cur is not None and cur.held:
            until = max(until, cur.until)
        return Lease(True, until)

    def released(self, now: int, image: ImageIdentity) -> Lease:
        """:return: the lease to record when no write is in flight at ``now``
        and the image is ``image``."""
        return Lease(False, now, image)


def judge_lease(lease: Lease | None, current: ImageIdentity,
                fallback: ImageIdentity) -> str | None:
    """:return: why the image must have been written by someone else since
    qmpd stopped (None: only qmpd's own writes explain ``current``).

    ``lease``: the one recorded in the write-intent file (None: not there,
    then the image must be as at the last snapshot, ``fallback``).
    """
    if lease is None:
        if current.unchanged(fallback):
            return None
        return ("the image was modified after qmpd stopped (it differs from the last snapshot, "
                "and the journal has no write lease)")
    if not lease.held:
        assert lease.image is not None
        if current.unchanged(lease.image):
            return None
        return ("the image was modified after qmpd stopped writing it "
                "(size, mtime or ctime differ from the journal's record)")
    late = max(current.mtime_ns, current.ctime_ns) - lease.until
    if late <= 0:
        return None
    return (f"the image was modified after qmpd stopped (its mtime/ctime are "
            f"{late / 1e9:.3f} s past qmpd's write lease)")


def decode_intent(data: bytes) -> tuple[int, int, bitarray]:
    """:return: ``(size, shift, bits)`` of a ``.qwi`` file.

    :raise JournalFormatError: bad magic, version or header checksum, truncated.
    """
    hs = _INTENT_HEAD.size
    if len(data) < INTENT_BITS_OFFSET or data[:8] != _INTENT_MAGIC:
        raise JournalFormatError("not a qmpd write-intent file")
    (crc,) = struct.unpack_from("<I", data, hs)
    if zlib.crc32(data[:hs]) != crc:
        raise JournalFormatError("write-intent header checksum mismatch")
    _, version, _r, shift, size, n = _INTENT_HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise JournalFormatError(f"write-intent format version {version} is not supported")
    raw = data[INTENT_BITS_OFFSET:INTENT_BITS_OFFSET + -(-n // 8)]
    if len(raw) != -(-n // 8) or n != _nbits(size, shift):
        raise JournalFormatError("write-intent file truncated")
    bits = bitarray(endian="little")
    bits.frombytes(raw)
    del bits[n:]
    return size, shift, bits


class WriteIntent:
    """The in-memory state of one image's write-intent layer.

    ``durable``: bits known to be on disk.  ``pending``: bits requested and
    not yet taken by a sync.  Per bit, the number of writes in flight, and
    whether a write touched it since the last :meth:`capture`.
    """

    def __init__(self, size: int, shift: int = DEFAULT_COARSE_SHIFT) -> None:
        self.size = size
        self.shift = shift
        n = _nbits(size, shift)
        self.durable: bitarray = zeros(n, "little")
        self._pending: bitarray = zeros(n, "little")
        self._inflight: dict[int, int] = {}
        self._touched: bitarray = zeros(n, "little")
        self._keep: bitarray | None = None
        #: Coarse bits covered by the current sequential stream, and where it ends.
        self._stream = 0
        self._stream_end = -2

    @property
    def nbits(self) -> int:
        """Number of coarse bits."""
        return len(self.durable)

    @property
    def writes_in_flight(self) -> int:
        """Coarse bits with a write in flight (0 when idle)."""
        return len(self._inflight)

    def span(self, offset: int, length: int) -> range:
        """:return: the coarse bit indices covering the byte range (clipped)."""
        n = len(self.durable)
        if length <= 0 or offset >= self.size:
            return range(0)
        return range(offset >> self.shift, min(n, ((offset + length - 1) >> self.shift) + 1))

    def begin(self, offset: int, length: int) -> list[int]:
        """A write of the range starts: count it in flight.

        :return: the covering bits that are not durable yet (the caller must
            :meth:`request` them and wait for their sync before writing).
        """
        bits = self.span(offset, length)
        if not bits:
            return []
        inflight, durable = self._inflight, self.durable
        for i in bits:
            inflight[i] = inflight.get(i, 0) + 1
        self._touched[bits.start:bits.stop] = 1
        if bits.start in (self._stream_end - 1, self._stream_end):
            self._stream += bits.stop - self._stream_end
        else:
            self._stream = len(bits)
        self._stream_end = bits.stop
        if durable.count(1, bits.start, bits.stop) == len(bits):
            return []
        need = [i for i in bits if not durable[i]]
        # Sequential writes: make as many bits ahead durable as the stream
        # has covered so far (at most MAX_AHEAD), so a stream of N bits
        # costs about log2(N) syncs; a crash then over-reports at most that.
        ahead = min(self._stream, MAX_AHEAD) if self._stream > len(bits) else 0
        stop = min(len(durable), bits.stop + ahead)
        need.extend(i for i in range(bits.stop, stop) if not durable[i])
        return need

    def end(self, offset: int, length: int) -> None:
        """The write that :meth:`begin` counted is over (landed or failed)."""
        inflight = self._inflight
        for i in self.span(offset, length):
            left = inflight[i] - 1
            if left:
                inflight[i] = left
            else:
                del inflight[i]

    def load_durable(self, bits: bitarray) -> None:
        """Start from the bits found on disk (after a crash): syncs rewrite
        whole bytes, which must keep them until a snapshot covers them.

        :raise ValueError: ``bits`` has another length.
        """
        if len(bits) != len(self.durable):
            raise ValueError("write-intent layer of another size")
        self.durable |= bits

    def running_bits(self) -> list[int]:
        """:return: the bits under a write in flight."""
        return list(self._inflight)

    def request(self, bits: Iterable[int]) -> None:
        """Ask for ``bits`` to be made durable by the next sync."""
        for i in bits:
            if not self.durable[i]:
                self._pending[i] = 1

    def all_durable(self, bits: Sequence[int]) -> bool:
        """:return: every one of ``bits`` is durable."""
        return all(self.durable[i] for i in bits)

    @property
    def has_pending(self) -> bool:
        """Some bit waits for a sync."""
        return self._pending.any()

    def take_pending(self) -> list[int]:
        """:return: the requested bits, now owned by the sync about to run."""
        taken = list(self._pending.search(1))
        self._pending.setall(0)
        return taken

    def mark_durable(self, bits: Iterable[int]) -> None:
        """The sync of ``bits`` completed."""
        for i in bits:
            self.durable[i] = 1

    def byte_span(self, bits: Sequence[int]) -> tuple[int, bytes]:
        """:return: ``(file offset, bytes)`` to write so that ``bits`` and
        everything already durable are set on disk."""
        lo, hi = min(bits) // 8, max(bits) // 8 + 1
        image = self.durable.copy()
        for i in bits:
            image[i] = 1
        return INTENT_BITS_OFFSET + lo, image.tobytes()[lo:hi]

    def capture(self) -> None:
        """A snapshot of the fine bits is being captured now: remember which
        bits must survive the reset that follows it (writes in flight now,
        and from here on every write that begins)."""
        keep = zeros(len(self.durable), "little")
        for i in self._inflight:
            keep[i] = 1
        self._keep = keep
        self._touched.setall(0)

    def reset_mask(self) -> bitarray:
        """After the captured snapshot is durable: drop from ``durable`` every
        bit no write touched since :meth:`capture` began and none had in
        flight then.

        :return: the new durable bits, to be written over the whole layer.
        """
        keep = self._keep if self._keep is not None else zeros(len(self.durable), "little")
        self._keep = None
        self.durable &= keep | self._touched
        return self.durable.copy()


def recover(snap: Snapshot, intent: bitarray | None, intent_shift: int) -> list[HBitmap]:
    """:return: one HBitmap per record of ``snap``, with the coarse ``intent``
    bits ORed into each RECORDING, consistent record (after a crash); pass
    ``intent=None`` after a clean close."""
    out = []
    for rec in snap.records:
        hb = rec.to_hbitmap()
        if intent is not None and rec.recording and not rec.inconsistent and intent.any():
            step = 1 << intent_shift
            for i in intent.search(1):
                start = i * step
                if start >= hb.size:
                    break
                hb.set(start, min(step, hb.size - start))
        out.append(hb)
    return out
