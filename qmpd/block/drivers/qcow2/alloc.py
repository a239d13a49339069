"""Host cluster allocation over the refcount table and blocks, in memory.

:class:`RefcountState` holds the refcount table and every refcount block
(the driver loads them at open: 2 bytes per 64 KiB cluster by default), finds
free clusters (refcount 0, so freed clusters are reused, lowest first),
creates refcount blocks and grows the refcount table as needed, and then
hands the driver the writes to make, in crash-safe order: refcount blocks
first, then the refcount table entries that point to them, then (after a
table move) the header.  Worked example (64 KiB clusters, 16-bit refcounts;
a fresh image uses clusters 0-3: header, table, block, L1)::

    >>> rs = RefcountState(16, 16, table=[0x20000], blocks={0: block})
    >>> rs.allocate(2)            # two data clusters, right after the L1
    (4, 2)
    >>> rs.get(4), rs.get(6)
    (1, 0)
    >>> rs.free(4, 1); rs.allocate(1)      # a freed cluster is reused
    (4, 1)
    >>> [(off, len(data)) for off, data in rs.take_writes().blocks]
    [(131072, 512)]                        # one sector of block 0

A block that does not exist yet is placed on the first cluster of the range
it covers (so it counts itself).  A table that is too small moves to a fresh
block range past everything: new blocks, then the new table, then the
header switch (``take_writes().new_table``), then the old table is freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpd.block.drivers.qcow2.refcount import RefcountBlock, RefcountOverflow

__all__ = ["RefcountState", "RefcountWrites", "RefcountOverflow"]


@dataclass(slots=True)
class RefcountWrites:
    """What to write, in this order (each ``(file offset, bytes)``)."""

    #: Refcount block contents (whole new blocks, sectors of changed ones).
    blocks: list[tuple[int, bytes]] = field(default_factory=list)
    #: Refcount table sectors (after the blocks they point to).
    table: list[tuple[int, bytes]] = field(default_factory=list)
    #: After a table move: (offset, clusters) for the header, written last.
    new_table: tuple[int, int] | None = None


class RefcountState:
    """The refcount table and blocks of one image."""

    def __init__(self, cluster_bits: int, refcount_bits: int, *, table: list[int],
                 blocks: dict[int, RefcountBlock], table_offset: int = 0,
                 table_clusters: int = 1) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.bits = refcount_bits
        #: Entries per refcount block.
        self.entries = self.cluster_size * 8 // refcount_bits
        #: Refcount table entries (block offsets, 0 for none).
        self.table = list(table)
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        capacity = table_clusters * self.cluster_size // 8
        if len(self.table) < capacity:
            self.table.extend([0] * (capacity - len(self.table)))
        self.blocks = blocks
        #: No free cluster below this index.
        self.free_hint = 0
        self._new_blocks: set[int] = set()
        self._table_dirty: tuple[int, int] | None = None
        self._moved: tuple[int, int] | None = None
        self._old_table: tuple[int, int] | None = None

    # ------------------------------------------------------------ reading

    def get(self, cluster: int) -> int:
        """:return: the refcount of host cluster ``cluster`` (0 if no block)."""
        bi, i = divmod(cluster, self.entries)
        block = self.blocks.get(bi)
        return 0 if block is None else block.get(i)

    def end(self) -> int:
        """:return: one past the highest cluster with a nonzero refcount."""
        for bi in sorted(self.blocks, reverse=True):
            last = self.blocks[bi].last_used()
            if last >= 0:
                return bi * self.entries + last + 1
        return 0

    # ------------------------------------------------------------ changes

    def update(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to a refcount (creating its block); :return: the new
        value.  :raise RefcountOverflow: below 0 or above the width."""
        bi, i = divmod(cluster, self.entries)
        block = self.blocks.get(bi)
        if block is None:
            if delta < 0:
                raise RefcountOverflow(delta)
            block = self._create_block(bi, exclude=cluster)
        value = block.add(i, delta)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    def free(self, start: int, count: int) -> None:
        """Drop one reference from each of ``count`` clusters."""
        for c in range(start, start + count):
            self.update(c, -1)

    def allocate(self, n: int) -> tuple[int, int]:
        """Take up to ``n`` contiguous free clusters (at least one), refcount 1.

        :return: ``(first cluster, count)``.
        """
        start = self._find_free(self.free_hint, n)
        bi, i = divmod(start, self.entries)
        block = self.blocks.get(bi)
        if block is not None:
            # The free run inside this block, taken in one go.
            count = block.free_run(i, n)
            block.take(i, count)
        else:
            count = 1
            while count < n and self._is_free(start + count):
                count += 1
            for c in range(start, start + count):
                self.update(c, 1)
        if start == self.free_hint:
            self.free_hint = start + count
        return start, count

    def allocate_contiguous(self, n: int) -> int:
        """Take exactly ``n`` contiguous free clusters (L1 tables, bitmap
        directories); :return: the first."""
        c = self.free_hint
        while True:
            start = self._find_free(c, n)
            bad = next((k for k in range(start, start + n) if not self._is_free(k)), None)
            if bad is None:
                break
            c = bad + 1
        for k in range(start, start + n):
            self.update(k, 1)
        if start == self.free_hint:
            self.free_hint = start + n
        return start

    def _is_free(self, cluster: int) -> bool:
        bi, i = divmod(cluster, self.entries)
        block = self.blocks.get(bi)
        if block is None:
            # A missing block's first cluster is where that block will go.
            return i != 0 and bi < len(self.table)
        return block.get(i) == 0

    def _find_free(self, start: int, n: int) -> int:
        c = start
        while True:
            bi, i = divmod(c, self.entries)
            block = self.blocks.get(bi)
            if block is None:
                if bi >= len(self.table):
                    self._grow_table(bi)
                    continue
                return c if i else c + 1
            j = block.first_free(i)
            if j < block.entries:
                return bi * self.entries + j
            c = (bi + 1) * self.entries

    def _create_block(self, bi: int, exclude: int) -> RefcountBlock:
        if bi >= len(self.table):
            self._grow_table(bi)
        block = RefcountBlock.empty(self.cluster_size, self.bits)
        home = bi * self.entries
        if home == exclude:
            raise RefcountOverflow(f"cluster {exclude} is reserved for its refcount block")
        self.blocks[bi] = block
        block.set(0, 1)
        self.table[bi] = home << self.cluster_bits
        self._new_blocks.add(bi)
        self._mark_table(bi)
        return block

    def mark_block_new(self, bi: int) -> None:
        """Have :meth:`take_writes` write block ``bi`` whole and its table entry
        (for a block set up by hand, as in a new image)."""
        self._new_blocks.add(bi)
        self._mark_table(bi)

    def _mark_table(self, bi: int) -> None:
        lo, hi = self._table_dirty or (bi, bi + 1)
        self._table_dirty = (min(lo, bi), max(hi, bi + 1))

    def _grow_table(self, need_index: int) -> None:
        """Move the table to a fresh block range past everything in use."""
        cs = self.cluster_size
        per_cluster = cs // 8
        top = max([self.end(), (max(self.blocks, default=-1) + 1) * self.entries,
                   len(self.table) * self.entries])
        region = -(-top // self.entries)
        want = max(need_index + 1, region + 1, len(self.table) * 3 // 2)
        while True:
            t = -(-want // per_cluster)
            nb = 1
            while nb * self.entries < nb + t:
                nb += 1
            if t * per_cluster >= max(region + nb, need_index + 1):
                break
            want += per_cluster
        old = (self.table_offset, self.table_clusters)
        base = region * self.entries
        self.table.extend([0] * (t * per_cluster - len(self.table)))
        for j in range(nb):
            self.blocks[region + j] = RefcountBlock.empty(cs, self.bits)
            self.table[region + j] = (base + j) << self.cluster_bits
            self._new_blocks.add(region + j)
        for c in range(nb + t):
            self.blocks[region + c // self.entries].set(c % self.entries, 1)
        self.table_offset = (base + nb) << self.cluster_bits
        self.table_clusters = t
        self._table_dirty = (0, len(self.table))
        self._moved = (self.table_offset, t)
        if self._old_table is None and old[0]:
            self._old_table = old

    # ------------------------------------------------------------ writing

    def take_writes(self) -> RefcountWrites:
        """:return: the pending writes, in order; marks everything clean.

        After a table move the old table's clusters are freed here (their
        refcount change is part of the *next* :meth:`take_writes`: the driver
        writes the header switch first)."""
        w = RefcountWrites()
        cb = self.cluster_bits
        for bi in sorted(self.blocks):
            block = self.blocks[bi]
            off = self.table[bi]
            if bi in self._new_blocks:
                w.blocks.append((off, bytes(block.data)))
                block.clean()
                continue
            span = block.dirty_span()
            if span is not None:
                w.blocks.append((off + span[0], bytes(block.data[span[0]:span[1]])))
                block.clean()
        self._new_blocks.clear()
        if self._table_dirty is not None:
            lo, hi = self._table_dirty
            blo, bhi = (lo * 8) & ~511, min(len(self.table) * 8, (hi * 8 + 511) & ~511)
            entries = self.table[blo // 8:bhi // 8]
            data = b"".join(e.to_bytes(8, "big") for e in entries)
            w.table.append((self.table_offset + blo, data))
            self._table_dirty = None
        w.new_table, self._moved = self._moved, None
        if w.new_table is not None and self._old_table is not None:
            off, n = self._old_table
            self._old_table = None
            self.free(off >> cb, n)
        return w

    def pending(self) -> bool:
        """:return: True if :meth:`take_writes` has something to write."""
        return bool(self._new_blocks or self._table_dirty or self._moved or
                    any(b.dirty_span() for b in self.blocks.values()))
