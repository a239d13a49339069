"""Block-copy's mapped path (qmpd/block/copy.py): qcow2 ends copied file
to file through their L2 tables, with the target's clusters allocated per
group and committed after the data.  What the node path would have
written, ``qemu-img compare`` equal and ``qemu-img check`` clean; ranges
the source does not hold as plain data clusters go the node path."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import qmpd.block.copy as copy_mod
from qmpd.bitmap import DirtyBitmap
from qmpd.block import BlockGraph, BlockNode
from qmpd.block.copy import BlockCopy
from qmpd.jobs import ManualClock
from tests.component.backup_env import BackupEnv

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20
K64 = 65536
#: Not a whole number of clusters: the last chunk is a partial cluster.
SIZE = 8 * MiB + 4096


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = sh(*argv, str(path))
    assert r.returncode == 0, r.stderr


def create(path: Path, size: int, *opts: str) -> None:
    r = sh("qemu-img", "create", "-f", "qcow2", *opts, str(path), str(size))
    assert r.returncode == 0, r.stderr


def check_clean(path: Path) -> None:
    r = sh("qemu-img", "check", str(path))
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


def compare(a: Path, b: Path, *fmts: str) -> None:
    r = sh("qemu-img", "compare", *fmts, str(a), str(b))
    assert r.returncode == 0 and "Images are identical." in r.stdout, r.stdout + r.stderr


def node_opts(path: Path, name: str, fmt: str = "qcow2") -> dict[str, Any]:
    return {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": str(path)}}


def source_image(tmp: Path) -> Path:
    """Data clusters, a zero cluster, a compressed cluster, clusters from
    the backing file and unallocated ones, and data in the partial last
    cluster."""
    base = tmp / "base.qcow2"
    create(base, SIZE)
    qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 8M 4096")
    src = tmp / "src.qcow2"
    create(src, SIZE, "-b", str(base), "-F", "qcow2")
    qemu_io(src, "write -P 0x21 0 3M", "write -z 1M 64k", "write -c -P 0x22 3M 64k",
            "write -P 0x23 5M 1M", "write -P 0x24 8M 4096")
    return src


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count copy_pairs calls (the mapped path); :func:`count_reads` counts
    the node path's."""
    calls = {"pairs": 0, "slow": 0}
    orig_pairs = copy_mod.copy_pairs

    async def pairs(*a: Any) -> None:
        calls["pairs"] += 1
        await orig_pairs(*a)

    monkeypatch.setattr(copy_mod, "copy_pairs", pairs)
    return calls


def count_reads(node: BlockNode, calls: dict[str, int]) -> None:
    """Count the reads the node path makes of ``node`` (``calls["slow"]``)."""
    orig = node.driver.pread

    async def pread(offset: int, length: int) -> bytes:
        calls["slow"] += 1
        return await orig(offset, length)

    node.driver.pread = pread  # type: ignore[method-assign]


async def run_copy(src: BlockNode, dst: BlockNode, bits: list[tuple[int, int]] | None = None,
                   **kw: Any) -> BlockCopy:
    bm = DirtyBitmap(src.length, K64)
    if bits is None:
        bm.hbitmap.fill()
    for off, n in bits or ():
        bm.hbitmap.set(off, n)
    copy = BlockCopy(src, dst, bm, cluster_size=K64)
    assert await copy.run(**kw) is None
    return copy


async def close(g: BlockGraph, *names: str) -> None:
    for name in names:
        await g.delete(name)


@pytest.mark.parametrize("batch", [True, False])
async def test_qcow2_to_qcow2_full_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        batch: bool) -> None:
    src_path, tgt = source_image(tmp_path), tmp_path / "tgt.qcow2"
    create(tgt, SIZE)
    calls = count_calls(monkeypatch)
    g = BlockGraph()
    src = await g.add(node_opts(src_path, "src"))
    dst = await g.add(node_opts(tgt, "dst"))
    count_reads(src, calls)
    copy = BlockCopy(src, dst, DirtyBitmap(src.length, K64), cluster_size=K64)
    assert copy.mapped_path and not copy.fast_path
    await run_copy(src, dst, batch=batch)
    await close(g, "dst", "src")
    compare(src_path, tgt)
    check_clean(tgt)
    assert calls["pairs"] > 0
    # only the compressed cluster and the backing file's part go the node
    # path (one group each when batched)
    assert calls["slow"] >= 2


