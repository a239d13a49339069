"""Write-ahead dirtying of persistent raw bitmaps, in-process
(qmpd.block.persist): group commit, clear without sync, lazy stores."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from qmpd.bitmap.journal import LEASE_OFFSET, Lease, decode_intent, decode_lease, decode_snapshot, encode_lease
from qmpd.block import BlockGraph, BlockNode
from qmpd.block.persist import BitmapStateDir, NodeJournal

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


def _lease_on_disk(journal: NodeJournal) -> Lease | None:
    return decode_lease(Path(journal.intent_path).read_bytes())


@pytest.mark.asyncio
async def test_write_lease_renewed_without_sync_and_released_by_a_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph, node, state = await _graph(tmp_path)
    journal = state.journal_of(node)
    assert journal is not None
    node.bitmaps.add("b0", persistent=True)
    await graph.sync_bitmaps([node])
    # Nothing in flight at the store: released, with the image as it is.
    lease = _lease_on_disk(journal)
    st = os.stat(tmp_path / "disk.img")
    assert lease is not None and not lease.held and lease.image is not None
    assert (lease.image.mtime_ns, lease.image.ctime_ns, lease.image.size) == (
        st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    # The first write takes a lease before it reaches the image.
    before = time.time_ns()
    await node.write(2 * MIB, b"w" * 4096)
    lease = _lease_on_disk(journal)
    assert lease is not None and lease.held and lease.until >= before + int(state.write_lease * 1e9)
    assert os.stat(tmp_path / "disk.img").st_mtime_ns <= lease.until
    # A renewal is a plain pwrite: the write does not wait for its
    # fdatasync (which follows in the background; held up here).
    gate = threading.Event()
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (gate.wait(30), real(fd))[1])
    journal.lease.current = Lease(True, time.time_ns())  # as if it were about to expire
    now = time.time_ns()
    await asyncio.wait_for(node.write(2 * MIB + 8192, b"v" * 4096), 20)  # coarse bit already durable
    lease = _lease_on_disk(journal)
    assert lease is not None and lease.held and lease.until >= now + int(state.write_lease * 1e9)
    gate.set()
    await graph.close()


async def _crash_and_reopen(tmp_path: Path, foreign: bool, lease: Lease | None = None) -> BlockNode:
    """Writes with a persistent bitmap, a lazy store, a crash (the graph is
    dropped, nothing stored), optionally a write by someone else, a new
    daemon: :return: its node d0."""
    graph, node, state = await _graph(tmp_path)
    journal = state.journal_of(node)
    assert journal is not None
    node.bitmaps.add("b0", persistent=True)
    await graph.sync_bitmaps([node])
    await node.write(5 * MIB, b"q" * 4096)
    await journal.store()  # the lazy store: nothing in flight, lease released
    if lease is not None:  # a crash while the lease was this
        with open(journal.intent_path, "r+b") as f:
            f.seek(LEASE_OFFSET)
            f.write(encode_lease(lease))
    journal.drop()
    if foreign:
        fd = os.open(tmp_path / "disk.img", os.O_WRONLY)
        os.pwrite(fd, b"someone else", 9 * MIB)
        os.close(fd)
    graph2 = BlockGraph(bitmap_state=BitmapStateDir(str(tmp_path / "state"), flush_interval=3600.0))
    return await graph2.add({"driver": "raw", "node-name": "d0",
                             "file": {"driver": "file", "filename": str(tmp_path / "disk.img")}})


@pytest.mark.asyncio
async def test_crash_without_foreign_write_recovers(tmp_path: Path) -> None:
    node = await _crash_and_reopen(tmp_path, foreign=False)
    [bm] = node.bitmaps
    assert not bm.inconsistent and bm.hbitmap.get(5 * MIB)


@pytest.mark.asyncio
async def test_write_after_release_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = await _crash_and_reopen(tmp_path, foreign=True)
    [bm] = node.bitmaps
    assert bm.inconsistent
    assert (f"persistent bitmaps of {tmp_path / 'disk.img'} (b0) marked inconsistent: the image was "
            "modified after qmpd stopped writing it") in caplog.text


@pytest.mark.asyncio
async def test_write_after_an_expired_held_lease_is_detected(tmp_path: Path) -> None:
    node = await _crash_and_reopen(tmp_path, foreign=True, lease=Lease(True, time.time_ns() - 10**9))
    [bm] = node.bitmaps
    assert bm.inconsistent


@pytest.mark.asyncio
async def test_write_inside_a_held_lease_is_not_seen(tmp_path: Path) -> None:
    """The documented window: a crash while qmpd was writing leaves a lease
    reaching ahead; a foreign write stamped inside it looks like qmpd's."""
    node = await _crash_and_reopen(tmp_path, foreign=True, lease=Lease(True, time.time_ns() + 60 * 10**9))
    [bm] = node.bitmaps
    assert not bm.inconsistent and not bm.hbitmap.get(9 * MIB)
