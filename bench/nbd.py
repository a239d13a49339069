#!/usr/bin/env python3
"""NBD export throughput and dirty-bitmap BLOCK_STATUS latency.

1. ``nbdcopy nbd+unix:///drive0?socket=... null:`` of a dense raw image
   (default 2 GiB, warm page cache) exported read-only by qmpd and by
   qemu-storage-daemon 7.2 with identical ``--blockdev``/``--nbd-server``/
   ``--export`` options, in the same run, their copies alternating.  The ceiling is ``nbdcopy`` of the
   file itself (no server).  Median of --reps runs.
2. BLOCK_STATUS of ``qemu:dirty-bitmap:b0`` over a 1 TiB ``null-co``
   export whose bitmap has 1 % of its 64 KiB clusters dirty, scattered at
   random: one request of 4 GiB - 64 KiB (the wire maximum) at offset 0, and
   a whole-disk scan in such requests, timed in a libnbd client (system
   python3 with python3-libnbd).  The bits are set through ``qemu-io``
   writes over QMP is far too slow for 167 772 clusters, so this part runs
   the daemon in-process and sets them on the bitmap directly.

    .venv/bin/python bench/nbd.py [--size-mib 2048] [--reps 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20
CLUSTER = 64 * 1024


def make_image(path: Path, size: int) -> None:
    block = random.Random(1).randbytes(4 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    with open(path, "rb") as f:          # warm the page cache
        while f.read(64 * MiB):
            pass


def start(argv: list[str], sock: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while subprocess.run(["nbdinfo", "--size", f"nbd+unix:///drive0?socket={sock}"],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[0]} did not start")
        time.sleep(0.05)
    return proc


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU of a process (all its threads) so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evict(path: Path) -> None:
    """Drop the image's pages from the page cache (--cold)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_copy(src: str, reps: int, pid: int | None = None,
               cold: Path | None = None) -> tuple[float, float]:
    """:return: median wall seconds and median server CPU seconds."""
    times, cpus = [], []
    for _ in range(reps):
        if cold is not None:
            evict(cold)
        c = cpu_seconds(pid)
        t = time.perf_counter()
        subprocess.run(["nbdcopy", src, "null:"], check=True)
        times.append(time.perf_counter() - t)
        cpus.append(cpu_seconds(pid) - c)
    return statistics.median(times), statistics.median(cpus)


