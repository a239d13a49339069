"""A bounded LRU cache of L2 tables, keyed by their host offset.

Tables are kept as the raw big-endian cluster (QEMU counts its
``l2-cache-size`` in the same bytes), and entries are decoded on access.
Worked example (512-byte clusters, room for two tables)::

    >>> c = L2Cache(cluster_size=512, max_bytes=1024)
    >>> c.put(0x1000, bytearray(512)); c.put(0x1200, bytearray(512))
    >>> c.get_entry(0x1000, 3)
    0
    >>> c.set_entry(0x1000, 3, 0x8000000000050000)
    >>> c.put(0x1400, bytearray(512))       # evicts 0x1200, the least recent
    >>> 0x1200 in c, c.dirty_span(0x1000)
    (False, (0, 512))

Tables are written through (the driver writes the dirty span right after
each update), so eviction never loses anything.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

__all__ = ["L2Cache"]

_Q = struct.Struct(">Q")


class L2Cache:
    def __init__(self, cluster_size: int, max_bytes: int) -> None:
        self.cluster_size = cluster_size
        self.capacity = max(2, max_bytes // cluster_size)
        self._tables: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: dict[int, tuple[int, int]] = {}

    def __contains__(self, offset: object) -> bool:
        return offset in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    @property
    def memory(self) -> int:
        """Bytes held by cached tables."""
        return len(self._tables) * self.cluster_size

    def put(self, offset: int, table: bytearray) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if len(self._tables) > self.capacity:
            for old in list(self._tables):
                if len(self._tables) <= self.capacity:
                    break
                if old not in self._dirty and old != offset:
                    del self._tables[old]

    def table(self, offset: int) -> bytearray | None:
        t = self._tables.get(offset)
        if t is not None:
            self._tables.move_to_end(offset)
        return t

    def get_entry(self, offset: int, index: int) -> int:
        value: int = _Q.unpack_from(self._tables[offset], index * 8)[0]
        return value

    def set_entry(self, offset: int, index: int, value: int) -> None:
        _Q.pack_into(self._tables[offset], index * 8, value)
        lo, hi = self._dirty.get(offset, (index * 8, index * 8 + 8))
        self._dirty[offset] = (min(lo, index * 8) & ~511,
                               min(self.cluster_size, (max(hi, index * 8 + 8) + 511) & ~511))

    def set_entries(self, offset: int, index: int, values: list[int]) -> None:
        """Set ``len(values)`` consecutive entries from ``index`` (one pack)."""
        if not values:
            return
        n = len(values)
        struct.pack_into(f">{n}Q", self._tables[offset], index * 8, *values)
        lo_e, hi_e = index * 8, (index + n) * 8
        lo, hi = self._dirty.get(offset, (lo_e, hi_e))
        self._dirty[offset] = (min(lo, lo_e) & ~511,
                               min(self.cluster_size, (max(hi, hi_e) + 511) & ~511))

    @property
    def has_dirty(self) -> bool:
        """Some table has changes not yet written."""
        return bool(self._dirty)

    def dirty_span(self, offset: int) -> tuple[int, int] | None:
        return self._dirty.get(offset)

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """:return: ``(file offset, bytes)`` of every changed span; clears them."""
        out = []
        for off, (lo, hi) in sorted(self._dirty.items()):
            out.append((off + lo, bytes(self._tables[off][lo:hi])))
        self._dirty.clear()
        return out

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)
        self._dirty.pop(offset, None)

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()