async def test_mixed_ends_raw_and_qcow2(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(4 * MiB)
    raw = tmp_path / "a.raw"
    raw.write_bytes(data)
    mid, out = tmp_path / "mid.qcow2", tmp_path / "out.raw"
    create(mid, len(data))
    with open(out, "wb") as f:
        f.truncate(len(data))
    g = BlockGraph()
    a = await g.add(node_opts(raw, "a", "raw"))
    m = await g.add(node_opts(mid, "m"))
    o = await g.add(node_opts(out, "o", "raw"))
    assert (await run_copy(a, m, batch=True)).mapped_path      # raw -> qcow2
    assert (await run_copy(m, o, batch=True)).mapped_path      # qcow2 -> raw
    await close(g, "o", "m", "a")
    assert out.read_bytes() == data
    compare(raw, mid, "-f", "raw", "-F", "qcow2")
    check_clean(mid)


async def test_scattered_clusters_land_in_one_host_run(tmp_path: Path) -> None:
    """An incremental pattern: every dirty cluster of the group is
    allocated at once, so the target's clusters are one host run."""
    src_path, tgt = tmp_path / "s.qcow2", tmp_path / "t.qcow2"
    create(src_path, 64 * MiB)
    qemu_io(src_path, "write -P 0x5a 0 64M")
    create(tgt, 64 * MiB)
    rng = random.Random(5)
    dirty = sorted(rng.sample(range(64 * MiB // K64), 40))
    g = BlockGraph()
    src = await g.add(node_opts(src_path, "src"))
    dst = await g.add(node_opts(tgt, "dst"))
    for c in dirty:
        await src.write(c * K64, bytes([c % 251]) * K64)
    await run_copy(src, dst, [(c * K64, K64) for c in dirty], batch=True)
    await close(g, "dst", "src")
    check_clean(tgt)
    extents = json.loads(sh("qemu-img", "map", "--output=json", str(tgt)).stdout)
    data = [e for e in extents if e["data"]]
    covered = [c for e in data for c in range(e["start"] // K64, (e["start"] + e["length"]) // K64)]
    assert covered == dirty
    for prev, e in zip(data, data[1:]):
        assert e["offset"] == prev["offset"] + prev["length"]
    for c in dirty:
        r = sh("qemu-io", "-f", "qcow2", "-c", f"read -P {c % 251} {c * K64} 64k", str(tgt))
        assert "Pattern verification failed" not in r.stdout and r.returncode == 0


async def test_rewrites_allocated_target_clusters_in_place(tmp_path: Path) -> None:
    """A second copy into the same target writes its clusters in place."""
    src_path, tgt = tmp_path / "s.qcow2", tmp_path / "t.qcow2"
    create(src_path, 4 * MiB)
    create(tgt, 4 * MiB)
    g = BlockGraph()
    src = await g.add(node_opts(src_path, "src"))
    dst = await g.add(node_opts(tgt, "dst"))
    await src.write(0, b"\x01" * 4 * MiB)
    await run_copy(src, dst, batch=True)
    await src.write(MiB, b"\x02" * MiB)
    await run_copy(src, dst, [(MiB, MiB)], batch=True)
    assert await dst.read(0, 4 * MiB) == b"\x01" * MiB + b"\x02" * MiB + b"\x01" * 2 * MiB
    await close(g, "dst", "src")
    check_clean(tgt)
    info = json.loads(sh("qemu-img", "check", "--output=json", str(tgt)).stdout)
    assert info["allocated-clusters"] == 64  # nothing allocated twice


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


async def test_point_in_time_qcow2_under_guest_writes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy-before-write with qcow2 source and target on the mapped path:
    the target is the disk as it was when the backup started."""
    calls = count_calls(monkeypatch)
    clock = ManualClock()
    env = BackupEnv(tmp_path, clock)
    size = 8 * MiB
    src_path, tgt = tmp_path / "s.qcow2", tmp_path / "t.qcow2"
    create(src_path, size)
    create(tgt, size)
    src = await env.graph.add({**node_opts(src_path, "drive0"), "discard": "unmap"})
    dst = await env.graph.add(node_opts(tgt, "t"))
    await src.write(0, random.Random(1).randbytes(size))
    snapshot = await src.read(0, size)
    await env.backup(device="drive0", target="t", sync="full", job_id="j", speed=MiB,
                     filter_node_name="fl")
    filt = env.graph.lookup("fl")
    rng = random.Random(7)
    job = env.jobs.find_job("j")
    while job.status.value != "null":
        for _ in range(3):
            if "fl" not in env.graph:
                break
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
        await _throttled_or_done(env, clock, "j")
        clock.advance_to_next()
    assert await dst.read(0, size) == snapshot
    _, data = env.finished("j")  # type: ignore[misc]
    assert data["offset"] == data["len"] == size
    assert calls["pairs"] > 0
    await close(env.graph, "t", "drive0")
    check_clean(tgt)
    check_clean(src_path)
