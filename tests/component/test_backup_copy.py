"""The copy algorithm (spec 4.3, 4.4) and copy-before-write (4.6, 4.10)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

import qmpd.block.copy as copy_mod
from qmpd.block import BlockIOError, BlockNode
from qmpd.jobs import ManualClock
from qmpd.commands.views import bitmap_infos
from tests.component.backup_env import CLUSTER, MiB, BackupEnv, rand, read

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SIZE = 4 * MiB
#: data at cluster 0, in the second half of cluster 15, and 2 MiB..2.5 MiB
LAYOUT = {0: b"\x01" * CLUSTER, 0xF8000: b"\x02" * 0x8000, 2 * MiB: b"\x03" * (MiB // 2)}


def record_reads(node: BlockNode) -> list[tuple[int, int]]:
    """Record the reads ``node``'s driver forwards (the slow path)."""
    calls: list[tuple[int, int]] = []
    orig = node.driver.pread

    async def pread(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return await orig(offset, length)

    node.driver.pread = pread  # type: ignore[method-assign]
    return calls


def record_zeroes(node: BlockNode) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    orig = node.driver.pwrite_zeroes

    async def pwrite_zeroes(offset: int, length: int, may_unmap: bool) -> None:
        calls.append((offset, length))
        await orig(offset, length, may_unmap)

    node.driver.pwrite_zeroes = pwrite_zeroes  # type: ignore[method-assign]
    return calls


async def run_full(env: BackupEnv, **kw: Any) -> tuple[str, dict[str, Any]]:
    await env.backup(device="drive0", target="t", sync="full", job_id="j", **kw)
    await env.wait_status("j", "null")
    done = env.finished("j")
    assert done is not None
    return done


ZEROES = [(0x10000, 0xE0000), (0x100000, MiB), (0x280000, MiB), (0x380000, 0x80000)]


async def test_chunks_split_at_data_and_holes(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    src = await env.node("drive0", SIZE, LAYOUT, blkdebug={})  # blkdebug: no fast path
    tgt = await env.node("t", SIZE)
    reads, zeroes = record_reads(src), record_zeroes(tgt)
    event = await run_full(env, x_perf={"max_workers": 1})
    assert reads == [(0, CLUSTER), (0xF0000, CLUSTER), (2 * MiB, MiB // 2)]
    assert zeroes == ZEROES
    assert event == ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "j", "len": SIZE, "offset": SIZE,
                                             "speed": 0})
    assert read(tmp_path / "t.img") == read(tmp_path / "drive0.img")


async def test_fast_path_same_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = BackupEnv(tmp_path)
    await env.node("drive0", SIZE, LAYOUT)
    tgt = await env.node("t", SIZE)
    tgt.bitmaps.add("tb", CLUSTER)
    copies: list[tuple[int, int]] = []
    orig = copy_mod.copy_range

    async def spy(src: Any, so: int, dst: Any, do: int, n: int) -> None:
        copies.append((so, n))
        await orig(src, so, dst, do, n)

    monkeypatch.setattr(copy_mod, "copy_range", spy)
    zeroes = record_zeroes(tgt)
    await run_full(env)
    assert sorted(copies) == [(0, CLUSTER), (0xF0000, CLUSTER), (2 * MiB, MiB // 2)]
    assert zeroes == []  # the target file is sparse there already
    env2 = BackupEnv(tmp_path / "b")
    (tmp_path / "b").mkdir()
    await env2.node("drive0", SIZE, LAYOUT)
    tgt2 = await env2.node("t", SIZE, {0: b"\xff" * SIZE})  # no holes in this target
    job_ranges = record_zeroes(tgt2)
    await run_full(env2)
    # contiguous hole chunks are dispatched together on the fast path
    assert sorted(job_ranges) == [(0x10000, 0xE0000), (0x100000, MiB), (0x280000, 0x180000)]
    assert read(tmp_path / "b" / "t.img") == read(tmp_path / "b" / "drive0.img")
    assert read(tmp_path / "t.img") == read(tmp_path / "drive0.img")
    assert tgt.bitmaps.lookup("tb").count == SIZE  # target writes dirty its bitmaps


async def test_strict_order_and_max_chunk(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    src = await env.node("drive0", SIZE, {0: rand(SIZE)}, blkdebug={})
    await env.node("t", SIZE)
    reads = record_reads(src)
    await run_full(env, x_perf={"max_workers": 1, "max_chunk": 3 * CLUSTER})
    step = 3 * CLUSTER
    assert reads == [(o, min(step, SIZE - o)) for o in range(0, SIZE, step)]
    assert read(tmp_path / "t.img") == read(tmp_path / "drive0.img")


async def test_len_rounds_up_to_clusters(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    await env.node("drive0", 1_000_000, {0: rand(1_000_000)})
    await env.node("t", 1_000_000)
    _, data = await run_full(env)
    assert (data["len"], data["offset"]) == (1_048_576, 1_048_576)
    assert read(tmp_path / "t.img")[:1_000_000] == read(tmp_path / "drive0.img")[:1_000_000]


async def test_bitmap_len_and_holes(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    src = await env.node("drive0", 64 * MiB)
    await env.node("t", 64 * MiB)
    bm = src.bitmaps.add("b", CLUSTER)
    for bit in (0, 15, 16, 512, 513, 1022):
        bm.hbitmap.set(bit * CLUSTER, 1)
    await env.backup(device="drive0", target="t", sync="bitmap", bitmap="b", bitmap_mode="on-success",
                     job_id="j", auto_finalize=False)
    job = env.jobs.find_job("j")
    await env.wait_status("j", "pending")
    assert (job.progress.total, job.progress.current) == (393216, 393216)
    infos = {n.node_name: bitmap_infos(n.bitmaps) for n in env.graph if n.bitmaps}
    filt = next(n for n in env.graph if n.drv == "copy-before-write")
    # QEMU 7.2 .. 9.0 layout (spec 4.10): access + done on the filter,
    # copy bitmap (newest), successor, bitmap0 on the source.
    assert [b["count"] for b in infos[filt.node_name]] == [64 * MiB, 0]
    assert [(b.get("name"), b["count"], b["recording"], b["busy"]) for b in infos["drive0"]] == [
        (None, 0, False, False), (None, 0, True, False), ("b", 393216, True, True)]
    await env.jobs.finalize(job)
    assert [(b.name, b.count) for b in src.bitmaps] == [("b", 0)]
    assert filt.node_name not in env.graph


async def _throttled_or_done(env: BackupEnv, clock: ManualClock, job_id: str) -> None:
    """Wait until a timer is pending on ``clock`` or ``job_id`` reached null."""
    waits = [asyncio.ensure_future(clock.wait_timer()),
             asyncio.ensure_future(env.events.wait(lambda: "null" in env.events.statuses(job_id)))]
    try:
        await asyncio.wait_for(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), 30)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def test_point_in_time_under_random_writes(tmp_path: Path) -> None:
    clock = ManualClock()
    env = BackupEnv(tmp_path, clock)
    size = 8 * MiB
    src = await env.node("drive0", size, {0: rand(size, 1)}, discard="unmap")
    await env.node("t", size)
    snapshot = read(tmp_path / "drive0.img")
    await env.backup(device="drive0", target="t", sync="full", job_id="j", speed=MiB,
                     filter_node_name="fl")
    filt = env.graph.lookup("fl")
    rng = random.Random(7)
    job = env.jobs.find_job("j")
    while job.status.value not in ("null",):
        for _ in range(3):
            if "fl" not in env.graph:
                break  # the job ended; the filter is gone
            node = filt if rng.random() < 0.5 else src
            off = rng.randrange(size - 1)
            n = min(rng.randrange(1, 300_000), size - off)
            kind = rng.random()
            if kind < 0.7:
                await node.write(off, bytes([rng.randrange(256)]) * n)
            elif kind < 0.85:
                await node.write_zeroes(off, n)
            else:
                await node.discard(off, n)
        # let the job copy until it sleeps in its rate limiter (or ends)
        await _throttled_or_done(env, clock, "j")
        clock.advance_to_next()
    assert read(tmp_path / "t.img") == snapshot
    _, data = env.finished("j")  # type: ignore[misc]
    assert data["offset"] == data["len"] == size
    assert not src.has_hooks and "fl" not in env.graph


async def test_fleecing_sync_none(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    old = rand(SIZE, 3)
    src = await env.node("drive0", SIZE, {0: old})
    await env.node("t", SIZE)
    await env.backup(device="drive0", target="t", sync="none", job_id="j", filter_node_name="fl")
    filt = env.graph.lookup("fl")
    await filt.write(CLUSTER + 5, b"x" * 10)             # cluster 1 via the filter
    await src.write(3 * MiB, b"y" * (CLUSTER + 1))        # clusters 48, 49 via the source
    await src.write(3 * MiB, b"z" * 10)                   # already copied: not again
    target = read(tmp_path / "t.img")
    for c in range(SIZE // CLUSTER):
        chunk = target[c * CLUSTER:(c + 1) * CLUSTER]
        assert chunk == (old[c * CLUSTER:(c + 1) * CLUSTER] if c in (1, 48, 49) else bytes(CLUSTER)), c
    job = env.jobs.find_job("j")
    assert (job.progress.current, job.progress.total) == (3 * CLUSTER, SIZE)
    done = [b["count"] for b in bitmap_infos(filt.bitmaps)]
    assert done == [SIZE, 3 * CLUSTER]  # access, done
    await env.jobs.cancel(job, force=True)
    await env.wait_status("j", "null")
    assert env.finished("j") == ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE,
                                                          "offset": 3 * CLUSTER, "speed": 0})


async def test_cbw_failure_fails_guest_write(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    old = rand(SIZE, 4)
    src = await env.node("drive0", SIZE, {0: old})
    await env.node("t", SIZE, blkdebug={"inject-error": [{"event": "write_aio", "errno": 5}]})
    await env.backup(device="drive0", target="t", sync="none", job_id="j", filter_node_name="fl")
    for node in (env.graph.lookup("fl"), src):
        with pytest.raises(BlockIOError) as err:
            await node.write(10, b"new")
        assert err.value.errno == 5
    assert read(tmp_path / "drive0.img") == old
    assert env.named("BLOCK_JOB_ERROR") == []
    job = env.jobs.find_job("j")
    assert job.status.value == "running" and job.progress.current == 0
    await env.jobs.cancel(job, force=True)
    await env.wait_status("j", "null")
