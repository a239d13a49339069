#!/usr/bin/env python3
"""Backup throughput: qmpd against QEMU and against the copy ceiling.

Three 2 GiB raw sources (warm page cache, ext4 or any file system with
SEEK_HOLE): dense random data; 90 % holes (1 MiB data extents scattered);
an incremental backup with 1 % of the 64 KiB clusters dirty, scattered
(bitmap added, clusters written with HMP ``qemu-io``, then
``sync: incremental``).  Each server gets the identical QMP sequence
(blockdev-add source and a fresh sparse target, blockdev-backup, wait for
BLOCK_JOB_COMPLETED); only the backup is timed.  The ceiling is
``cp --sparse=always`` and an ``os.copy_file_range`` loop on the same files.
Figures are the median of --reps runs.  Then: p99 latency of
``query-block-jobs`` while 4 full backups of the dense source run at once.
qcow2 sources and targets (issue 10's figures): bench/qcow2.py.

    .venv/bin/python bench/backup.py [--size-mib 2048] [--reps 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Server, qemu_servers, qmpd_server  # noqa: E402

CLUSTER = 64 * 1024
MiB = 1 << 20


class Client:
    """Blocking QMP client that keeps events."""

    def __init__(self, path: str) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._line()
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out, self.buf = self.buf[:i], self.buf[i + 1:]
                msg: dict[str, Any] = json.loads(out)
                return msg
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def cmd(self, command: str, **args: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{command}: {msg['error']}")
            return msg["return"]

    def wait_event(self, name: str, device: str) -> dict[str, Any]:
        while True:
            for ev in self.events:
                if ev["event"] == name and ev["data"].get("device") == device:
                    self.events.remove(ev)
                    return ev
            self.events.append(self._line())

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ images


def make_dense(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            f.write(i.to_bytes(8, "little") + block[8:])


def make_holes(path: Path, size: int, rng: random.Random) -> None:
    nblocks = size // MiB
    data = rng.sample(range(nblocks), nblocks // 10)
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for b in data:
            f.seek(b * MiB)
            f.write(block)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def fresh(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


# ------------------------------------------------------------------ one server


class Bench:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.c = Client(server.sockets[0])
        self.n = 0

    def add(self, name: str, path: Path) -> None:
        self.c.cmd("blockdev-add", **{"driver": "raw", "node-name": name,
                                      "file": {"driver": "file", "filename": str(path)}})

    def backup(self, src: str, tgt: Path, size: int, **extra: Any) -> float:
        """Time one backup of node ``src`` into a fresh ``tgt``; seconds."""
        self.n += 1
        node, job = f"t{self.n}", f"j{self.n}"
        fresh(tgt, size)
        os.sync()
        self.add(node, tgt)
        t0 = time.perf_counter()
        self.c.cmd("blockdev-backup", device=src, target=node, **{"job-id": job}, **extra)
        ev = self.c.wait_event("BLOCK_JOB_COMPLETED", job)
        elapsed = time.perf_counter() - t0
        assert "error" not in ev["data"], ev
        self.c.cmd("blockdev-del", **{"node-name": node})
        return elapsed

    def incremental(self, src: str, tgt: Path, size: int, clusters: list[int]) -> float:
        bm = f"bm{self.n}"
        self.c.cmd("block-dirty-bitmap-add", node=src, name=bm)
        for c in clusters:
            self.c.cmd("human-monitor-command",
                       **{"command-line": f'qemu-io {src} "write -P {c % 251} {c * CLUSTER} {CLUSTER}"'})
        t = self.backup(src, tgt, size, sync="incremental", bitmap=bm)
        self.c.cmd("block-dirty-bitmap-remove", node=src, name=bm)
        return t

    def close(self) -> None:
        self.c.close()
        self.server.stop()


def ceiling(src: Path, dst: Path, reps: int) -> tuple[float, float]:
    cp, cfr = [], []
    for _ in range(reps):
        dst.unlink(missing_ok=True)
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
        cp.append(time.perf_counter() - t0)
        dst.unlink()
        os.sync()
        t0 = time.perf_counter()
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            left = os.fstat(fi.fileno()).st_size
            while left:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 1 << 30))
                if not n:
                    break
                left -= n
        cfr.append(time.perf_counter() - t0)
    dst.unlink(missing_ok=True)
    return statistics.median(cp), statistics.median(cfr)


def query_latency(tmp: Path, src: Path, size: int) -> tuple[float, float, int]:
    server = qmpd_server(str(tmp), 2)
    b = Bench(server)
    try:
        b.add("src", src)
        targets = [tmp / f"q{i}.img" for i in range(4)]
        for i, t in enumerate(targets):
            fresh(t, size)
            b.add(f"qt{i}", t)
        os.sync()
        q = Client(server.sockets[1])
        for i in range(4):
            b.c.cmd("blockdev-backup", device="src", target=f"qt{i}", sync="full", **{"job-id": f"q{i}"})
        lat: list[float] = []
        while True:
            t0 = time.perf_counter()
            jobs = q.cmd("query-block-jobs")
            lat.append(time.perf_counter() - t0)
            if not jobs:
                break
        q.close()
        for t in targets:
            t.unlink()
        lat.sort()
        return statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99)] * 1e3, len(lat)
    finally:
        b.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / ".bench-tmp"))
    ap.add_argument("--no-qemu", action="store_true")
    opts = ap.parse_args()
    size = opts.size_mib * MiB
    Path(opts.dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bk-", dir=opts.dir))
    rng = random.Random(1)
    try:
        dense, holes = tmp / "dense.img", tmp / "holes.img"
        make_dense(dense, size)
        make_holes(holes, size, rng)
        nclusters = size // CLUSTER
        dirty = sorted(rng.sample(range(nclusters), nclusters // 100))
        for p in (dense, holes):
            warm(p)
        tgt = tmp / "target.img"

        servers: list[tuple[str, Server]] = [("qmpd", qmpd_server(str(tmp)))]
        if not opts.no_qemu:
            for name, argv, socks in qemu_servers(str(tmp)):
                if name == "qemu-system-x86_64":
                    servers.append(("qemu", Server(name, argv, socks)))
        results: dict[str, dict[str, float]] = {}
        benches = [(label, Bench(server)) for label, server in servers]
        for label, b in benches:
            try:
                b.add("dense", dense)
                b.add("holes", holes)
                r = results.setdefault(label, {})
                r["dense"] = statistics.median(b.backup("dense", tgt, size, sync="full")
                                               for _ in range(opts.reps))
                r["holes"] = statistics.median(b.backup("holes", tgt, size, sync="full")
                                               for _ in range(opts.reps))
                r["incr"] = statistics.median(b.incremental("dense", tgt, size, dirty)
                                              for _ in range(opts.reps))
            except BaseException:
                for _, other in benches:
                    other.close()
                raise
            b.close()
        tgt.unlink(missing_ok=True)
        cp_dense, cfr_dense = ceiling(dense, tgt, opts.reps)
        cp_holes, cfr_holes = ceiling(holes, tgt, opts.reps)

        mb = size / 1e6
        incr_mb = len(dirty) * CLUSTER / 1e6
        print(f"backup of a {opts.size_mib} MiB raw source, median of {opts.reps} (MB/s; time)")
        print(f"{'case':<14}{'qmpd':>18}{'qemu':>18}{'qmpd/qemu':>11}{'cp':>18}{'cfr loop':>18}{'qmpd/cp':>9}")
        rows = [("dense", mb, cp_dense, cfr_dense), ("90% holes", mb, cp_holes, cfr_holes),
                ("incr 1%", incr_mb, None, None)]
        for (case, nbytes, cp, cfr), key in zip(rows, ("dense", "holes", "incr")):
            q = results["qmpd"][key]
            e = results.get("qemu", {}).get(key)

            def fmt(t: float | None) -> str:
                return f"{nbytes / t:8.0f} ({t:6.3f}s)" if t else " " * 18

            ratio = f"{e / q:10.2f}x" if e else " " * 11
            cpr = f"{cp / q:8.2f}x" if cp else ""
            print(f"{case:<14}{fmt(q):>18}{fmt(e):>18}{ratio}{fmt(cp):>18}{fmt(cfr):>18}{cpr}")
        med, p99, n = query_latency(tmp, dense, size)
        print(f"query-block-jobs during 4 concurrent full backups: median {med:.2f} ms, "
              f"p99 {p99:.2f} ms ({n} samples)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
