#!/usr/bin/env python3
"""qcow2: qmpd against QEMU 7.2 (qemu-system-x86_64 -machine none), same QMP.

Cases (each server gets the identical sequence; only the measured part is
timed; median of --reps):
- full backup of a dense qcow2 source into a new qcow2 target
  (``blockdev-backup sync=full``; target made by ``qemu-img create``);
- incremental backup with 1 % of the 64 KiB clusters dirty, scattered
  (bitmap, HMP ``qemu-io`` writes, ``sync: incremental`` into a new qcow2);
- allocating 1 MiB writes into an empty qcow2 through HMP ``qemu-io``;
- ``blockdev-add`` of a 1 TiB sparse qcow2 (open latency).
Then the L2 cache bound qmpd uses for the 1 TiB image (QEMU's default rule).

    .venv/bin/python bench/qcow2.py [--size-mib 2048] [--reps 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Server, qemu_servers, qmpd_server  # noqa: E402
from backup import Client, make_dense, warm  # noqa: E402

CLUSTER = 64 * 1024
MiB = 1 << 20


def qcow2(path: Path, size: str) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), size], check=True,
                   capture_output=True)


class Q2Bench:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.c = Client(server.sockets[0])
        self.n = 0

    def add(self, name: str, path: Path) -> float:
        t0 = time.perf_counter()
        self.c.cmd("blockdev-add", **{"driver": "qcow2", "node-name": name,
                                      "file": {"driver": "file", "filename": str(path)}})
        return time.perf_counter() - t0

    def backup(self, src: str, tgt: Path, size: int, **extra: Any) -> float:
        self.n += 1
        node, job = f"t{self.n}", f"j{self.n}"
        qcow2(tgt, str(size))
        os.sync()
        self.add(node, tgt)
        t0 = time.perf_counter()
        self.c.cmd("blockdev-backup", device=src, target=node, **{"job-id": job}, **extra)
        ev = self.c.wait_event("BLOCK_JOB_COMPLETED", job)
        elapsed = time.perf_counter() - t0
        assert "error" not in ev["data"], ev
        self.c.cmd("blockdev-del", **{"node-name": node})
        return elapsed

    def hmp(self, node: str, cmd: str) -> None:
        self.c.cmd("human-monitor-command", **{"command-line": f'qemu-io {node} "{cmd}"'})

    def incremental(self, src: str, tgt: Path, size: int, clusters: list[int]) -> float:
        bm = f"bm{self.n}"
        self.c.cmd("block-dirty-bitmap-add", node=src, name=bm)
        for c in clusters:
            self.hmp(src, f"write -P {c % 251} {c * CLUSTER} {CLUSTER}")
        t = self.backup(src, tgt, size, sync="incremental", bitmap=bm)
        self.c.cmd("block-dirty-bitmap-remove", node=src, name=bm)
        return t

    def writes(self, img: Path, size: int) -> float:
        self.n += 1
        node = f"w{self.n}"
        qcow2(img, str(size))
        self.add(node, img)
        t0 = time.perf_counter()
        for i in range(size // MiB):
            self.hmp(node, f"write -P 90 {i * MiB} 1M")
        elapsed = time.perf_counter() - t0
        self.c.cmd("blockdev-del", **{"node-name": node})
        return elapsed

    def open_big(self, img: Path) -> float:
        self.n += 1
        node = f"o{self.n}"
        t = self.add(node, img)
        self.c.cmd("blockdev-del", **{"node-name": node})
        return t

    def close(self) -> None:
        self.c.close()
        self.server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--write-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / ".bench-tmp"))
    ap.add_argument("--no-qemu", action="store_true")
    opts = ap.parse_args()
    size = opts.size_mib * MiB
    Path(opts.dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="q2-", dir=opts.dir))
    rng = random.Random(1)
    try:
        raw, src = tmp / "dense.img", tmp / "dense.qcow2"
        make_dense(raw, size)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True)
        raw.unlink()
        warm(src)
        big = tmp / "big.qcow2"
        qcow2(big, "1T")
        nclusters = size // CLUSTER
        dirty = sorted(rng.sample(range(nclusters), nclusters // 100))
        tgt, wimg = tmp / "target.qcow2", tmp / "writes.qcow2"
        servers: list[tuple[str, Server]] = [("qmpd", qmpd_server(str(tmp)))]
        if not opts.no_qemu:
            for name, argv, socks in qemu_servers(str(tmp)):
                if name == "qemu-system-x86_64":
                    servers.append(("qemu", Server(name, argv, socks)))
        results: dict[str, dict[str, float]] = {}
        for label, server in servers:
            b = Q2Bench(server)
            try:
                b.add("src", src)
                r = results.setdefault(label, {})
                r["full"] = statistics.median(b.backup("src", tgt, size, sync="full")
                                              for _ in range(opts.reps))
                r["incr"] = statistics.median(b.incremental("src", tgt, size, dirty)
                                              for _ in range(opts.reps))
                r["writes"] = statistics.median(b.writes(wimg, opts.write_mib * MiB)
                                                for _ in range(opts.reps))
                r["open"] = statistics.median(b.open_big(big) for _ in range(opts.reps))
            finally:
                b.close()
        mb = size / 1e6
        rows = [("full dense", mb, "full"), ("incr 1%", len(dirty) * CLUSTER / 1e6, "incr"),
                (f"alloc 1M x{opts.write_mib}", opts.write_mib * MiB / 1e6, "writes")]
        print(f"qcow2, {opts.size_mib} MiB source, median of {opts.reps} (MB/s; time); "
              "ratio = qmpd speed / QEMU speed")
        print(f"{'case':<18}{'qmpd':>20}{'qemu':>20}{'qmpd/qemu':>11}")
        for case, nbytes, key in rows:
            q = results["qmpd"][key]
            e = results.get("qemu", {}).get(key)
            fq = f"{nbytes / q:8.0f} ({q:7.3f}s)"
            fe = f"{nbytes / e:8.0f} ({e:7.3f}s)" if e else ""
            ratio = f"{e / q:10.2f}x" if e else ""
            print(f"{case:<18}{fq:>20}{fe:>20}{ratio}")
        q = results["qmpd"]["open"] * 1e3
        e = results.get("qemu", {}).get("open")
        print(f"{'open 1 TiB sparse':<18}{q:17.1f} ms" + (f"{e * 1e3:17.1f} ms" if e else ""))
        l2 = min(32 * MiB, ((1 << 40) // (CLUSTER * (CLUSTER // 8))) * CLUSTER)
        print(f"L2 cache bound for the 1 TiB image: {l2 // MiB} MiB (QEMU's default rule); "
              "refcount blocks held: 2 bytes per allocated 64 KiB cluster")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
