#!/usr/bin/env python3
"""Cost of crash-consistent persistent bitmaps on raw images (``--state-dir``).

Three figures, printed by ``bench/io.py`` after its own (or alone here):

1. 1 MiB ``qemu-io`` writes over QMP (HMP), one persistent bitmap against
   one non-persistent bitmap, same qmpd with ``--state-dir`` (target >= 0.9x).
2. 4 KiB random writes from 8 concurrent writers through the block layer
   (in-process ``BlockNode.write``, as NBD clients or guest devices issue
   them; QMP runs one command at a time, so over HMP they would not
   overlap), persistent against non-persistent (target >= 0.5x: group commit).
   Only the first write to each MiB after a reset waits for a sync (shared
   by every writer waiting then); the figure printed says how many there were.
3. State-directory size on disk (st_blocks) of a 1 TiB sparse image's
   bitmap (64 KiB granularity) against the bitmap's own size (target <= 1.1x).

    .venv/bin/python bench/persist.py [--size-mib 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ROOT, hmp_write_rate, preallocated_image, qmpd_server  # noqa: E402

from qmpd.block import BlockGraph  # noqa: E402
from qmpd.block.persist import BitmapStateDir  # noqa: E402

MIB = 1 << 20


def qmp_writes(sock: str, image: str, size: int, persistent: bool) -> float:
    """:return: MB/s of 1 MiB qemu-io writes over QMP with one bitmap."""
    return hmp_write_rate(sock, image, size, [persistent])


async def _random_writes(tmp: str, image: str, size: int, persistent: bool, count: int) -> tuple[float, int]:
    state = BitmapStateDir(os.path.join(tmp, "state-rnd"))
    graph = BlockGraph(bitmap_state=state)
    node = await graph.add({"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": image}})
    node.bitmaps.add("b0", persistent=persistent)
    await graph.sync_bitmaps([node])
    rng = random.Random(1)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    buf = b"\xcd" * 4096

    async def writer(mine: list[int]) -> None:
        for off in mine:
            await node.write(off, buf)

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(offsets[i::8]) for i in range(8)))
    await node.flush()
    elapsed = time.perf_counter() - t0
    journal = state.journal_of(node)
    syncs = journal.intent_syncs if journal is not None else 0
    await graph.close()
    return count / elapsed, syncs


def state_dir_ratio(tmp: str) -> tuple[int, int]:
    """:return: (bytes the state directory uses on disk, bitmap bytes) for a
    1 TiB sparse image with one 64 KiB-granularity persistent bitmap."""
    image = os.path.join(tmp, "big.img")
    with open(image, "wb") as f:
        f.truncate(1 << 40)
    state_path = os.path.join(tmp, "state-size")

    async def run() -> None:
        graph = BlockGraph(bitmap_state=BitmapStateDir(state_path))
        node = await graph.add({"driver": "raw", "node-name": "d0",
                                "file": {"driver": "file", "filename": image}})
        node.bitmaps.add("b0", granularity=65536, persistent=True)
        await graph.sync_bitmaps([node])
        for off in range(0, 1 << 40, 1 << 34):
            await node.write(off, b"x" * 4096)
        await graph.close()

    asyncio.run(run())
    used = sum(os.stat(os.path.join(state_path, n)).st_blocks * 512 for n in os.listdir(state_path))
    return used, (1 << 40) // 65536 // 8


def run_all(size_mib: int, reps: int, bench_dir: str) -> None:
    """Measure and print the three figures."""
    size = size_mib * MIB
    os.makedirs(bench_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persist-", dir=bench_dir) as tmp:
        image = preallocated_image(tmp, size)
        sock_tmp = tempfile.mkdtemp(prefix="pb-")
        srv = qmpd_server(sock_tmp, 1, "--state-dir", os.path.join(tmp, "state"))
        try:
            seq: dict[bool, float] = {}
            for persistent in (False, True, False, True):  # interleaved against drift
                runs = [qmp_writes(srv.sockets[0], image, size, persistent) for _ in range(reps)]
                seq[persistent] = max(seq.get(persistent, 0.0), statistics.median(runs))
        finally:
            srv.stop()
        count = 20000  # about 80 per write-intent bit of a 256 MiB image
        rnd = {p: asyncio.run(_random_writes(tmp, image, size, p, count)) for p in (False, True)}
        used, bits = state_dir_ratio(tmp)
    print(f"persistent bitmaps (--state-dir), {size_mib} MiB image, median of {reps}")
    print(f"  1 MiB qemu-io writes over QMP: non-persistent {seq[False]:,.0f} MB/s, "
          f"persistent {seq[True]:,.0f} MB/s: {seq[True] / seq[False]:.2f}x (target >= 0.9x)")
    print(f"  4 KiB random writes, 8 concurrent writers: non-persistent {rnd[False][0]:,.0f} IOPS, "
          f"persistent {rnd[True][0]:,.0f} IOPS ({rnd[True][1]} intent syncs for {count} writes): "
          f"{rnd[True][0] / rnd[False][0]:.2f}x (target >= 0.5x)")
    print(f"  state directory for a 1 TiB image, 64 KiB granularity: {used:,} bytes on disk for a "
          f"{bits:,}-byte bitmap: {used / bits:.3f}x (target <= 1.1x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / ".bench-tmp"))
    args = ap.parse_args()
    run_all(args.size_mib, args.reps, args.dir)


if __name__ == "__main__":
    main()
