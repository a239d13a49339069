"""qemu-io write throughput through qmpd's block layer, in-process (no socket).

Writes SIZE bytes (default 1 GiB) in CHUNK (1 MiB) qemu-io ``write`` commands
to a fresh sparse raw image, driven through the Python API
(``BlockGraph.add`` + ``run_qemu_io``, i.e. the same parser and request path
as HMP ``qemu-io``, minus the QMP socket), with 0 and with 4 enabled dirty
bitmaps, and compares with a plain ``os.pwrite`` loop and ``dd`` on the same
file system as ceilings.  Every variant ends with fdatasync, so figures are
close to what the disk (or page cache) sustains.

    .venv/bin/python bench/io.py [--size-mib 1024] [--reps 3] [--dir DIR]

:func:`qemu_io_write_throughput` is the reusable measurement (the lead's
QMP-level and QEMU side-by-side variants call it or mirror it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpd.block import BlockGraph, run_qemu_io  # noqa: E402

MIB = 1 << 20


#: When True, images are fully written once (untimed) and then overwritten,
#: which takes page allocation out of the figures (set by --overwrite).
OVERWRITE = False


def _fresh(path: str, size: int) -> None:
    if OVERWRITE and os.path.exists(path) and os.path.getsize(path) == size:
        return
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)
        if OVERWRITE:
            for off in range(0, size, MIB):
                f.write(b"\x01" * MIB)


async def qemu_io_write_throughput(
    path: str,
    size: int = 1 << 30,
    chunk: int = MIB,
    bitmaps: int = 0,
    pattern: int = 0xCD,
    sync: bool = True,
) -> float:
    """Write ``size`` bytes to a fresh raw image at ``path`` with one qemu-io
    ``write -P pattern off chunk`` per chunk, then ``flush``.

    :param bitmaps: number of enabled 64 KiB dirty bitmaps on the raw node.
    :param sync: end with qemu-io ``flush`` (fdatasync) inside the timing.
    :return: bytes per second (timing covers the writes and the flush).
    """
    _fresh(path, size)
    graph = BlockGraph()
    node = await graph.add(
        {"driver": "raw", "node-name": "drive0", "file": {"driver": "file", "filename": path}}
    )
    for i in range(bitmaps):
        node.bitmaps.add(f"bitmap{i}")
    cmds = [f"write -q -P {pattern} {off} {chunk}" for off in range(0, size, chunk)]
    start = time.perf_counter()
    for cmd in cmds:
        out = await run_qemu_io(node, cmd)
        if out:
            raise RuntimeError(out)
    if sync:
        await run_qemu_io(node, "flush")
    elapsed = time.perf_counter() - start
    if bitmaps:
        assert all(bm.count == size for bm in node.bitmaps)
    await graph.close()
    return size / elapsed


def pwrite_throughput(path: str, size: int = 1 << 30, chunk: int = MIB, sync: bool = True) -> float:
    """Ceiling: a synchronous ``os.pwrite`` loop (plus fdatasync); bytes/s."""
    _fresh(path, size)
    buf = b"\xcd" * chunk
    fd = os.open(path, os.O_RDWR)
    try:
        start = time.perf_counter()
        for off in range(0, size, chunk):
            os.pwrite(fd, buf, off)
        if sync:
            os.fdatasync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return size / elapsed


def dd_throughput(
    path: str, size: int = 1 << 30, chunk: int = MIB, sync: bool = True
) -> float | None:
    """Ceiling: ``dd if=/dev/zero bs=chunk conv=notrunc[,fdatasync]``; bytes/s."""
    if shutil.which("dd") is None:
        return None
    _fresh(path, size)
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", f"bs={chunk}", f"count={size // chunk}",
         "conv=notrunc,fdatasync" if sync else "conv=notrunc", "status=none"],
        check=True,
    )
    return size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="directory for the image (default: a temp dir)")
    ap.add_argument("--no-sync", dest="sync", action="store_false",
                    help="no fdatasync: measures qmpd's CPU path (use with a tmpfs --dir)")
    ap.add_argument("--overwrite", action="store_true",
                    help="overwrite a fully allocated image instead of filling a sparse one")
    args = ap.parse_args()
    global OVERWRITE
    OVERWRITE = args.overwrite
    size = args.size_mib * MIB
    results: dict[str, list[float]] = {"dd": [], "pwrite": [], "qemu-io": [], "qemu-io+4bm": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "bench.img")
        for _ in range(args.reps):  # interleaved, so drift hits all variants
            dd = dd_throughput(path, size, sync=args.sync)
            if dd is not None:
                results["dd"].append(dd)
            results["pwrite"].append(pwrite_throughput(path, size, sync=args.sync))
            results["qemu-io"].append(
                asyncio.run(qemu_io_write_throughput(path, size, sync=args.sync))
            )
            results["qemu-io+4bm"].append(
                asyncio.run(qemu_io_write_throughput(path, size, bitmaps=4, sync=args.sync))
            )
    med = {k: statistics.median(v) for k, v in results.items() if v}
    where = ("fdatasync at end" if args.sync else "no sync") + (
        ", overwriting allocated data" if args.overwrite else ", sparse image")
    print(f"qemu-io write throughput, {args.size_mib} MiB in 1 MiB writes, {where}, "
          f"median of {args.reps} (MB/s = 10^6 B/s):")
    for name, value in med.items():
        spread = ", ".join(f"{v / 1e6:.0f}" for v in results[name])
        print(f"  {name:12s} {value / 1e6:8.0f} MB/s   (runs: {spread})")
    ceiling = max(med.get("dd", 0.0), med["pwrite"])
    print(f"  qemu-io / best ceiling       {med['qemu-io'] / ceiling:6.3f}")
    print(f"  qemu-io+4bm / best ceiling   {med['qemu-io+4bm'] / ceiling:6.3f}")
    slowdown = 1 - med["qemu-io+4bm"] / med["qemu-io"]
    print(f"  slowdown with 4 bitmaps      {slowdown * 100:6.2f} %  (target < 5 %)")


if __name__ == "__main__":
    main()