def throughput(tmp: Path, size: int, reps: int, compare: str | None = None,
               cold: bool = False) -> None:
    img = tmp / "disk.img"
    make_image(img, size)
    evicted = img if cold else None
    common = ["--blockdev", f"driver=file,node-name=f0,filename={img}",
              "--blockdev", "driver=raw,node-name=drive0,file=f0"]
    ceiling, _ = timed_copy(str(img), reps, cold=evicted)
    gib = size / (1 << 30)
    print(f"nbdcopy of a {size // MiB} MiB dense export to null: (median of {reps}; "
          f"{'cold: image evicted from the page cache before each copy; ' if cold else ''}"
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"  ceiling (nbdcopy of the file) {ceiling:7.3f} s  {gib / ceiling:6.2f} GiB/s")
    servers = {"qmpd": [sys.executable, "-m", "qmpd", "--socket", str(tmp / "q.sock")]}
    envs: dict[str, dict[str, str] | None] = {"qmpd": None}
    if compare:   # the same daemon from another checkout (before/after)
        label = f"qmpd ({Path(compare).name})"
        servers[label] = [sys.executable, "-m", "qmpd", "--socket", str(tmp / "q2.sock")]
        envs[label] = {**os.environ, "PYTHONPATH": str(Path(compare).resolve())}
    if shutil.which("qemu-storage-daemon"):
        servers["qemu-storage-daemon"] = ["qemu-storage-daemon"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    times: dict[str, list[float]] = {name: [] for name in servers}
    cpus: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for name, argv in servers.items():
            sock = tmp / f"{_slug(name)}.nbd"
            procs[name] = start([*argv, *common, "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                 "--export", "nbd,id=e0,node-name=drive0"], sock, envs.get(name))
        # Copies alternate between the servers, so a change of the
        # machine's load hits both alike.
        for _ in range(reps):
            for name, proc in procs.items():
                t, cpu = timed_copy(f"nbd+unix:///drive0?socket={tmp / f'{_slug(name)}.nbd'}", 1, proc.pid,
                                    cold=evicted)
                times[name].append(t)
                cpus[name].append(cpu)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait()
    results = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in results.items():
        print(f"  {name:28s} {t:7.3f} s  {gib / t:6.2f} GiB/s  {ceiling / t:5.2f}x ceiling  "
              f"server CPU {statistics.median(cpus[name]):5.2f} s")
    if "qemu-storage-daemon" in results:
        print(f"  qmpd / qemu-storage-daemon throughput ratio: "
              f"{results['qemu-storage-daemon'] / results['qmpd']:.2f}x")


CLIENT = r"""
import nbd, sys, time, json
h = nbd.NBD(); h.set_export_name("big"); h.add_meta_context("qemu:dirty-bitmap:b0")
h.connect_unix(sys.argv[1])
size = h.get_size(); step = (1 << 32) - 65536
def run(off, n):
    got = []
    h.block_status(n, off, lambda m, o, e, err: got.extend(e) or 0)
    return got
t = time.perf_counter(); first = run(0, step); one = time.perf_counter() - t
t = time.perf_counter(); pos = 0; extents = 0; dirty = 0
while pos < size:
    got = run(pos, min(step, size - pos))
    for i in range(0, len(got), 2):
        if got[i + 1] & 1: dirty += got[i]
        pos += got[i]
    extents += len(got) // 2
scan = time.perf_counter() - t
print(json.dumps({"one": one, "one_extents": len(first) // 2, "scan": scan,
                  "extents": extents, "dirty": dirty}))
"""


async def block_status(tmp: Path) -> None:
    from qmpd.commands.context import DaemonConfig
    from qmpd.server.daemon import Daemon
    from qmpd.server.listeners import UnixListener

    daemon = Daemon(DaemonConfig(), [UnixListener(str(tmp / "bs.sock"))])
    daemon.setup()
    await daemon.start()
    graph = daemon.state.block
    assert graph is not None and daemon.nbd is not None
    size = 1 << 40
    node = await graph.add({"driver": "null-co", "node-name": "big", "size": size})
    bm = node.bitmaps.add("b0", CLUSTER, disabled=True)
    n_clusters = size // CLUSTER
    rng = random.Random(7)
    for c in rng.sample(range(n_clusters), n_clusters // 100):
        bm.hbitmap.set(c * CLUSTER, CLUSTER)
    await daemon.nbd.start({"type": "unix", "path": str(tmp / "bs.nbd")})
    daemon.nbd.add(id="big", node_name="big", bitmaps=("b0",))
    proc = await asyncio.create_subprocess_exec("/usr/bin/python3", "-c", CLIENT, str(tmp / "bs.nbd"),
                                                stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    r = json.loads(out)
    assert r["dirty"] == bm.count, (r, bm.count)
    print("BLOCK_STATUS qemu:dirty-bitmap:b0, 1 TiB export, 1 % of 64 KiB clusters dirty (scattered)")
    print(f"  one 4 GiB request: {r['one'] * 1000:7.1f} ms ({r['one_extents']} extents; target < 100 ms)")
    print(f"  whole-disk scan  : {r['scan'] * 1000:7.1f} ms ({r['extents']} extents, "
          f"{r['dirty'] // MiB} MiB dirty)")
    await daemon.request_shutdown("host-qmp-quit")
    await daemon.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--skip-copy", action="store_true", help="only the BLOCK_STATUS part")
    ap.add_argument("--compare", metavar="TREE", default=None,
                    help="also run qmpd from this checkout (e.g. /work/main) in the same run")
    ap.add_argument("--cold", action="store_true",
                    help="evict the image from the page cache before each copy")
    ap.add_argument("--skip-status", action="store_true", help="only the nbdcopy part")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbdbench-") as d:
        tmp = Path(d)
        if not args.skip_copy:
            throughput(tmp, args.size_mib * MiB, args.reps, args.compare, args.cold)
        if not args.skip_status:
            asyncio.run(block_status(tmp))
        os.sync()


if __name__ == "__main__":
    main()
