#!/usr/bin/env python3
"""qemu-io write throughput over QMP: qmpd against QEMU, side by side.

Each server gets a raw node over a preallocated image and is sent SIZE
(default 1 GiB) of ``qemu-io NODE "write -P 0xab OFF 1M"`` through HMP
(``human-monitor-command``), one round trip per MiB, then a ``flush``; with
0 and with 4 enabled dirty bitmaps.  QEMU is ``qemu-system-x86_64 -machine
none`` (no guest), driven by the same client code.  ``dd`` of the same
amount on the same file system is printed as the ceiling.  Figures are the
median of --reps runs; ratios matter more than absolute numbers here.

    .venv/bin/python bench/io.py [--size-mib 1024] [--reps 3]

Then the cost of persistent bitmaps with ``--state-dir`` (bench/persist.py):
1 MiB writes with one persistent against one non-persistent bitmap, 4 KiB
random writes from 8 concurrent writers, and the state directory's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Server, hmp_write_rate, preallocated_image, qemu_servers, qmpd_server  # noqa: E402

MIB = 1 << 20


def run_writes(sock: str, image: str, size: int, bitmaps: int) -> float:
    """:return: MB/s of qemu-io writes through QMP on a fresh node."""
    return hmp_write_rate(sock, image, size, [False] * bitmaps)


def dd_ceiling(image: str, size: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", f"count={size // MIB}", "conv=notrunc,fdatasync"],
                   check=True, capture_output=True)
    return size / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / ".bench-tmp"))
    args = ap.parse_args()
    size = args.size_mib * MIB
    os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="io-", dir=args.dir) as tmp:
        image = preallocated_image(tmp, size)
        sock_tmp = tempfile.mkdtemp(prefix="iob-")
        servers = [("qmpd", lambda: qmpd_server(sock_tmp, 1))]
        for name, argv, socks in qemu_servers(sock_tmp, 1):
            if name == "qemu-system-x86_64":  # QSD has no HMP
                servers.append((name, lambda argv=argv, socks=socks, name=name: Server(name, argv, socks)))
        results: dict[str, dict[int, float]] = {}
        ceiling = statistics.median(dd_ceiling(image, size) for _ in range(args.reps))
        for name, make in servers:
            srv = make()
            try:
                results[name] = {
                    nb: statistics.median(run_writes(srv.sockets[0], image, size, nb) for _ in range(args.reps))
                    for nb in (0, 4)
                }
            finally:
                srv.stop()
        shutil.rmtree(sock_tmp, ignore_errors=True)
    print(f"qemu-io writes over QMP, {args.size_mib} MiB in 1 MiB requests, median of {args.reps}")
    print(f"{'server':<22}{'0 bitmaps MB/s':>16}{'4 bitmaps MB/s':>16}{'slowdown':>10}{'of dd':>8}")
    for name, r in results.items():
        slow = (1 - r[4] / r[0]) * 100
        print(f"{name:<22}{r[0]:>16,.0f}{r[4]:>16,.0f}{slow:>9.1f}%{r[0] / ceiling:>8.2f}")
    print(f"{'dd (ceiling)':<22}{ceiling:>16,.0f}")
    if "qemu-system-x86_64" in results:
        q, m = results["qemu-system-x86_64"], results["qmpd"]
        print(f"ratio qmpd/QEMU: 0 bitmaps {m[0] / q[0]:.2f}x, 4 bitmaps {m[4] / q[4]:.2f}x")
    print("target: 4-bitmap slowdown under 5 %")
    print()
    from persist import run_all  # the --state-dir figures, same run

    run_all(args.size_mib, args.reps, args.dir)


if __name__ == "__main__":
    main()
