"""A fixed-size dirty bitmap over a byte range, backed by a C bit array.

Bit ``i`` of an :class:`HBitmap` with granularity ``G`` covers the bytes
``[i*G, (i+1)*G)``; the last bit may cover fewer bytes when the size is not a
multiple of ``G``.  Setting rounds outward, resetting rounds inward, so a
bitmap never forgets a byte that was set.  With granularity 1 and size 8::

    hb = HBitmap(8, 1)       bits 00000000   count 0
    hb.set(2, 3)             bits 00111000   count 3
    hb.set(4, 2)             bits 00111100   count 4
    hb.reset(3, 2)           bits 00100100   count 2
    hb.next_dirty(3)         -> 5
    list(hb.dirty_extents()) -> [(2, 1), (5, 1)]

With granularity 4 and size 10 (three bits, the last covering bytes 8..9),
``set(3, 2)`` dirties bits 0 and 1 (bytes 0..7); ``reset(2, 4)`` changes
nothing (no bit lies wholly inside bytes 2..5); ``reset(8, 2)`` clears the
partial last bit because the range ends at the end of the bitmap.

The bits live in one little-endian :class:`bitarray.bitarray` (``nbits/8``
bytes), so bit ``i`` is bit ``i % 8`` of byte ``i // 8`` -- the byte layout of
QEMU's leaf level on x86-64, hashed by :meth:`HBitmap.sha256`.  Every
operation runs in C: range updates and searches in bitarray, run detection
and granularity conversion in numpy (64-bit mask-and-shift ladders for
factors 2 and 4, byte/word views beyond).  Python loops run once per window
of 2**21 bits or per factor of two, never per bit; extents are handed out by
a C iterator.  The number of set bits is kept up to date on every change, so
:meth:`HBitmap.count` is O(1); bulk operations recount once (a popcount).

Unlike QEMU's HBitmap there are no upper levels: bitarray's searches skip
clean 64-bit words, which is fast enough at the sizes qmpd deals with
(16,777,216 bits for 1 TiB at 64 KiB, 2 MiB of memory).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from itertools import chain

from typing import TYPE_CHECKING, Any

from bitarray import bitarray
from bitarray.util import zeros

__all__ = ["HBitmap"]

#: Bits examined per step by the run finder (bounds its temporary arrays).
_WINDOW = 1 << 21

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    _IntArray = npt.NDArray[np.int64]
    _ByteArray = npt.NDArray[np.uint8]


def _np() -> Any:
    """numpy, imported on first use: it costs ~0.1 s of daemon start-up."""
    import numpy

    return numpy


def _check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(
            f"range [{offset}, {offset + length}) outside bitmap of {size} bytes"
        )


class HBitmap:
    """A dirty bitmap of ``ceil(size / granularity)`` bits.

    :param size: number of bytes covered (``>= 0``).
    :param granularity: bytes per bit, a power of two (``>= 1``; QMP only
        allows ``>= 512``, smaller values are for internal use and tests).
    :raises ValueError: on a negative size or a bad granularity.
    """

    __slots__ = ("_size", "_granularity", "_shift", "_bits", "_count")

    def __init__(self, size: int, granularity: int) -> None:
        if size < 0:
            raise ValueError(f"negative bitmap size {size}")
        if granularity < 1 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two")
        self._size = size
        self._granularity = granularity
        self._shift = granularity.bit_length() - 1
        self._bits: bitarray = zeros(-(-size // granularity), "little")
        self._count = 0

    # ------------------------------------------------------------------ shape

    @property
    def size(self) -> int:
        """Number of bytes covered."""
        return self._size

    @property
    def granularity(self) -> int:
        """Bytes per bit."""
        return self._granularity

    @property
    def nbits(self) -> int:
        """Number of bits, ``ceil(size / granularity)``."""
        return len(self._bits)

    def memory(self) -> int:
        """:return: bytes of memory held (object plus bit buffer)."""
        return self._bits.__sizeof__()

    def __repr__(self) -> str:
        return (
            f"HBitmap(size={self._size}, granularity={self._granularity}, "
            f"count={self._count})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HBitmap):
            return NotImplemented
        return (
            self._size == other._size
            and self._granularity == other._granularity
            and self._bits == other._bits
        )

    __hash__ = None  # type: ignore[assignment]

    def truncate(self, size: int) -> None:
        """Cover ``size`` bytes: new bits are clean, bits past the end go
        (QEMU's hbitmap_truncate, used by ``block_resize``)."""
        if size < 0:
            raise ValueError(f"negative bitmap size {size}")
        nbits = -(-size // self._granularity)
        if nbits < len(self._bits):
            del self._bits[nbits:]
        else:
            self._bits.extend(zeros(nbits - len(self._bits), "little"))
        self._size = size
        self._count = self._bits.count()

    # -------------------------------------------------------------- updating

    def set(self, offset: int, length: int) -> None:
        """Mark every bit touching ``[offset, offset+length)`` (outward).

        :raises ValueError: if the range is not inside ``[0, size]``.
        """
        _check_range(self._size, offset, length)
        if length == 0:
            return
        b0 = offset >> self._shift
        b1 = ((offset + length - 1) >> self._shift) + 1
        bits = self._bits
        if b1 - b0 == 1:
            if not bits[b0]:
                bits[b0] = 1
                self._count += 1
            return
        self._count += bits.count(0, b0, b1)
        bits[b0:b1] = 1

    def reset(self, offset: int, length: int) -> None:
        """Clear the bits lying wholly inside ``[offset, offset+length)``.

        A range that ends at :attr:`size` also clears the partial last bit.
        For granularity-aligned ranges (all QEMU allows, and all the backup
        job uses) this is exact; an unaligned range is rounded *inward*, so a
        byte is never reported clean while part of its bit is still dirty.

        :raises ValueError: if the range is not inside ``[0, size]``.
        """
        _check_range(self._size, offset, length)
        end = offset + length
        b0 = -(-offset >> self._shift)
        b1 = len(self._bits) if end == self._size else end >> self._shift
        if b1 <= b0:
            return
        self._count -= self._bits.count(1, b0, b1)
        self._bits[b0:b1] = 0

    def clear(self) -> None:
        """Clear every bit."""
        self._bits.setall(0)
        self._count = 0

    def fill(self) -> None:
        """Set every bit."""
        self._bits.setall(1)
        self._count = len(self._bits)

    def copy(self) -> HBitmap:
        """:return: an independent bitmap with the same size, granularity, bits."""
        new = HBitmap.__new__(HBitmap)
        new._size = self._size
        new._granularity = self._granularity
        new._shift = self._shift
        new._bits = self._bits.copy()
        new._count = self._count
        return new

    def restore_from(self, snapshot: HBitmap) -> None:
        """Make this bitmap's bits equal to ``snapshot``'s (see :meth:`copy`).

        :raises ValueError: if size or granularity differ.
        """
        if (snapshot._size, snapshot._granularity) != (self._size, self._granularity):
            raise ValueError("snapshot has a different size or granularity")
        if snapshot is not self:
            self._bits = snapshot._bits.copy()
            self._count = snapshot._count

    def merge_from(self, other: HBitmap) -> None:
        """``self |= other``, converting ``other`` to this granularity.

        Equal granularities OR bitwise.  Otherwise every dirty byte range of
        ``other`` is set here with outward rounding: a finer ``other`` marks a
        bit if any of its bits under it is set, a coarser one marks all the
        bits under each of its set bits.  ``other`` may be ``self``.

        :raises ValueError: if the sizes differ.
        """
        if other._size != self._size:
            raise ValueError(
                f"sizes differ (destination {self._size}, source {other._size})"
            )
        if other is self or other._count == 0:
            return
        if other._shift == self._shift:
            self._bits |= other._bits
        else:
            self._bits |= _convert(other._bits, other._shift, self._shift, len(self._bits))
        self._count = self._bits.count()

    # --------------------------------------------------------------- queries

    def get(self, offset: int) -> bool:
        """:return: whether the byte at ``offset`` is dirty.

        :raises ValueError: if ``offset`` is not in ``[0, size)``.
        """
        if not 0 <= offset < self._size:
            raise ValueError(f"offset {offset} outside bitmap of {self._size} bytes")
        return bool(self._bits[offset >> self._shift])

    def count(self) -> int:
        """:return: the number of set bits (cached, O(1))."""
        return self._count

    def popcount(self) -> int:
        """:return: the number of set bits, counted afresh (what :meth:`count` caches)."""
        return self._bits.count()

    def load_bits(self, bits: bitarray) -> None:
        """Replace the contents with ``bits`` (:attr:`nbits` long, little
        endian), e.g. a benchmark's random fill.

        :raise ValueError: wrong length.
        """
        if len(bits) != len(self._bits):
            raise ValueError(f"expected {len(self._bits)} bits, got {len(bits)}")
        self._bits = bitarray(bits, "little")
        self._count = self._bits.count()

    def dirty_bytes(self) -> int:
        """:return: ``count() * granularity`` (QEMU's ``count``; may exceed size)."""
        return self._count << self._shift

    def is_empty(self) -> bool:
        """:return: whether no bit is set."""
        return self._count == 0

    def density(self, buckets: int) -> list[float]:
        """Downsample to at most ``buckets`` equal slices of the bits (the last
        may be shorter); :return: the dirty fraction of each, 0.0 to 1.0.

        Fewer bits than buckets give one slice per bit.  Example: 8 bits
        ``11000001`` in 4 buckets -> ``[1.0, 0.0, 0.0, 0.5]``.
        """
        nbits = len(self._bits)
        if nbits == 0 or buckets <= 0:
            return []
        buckets = min(buckets, nbits)
        if self._count == 0:
            return [0.0] * buckets
        step = -(-nbits // buckets)
        bits = self._bits
        out = []
        for start in range(0, nbits, step):
            stop = min(start + step, nbits)
            out.append(bits.count(1, start, stop) / (stop - start))
        return out

    def _search(self, value: int, offset: int, end: int | None) -> int:
        stop = self._size if end is None else min(end, self._size)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if offset >= stop:
            return -1
        if value and self._count == 0:
            return -1
        if not value and self._count == len(self._bits):
            return -1
        i = self._bits.find(value, offset >> self._shift, ((stop - 1) >> self._shift) + 1)
        return -1 if i < 0 else max(offset, i << self._shift)

    def next_dirty(self, offset: int, end: int | None = None) -> int:
        """:return: the first dirty byte in ``[offset, end)``, or -1.

        ``end`` defaults to (and is clipped to) :attr:`size`.  As in QEMU, an
        ``offset`` inside a dirty bit is itself the answer.
        """
        return self._search(1, offset, end)

    def next_clean(self, offset: int, end: int | None = None) -> int:
        """:return: the first clean byte in ``[offset, end)``, or -1."""
        return self._search(0, offset, end)

    def next_dirty_area(
        self, offset: int, end: int | None = None, max_len: int | None = None
    ) -> tuple[int, int] | None:
        """Find the first dirty area in ``[offset, end)``.

        :return: ``(start, length)`` of the first dirty run at or after
            ``offset``, clipped to ``end`` (default and maximum :attr:`size`)
            and to ``max_len`` bytes; None if there is none.
        """
        stop = self._size if end is None else min(end, self._size)
        start = self.next_dirty(offset, stop)
        if start < 0:
            return None
        if max_len is not None:
            stop = min(stop, start + max_len)
        clean = self.next_clean(start, stop)
        return (start, (stop if clean < 0 else clean) - start)

    def dirty_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """:return: an iterator of ``(offset, length)`` of every maximal
            dirty run, in order, in bytes, clipped to ``[start, end)`` and to
            :attr:`size`.

        Runs are found a window at a time, and each window's runs are handed
        out by a C iterator.  Changing the bitmap while iterating is undefined.
        """
        stop = self._size if end is None else min(end, self._size)
        start = max(start, 0)
        if start >= stop or self._count == 0:
            return iter(())
        return chain.from_iterable(self._extent_batches(start, stop))

    def _extent_batches(self, start: int, stop: int) -> Iterator[Iterator[tuple[int, int]]]:
        shift = self._shift
        b0, b1 = start >> shift, ((stop - 1) >> shift) + 1
        for firsts, lasts in _runs(self._bits, b0, b1):
            lo, hi = firsts << shift, lasts << shift
            lo[0] = max(int(lo[0]), start)  # only the very first run can
            hi[-1] = min(int(hi[-1]), stop)  # stick out of [start, stop)
            yield zip(lo.tolist(), (hi - lo).tolist())

    def to_bytes_le(self) -> bytes:
        """:return: ``ceil(nbits/8)`` bytes; bit i is bit ``i%8`` of byte ``i//8``."""
        return self._bits.tobytes()

    def merge_bytes_le(self, data: bytes) -> None:
        """``self |= bits`` where ``data`` is the layout of :meth:`to_bytes_le`
        of a bitmap of the same shape (persistent bitmaps read back).

        :raises ValueError: if ``data`` is not ``ceil(nbits/8)`` bytes long.
        """
        nbits = len(self._bits)
        if len(data) != -(-nbits // 8):
            raise ValueError(f"{len(data)} bytes do not hold {nbits} bits")
        other = bitarray(endian="little")
        other.frombytes(data)
        del other[nbits:]
        self._bits |= other
        self._count = self._bits.count()

    def sha256(self) -> str:
        """:return: QEMU's ``x-debug-block-dirty-bitmap-sha256`` of this bitmap.

        The hash covers ``ceil(nbits/64)`` little-endian 64-bit words, i.e.
        :meth:`to_bytes_le` zero-padded to a multiple of 8 bytes.
        """
        data = self._bits.tobytes()
        return hashlib.sha256(data + bytes(-len(data) % 8)).hexdigest()


# ------------------------------------------------------------------ helpers


def _runs(bits: bitarray, b0: int, b1: int) -> Iterator[tuple[_IntArray, _IntArray]]:
    """Yield arrays of ``first`` and ``last`` (exclusive) bit indices of the
    runs of ones in ``[b0, b1)``, in order, a window of bits at a time.

    The bits XORed with themselves shifted by one are set where runs start
    and end, alternately; numpy finds the set bits of each window.
    """
    np = _np()
    sub = bits[b0:b1]
    edges = np.frombuffer((sub ^ (sub >> 1)).tobytes(), dtype=np.uint8)
    pending: _IntArray = np.empty(0, np.int64)
    step = _WINDOW // 8 or 1
    for w0 in range(0, edges.size, step):
        window = edges[w0 : w0 + step]
        nz = np.flatnonzero(window.view(np.bool_))
        if nz.size == 0:
            continue
        flat = np.flatnonzero(np.unpackbits(window[nz], bitorder="little").view(np.bool_))
        pos = nz[flat >> 3].astype(np.int64) * 8 + (flat & 7) + (b0 + w0 * 8)
        if pending.size:
            pos = np.concatenate([pending, pos])
        cut = pos.size & ~1
        pending = pos[cut:]
        if cut:
            yield pos[0:cut:2], pos[1:cut:2]
    if pending.size:
        yield pending, np.array([b1], np.int64)


_HALVE_STEPS = [
    (1, 0x3333333333333333),
    (2, 0x0F0F0F0F0F0F0F0F),
    (4, 0x00FF00FF00FF00FF),
    (8, 0x0000FFFF0000FFFF),
    (16, 0x00000000FFFFFFFF),
]

_SPREAD_STEPS = [
    (16, 0x0000FFFF0000FFFF),
    (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F),
    (2, 0x3333333333333333),
    (1, 0x5555555555555555),
]


def _halve(buf: _ByteArray) -> _ByteArray:
    """OR adjacent pairs of bits: ``n`` bits (as bytes) -> ``ceil(n/2)`` bits.

    Works on 64-bit words: OR each odd bit into the even bit below it, then
    squeeze the even bits together with the usual mask-and-shift ladder.
    """
    np = _np()
    buf = np.concatenate([buf, np.zeros(-buf.size % 8, np.uint8)])
    x = buf.view("<u8")
    x = (x | (x >> np.uint64(1))) & np.uint64(0x5555555555555555)
    for shift, mask in _HALVE_STEPS:
        x = (x | (x >> np.uint64(shift))) & np.uint64(mask)
    out: _ByteArray = x.astype("<u4").view(np.uint8)
    return out


def _double(buf: _ByteArray) -> _ByteArray:
    """Repeat every bit twice: ``n`` bits (as bytes) -> ``2n`` bits.

    The inverse ladder of :func:`_halve`: spread 32 bits over the even bits
    of a 64-bit word, then copy each even bit into the odd bit above it.
    """
    np = _np()
    buf = np.concatenate([buf, np.zeros(-buf.size % 4, np.uint8)])
    x = buf.view("<u4").astype("<u8")
    for shift, mask in _SPREAD_STEPS:
        x = (x | (x << np.uint64(shift))) & np.uint64(mask)
    out: _ByteArray = (x | (x << np.uint64(1))).view(np.uint8)
    return out


def _convert(src: bitarray, src_shift: int, dst_shift: int, nbits: int) -> bitarray:
    """Re-sample ``src`` at another granularity (outward), as ``nbits`` bits."""
    np = _np()
    buf = np.frombuffer(src.tobytes(), dtype=np.uint8)
    if src_shift < dst_shift:  # coarsen: OR groups of k bits
        k = 1 << (dst_shift - src_shift)
        if k < 8:
            out = buf
            while k > 1:
                out = _halve(out)
                k //= 2
        else:
            m = k // 8  # bytes per destination bit
            buf = np.concatenate([buf, np.zeros(-buf.size % m, np.uint8)])
            word = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(m, np.uint64)
            grouped = buf.view(word)
            if m > 8:
                grouped = grouped.reshape(-1, m // 8)
                hit = grouped.any(axis=1)
            else:
                hit = grouped != 0
            out = np.packbits(hit, bitorder="little")
    else:  # refine: repeat every bit k times
        k = 1 << (src_shift - dst_shift)
        if k < 8:
            out = buf
            while k > 1:
                out = _double(out)
                k //= 2
        else:
            ones = np.unpackbits(buf, bitorder="little") * np.uint8(0xFF)
            out = np.repeat(ones, k // 8)
    res = bitarray(endian="little")
    res.frombytes(out.tobytes())
    if len(res) < nbits:
        res.extend(zeros(nbits - len(res), "little"))
    del res[nbits:]
    return res
