"""Write-ahead dirtying of persistent raw bitmaps, in-process
(qmpd.block.persist): group commit, clear without sync, lazy stores."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from qmpd.bitmap.journal import decode_intent, decode_snapshot
from qmpd.block import BlockGraph, BlockNode
from qmpd.block.persist import BitmapStateDir

MIB = 1 << 20
SIZE = 16 * MIB


async def _graph(tmp_path: Path, interval: float = 3600.0) -> tuple[BlockGraph, BlockNode, BitmapStateDir]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    state = BitmapStateDir(str(tmp_path / "state"), flush_interval=interval)
    graph = BlockGraph(bitmap_state=state)
    node = await graph.add({"driver": "raw", "node-name": "d0",
                            "file": {"driver": "file", "filename": str(img)}})
    return graph, node, state


@pytest.mark.asyncio
async def test_concurrent_writes_share_one_sync(tmp_path: Path) -> None:
    graph, node, state = await _graph(tmp_path)
    journal = state.journal_of(node)
    assert journal is not None and not journal.active and not node.has_hooks
    await node.write(0, b"a" * 4096)  # no persistent bitmap: no sync at all
    assert journal.intent_syncs == 0
    node.bitmaps.add("b0", persistent=True)
    await graph.sync_bitmaps([node])
    assert journal.active and node.has_hooks
    bits = list(range(3, 16, 2))  # not sequential: no bits ahead
    await asyncio.gather(*(node.write(i * MIB + 512, b"x" * 4096) for i in bits))
    # The first write's sync runs alone; the six that queued behind it share one.
    assert journal.intent_syncs == 2
    assert list(journal.intent.durable.search(1)) == bits
    raw = (tmp_path / "state" / os.path.basename(journal.intent_path)).read_bytes()
    assert list(decode_intent(raw)[2].search(1)) == bits
    await asyncio.gather(*(node.write(i * MIB, b"y" * 512) for i in bits))
    assert journal.intent_syncs == 2  # already durable: no sync
    await graph.close()


@pytest.mark.asyncio
async def test_clear_needs_no_sync_and_lazy_store_resets(tmp_path: Path) -> None:
    graph, node, state = await _graph(tmp_path)
    journal = state.journal_of(node)
    assert journal is not None
    bm = node.bitmaps.add("b0", persistent=True)
    await graph.sync_bitmaps([node])
    seq = journal.sequence
    syncs = journal.intent_syncs
    bm.clear()  # block-dirty-bitmap-clear: nothing durable to do
    assert (journal.sequence, journal.intent_syncs) == (seq, syncs)
    await node.write(3 * MIB, b"z" * 4096)
    assert journal.intent.durable[3]
    assert journal.flush_scheduled  # a lazy store is due
    await journal.store()  # what it runs
    snap = decode_snapshot((tmp_path / "state" / os.path.basename(journal.snap_path)).read_bytes())
    assert not snap.clean and snap.records[0].to_hbitmap().get(3 * MIB)
    assert not journal.intent.durable.any()  # the snapshot covers bit 3 now
    await graph.close()
    snap = decode_snapshot((tmp_path / "state" / os.path.basename(journal.snap_path)).read_bytes())
    assert snap.clean and snap.identity.size == SIZE
