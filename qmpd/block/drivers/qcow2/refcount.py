"""Refcount blocks of any width from 1 to 64 bits, as pure values
(docs/interop/qcow2.txt, "Host cluster management").

A refcount block is one cluster of ``cluster_size * 8 / refcount_bits``
entries; entry ``i`` counts the references to host cluster
``table_index * entries + i``.  Sub-byte widths pack entries from the least
significant bit; wider ones are big-endian.  Worked example (512-byte
clusters, 4-bit refcounts, so 1024 entries per block)::

    >>> b = RefcountBlock.empty(512, 4)
    >>> b.set(0, 1); b.set(1, 15); b.set(2, 3)
    >>> bytes(b.data[:2]).hex()                 # entry 0 in the low nibble
    'f103'
    >>> b.get(1), b.max_value
    (15, 15)
    >>> b.first_free(0), b.dirty_span()         # bytes 0..1 changed: sector 0
    (3, (0, 512))

:meth:`RefcountBlock.set` raises :class:`RefcountOverflow` past
``2**bits - 1``; :meth:`dirty_span` lets the driver write back only the
changed 512-byte sectors.
"""

from __future__ import annotations

__all__ = ["RefcountBlock", "RefcountOverflow", "refcount_split"]


class RefcountOverflow(Exception):
    """A refcount would exceed ``2**refcount_bits - 1`` or drop below 0."""


def refcount_split(cluster: int, entries: int) -> tuple[int, int]:
    """:return: (refcount table index, index in the block) of host ``cluster``."""
    return divmod(cluster, entries)


class RefcountBlock:
    """One refcount block's bytes plus the byte range changed since the
    last :meth:`clean`."""

    __slots__ = ("data", "bits", "entries", "max_value", "_lo", "_hi", "_bytes")

    def __init__(self, data: bytearray, bits: int) -> None:
        self.data = data
        self.bits = bits
        self.entries = len(data) * 8 // bits
        self.max_value = (1 << bits) - 1
        self._bytes = bits // 8
        self._lo = len(data)
        self._hi = 0

    @classmethod
    def empty(cls, cluster_size: int, bits: int) -> RefcountBlock:
        return cls(bytearray(cluster_size), bits)

    def get(self, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = self._bytes
            return int.from_bytes(self.data[i * n:(i + 1) * n], "big")
        per = 8 // bits
        return (self.data[i // per] >> ((i % per) * bits)) & self.max_value

    def last_used(self) -> int:
        """:return: the highest entry with a nonzero refcount, or -1."""
        nz = len(self.data.rstrip(b"\0")) - 1
        if nz < 0:
            return -1
        if self.bits >= 8:
            return nz // self._bytes
        per = 8 // self.bits
        return next(i for i in range((nz + 1) * per - 1, nz * per - 1, -1) if self.get(i))

    def set(self, i: int, value: int) -> None:
        """:raise RefcountOverflow: ``value`` does not fit."""
        if value < 0 or value > self.max_value:
            raise RefcountOverflow(value)
        bits = self.bits
        if bits >= 8:
            n = self._bytes
            start = i * n
            self.data[start:start + n] = value.to_bytes(n, "big")
            self._mark(start, start + n)
            return
        per = 8 // bits
        shift = (i % per) * bits
        byte = i // per
        self.data[byte] = (self.data[byte] & ~(self.max_value << shift) & 0xFF) | (value << shift)
        self._mark(byte, byte + 1)

    def add(self, i: int, delta: int) -> int:
        """Add ``delta``; :return: the new value.  :raise RefcountOverflow:"""
        value = self.get(i) + delta
        self.set(i, value)
        return value

    def _mark(self, lo: int, hi: int) -> None:
        if lo < self._lo:
            self._lo = lo
        if hi > self._hi:
            self._hi = hi

    def free_run(self, i: int, n: int) -> int:
        """:return: how many entries from ``i`` (at most ``n``, within the
        block) have refcount 0."""
        end = min(i + n, self.entries)
        if self.bits == 16:
            seg = self.data[2 * i:2 * end]
            return (len(seg) - len(seg.lstrip(b"\0"))) // 2
        k = i
        while k < end and self.get(k) == 0:
            k += 1
        return k - i

    def take(self, i: int, n: int) -> None:
        """Set ``n`` free entries from ``i`` to 1 (a new allocation)."""
        if self.bits == 16:
            self.data[2 * i:2 * (i + n)] = b"\0\1" * n
            self._mark(2 * i, 2 * (i + n))
            return
        for k in range(i, i + n):
            self.set(k, 1)

    def first_free(self, start: int) -> int:
        """:return: the first index >= ``start`` with refcount 0, or ``entries``."""
        if self.bits == 16:
            data = self.data
            at = data.find(b"\0\0", 2 * start)
            while at >= 0 and at & 1:
                at = data.find(b"\0\0", at + 1)
            return at // 2 if at >= 0 else self.entries
        for i in range(start, self.entries):
            if self.get(i) == 0:
                return i
        return self.entries

    def is_empty(self) -> bool:
        return not any(self.data)

    def dirty_span(self) -> tuple[int, int] | None:
        """:return: the changed byte range widened to 512-byte sectors, or None."""
        if self._hi <= self._lo:
            return None
        return self._lo & ~511, min(len(self.data), (self._hi + 511) & ~511)

    def clean(self) -> None:
        self._lo, self._hi = len(self.data), 0
