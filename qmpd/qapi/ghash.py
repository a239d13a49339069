"""Which unexpected key QEMU reports: GLib hash-table iteration order.

QEMU copies an object's keys into a ``GHashTable`` (in the iteration order
of its ``QDict``), removes each key as its member is visited, and reports
the first key the table's iterator yields.  That order is a function of the
hash values, so this module replays it: QDict's ``tdb_hash`` buckets, then
GLib's open addressing (``g_str_hash``, index ``hash * 11 % prime``,
quadratic probing, tombstones, resizes).  Modelled on GLib 2.74 and QEMU
7.2; :func:`first_remaining_key` falls back to input order on any surprise.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["first_remaining_key", "qdict_json", "qdict_order"]

_M32 = 0xFFFFFFFF
_PRIMES = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381,
           32749, 65521, 131071, 262139, 524287, 1048573, 2097143, 4194301]
_UNUSED, _TOMBSTONE = 0, 1
_MIN_SHIFT = 3


def _tdb_hash(key: bytes) -> int:
    value = (0x238F13AF * len(key)) & _M32
    for i, ch in enumerate(key):
        value = (value + (ch << (i * 5 % 24))) & _M32
    return (1103515243 * value + 12345) & _M32


def _str_hash(key: bytes) -> int:
    h = 5381
    for ch in key:
        h = (h * 33 + (ch - 256 if ch > 127 else ch)) & _M32
    return h


def qdict_order(keys: list[str]) -> list[str]:
    """:return: *keys* (distinct, in insertion order) as a QDict iterates them."""
    buckets: dict[int, list[str]] = {}
    for k in keys:
        buckets.setdefault(_tdb_hash(k.encode()) % 512, []).insert(0, k)
    return [k for b in sorted(buckets) for k in buckets[b]]


def qdict_json(value: Any, copied: bool = False) -> str:
    """:return: *value* as QEMU's ``qobject_to_json`` writes it: objects in
    QDict iteration order, ``", "`` and ``": "`` separators.  ``copied``:
    the top-level dict was copied once more (keys sharing a bucket keep
    their order instead of reversing, as in blkdebug's flattened options)."""
    if isinstance(value, dict):
        keys = qdict_order(list(value)[::-1] if copied else list(value))
        items = (f"{json.dumps(k)}: {qdict_json(value[k])}" for k in keys)
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(qdict_json(v) for v in value) + "]"
    return json.dumps(value)


class _GHashSet:
    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size, self.mod, self.mask = 1 << shift, _PRIMES[shift], (1 << shift) - 1

    def _index(self, h: int) -> int:
        return ((h * 11) & _M32) % self.mod

    def _lookup(self, key: str) -> tuple[int, int]:
        h = _str_hash(key.encode())
        h = 2 if h < 2 else h
        i, step, tomb = self._index(h), 0, -1
        while self.hashes[i] != _UNUSED:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h
            if self.hashes[i] == _TOMBSTONE and tomb < 0:
                tomb = i
            step += 1
            i = (i + step) & self.mask
        return (tomb if tomb >= 0 else i), h

    def add(self, key: str) -> None:
        i, h = self._lookup(key)
        if self.hashes[i] >= 2:
            return
        was_unused = self.hashes[i] == _UNUSED
        self.hashes[i], self.keys[i] = h, key
        self.nnodes += 1
        if was_unused:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        i, _ = self._lookup(key)
        if self.hashes[i] < 2:
            return
        self.hashes[i], self.keys[i] = _TOMBSTONE, None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if ((self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT)
                or self.size <= self.noccupied + self.noccupied // 16):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        n, shift = int(self.nnodes * 1.333), 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        grow = max(self.size - old_size, 0)
        self.hashes += [_UNUSED] * grow
        self.keys += [None] * grow
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key, self.keys[i] = self.keys[i], None
            while True:
                j, step = self._index(node_hash), 0
                while moved[j]:
                    step += 1
                    j = (j + step) & self.mask
                moved[j] = True
                replaced = self.hashes[j]
                self.hashes[j] = node_hash
                if replaced < 2:
                    self.keys[j] = key
                    break
                node_hash = replaced
                key, self.keys[j] = self.keys[j], key
        del self.hashes[self.size:]
        del self.keys[self.size:]
        self.noccupied = self.nnodes

    def first(self) -> str | None:
        for h, k in zip(self.hashes, self.keys):
            if h >= 2:
                return k
        return None


def first_remaining_key(keys: list[str], consumed: list[str]) -> str:
    """:return: the key QEMU names in "Parameter '%s' is unexpected".

    :param keys: the object's keys in input order.
    :param consumed: the keys of visited members, in visiting order.
    """
    table = _GHashSet()
    for k in qdict_order(keys):
        table.add(k)
    for k in consumed:
        table.remove(k)
    first = table.first()
    if first is None or first in consumed:        # cannot happen; be safe
        return next(k for k in keys if k not in consumed)
    return first
