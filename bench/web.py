#!/usr/bin/env python3
"""The web layer's cost: backup throughput and QMP round trips/s with and
without 10 dashboards open and ``/metrics`` scraped every second.

Two daemons from the same code: *plain* (no ``--http``) and *watched*
(``--http``, 10 WebSocket dashboards on ``/live`` parsing every snapshot,
one scraper GETting ``/metrics`` every second, in another process).  Each
gets the identical work, alternated plain/watched for --reps rounds:

* a full backup of a dense --size-mib source (with a dirty bitmap, so the
  dashboard has a heat strip to compute) into a fresh sparse file, timed
  until BLOCK_JOB_COMPLETED;
* sequential ``query-version`` round trips on one connection for --seconds
  while a speed-limited backup runs (so the dashboards receive a snapshot
  every 0.5 s throughout).

Printed: medians, the watched/plain ratios (the target is a drop < 3 %,
i.e. ratios > 0.97), the backup against the ``copy_file_range`` ceiling,
and round trips against qemu-storage-daemon when installed.

    .venv/bin/python bench/web.py [--size-mib 512] [--reps 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RawQMP, Server, qemu_servers, qmpd_server  # noqa: E402
from backup import MiB, Client, fresh, make_dense, warm  # noqa: E402

REQ = b'{"execute":"query-version","id":1}'
DASHBOARDS = 10


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (/proc schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def watchers(url: str, stop: "mp.Event", counts: "mp.Queue[tuple[int, int]]") -> None:  # type: ignore[type-arg]
    """10 dashboards on /live and a /metrics scrape per second, until ``stop``."""
    import aiohttp

    async def dashboard(session: aiohttp.ClientSession, got: list[int]) -> None:
        async with session.ws_connect(url + "live") as ws:
            async for msg in ws:
                json.loads(msg.data)  # what a browser does with each push
                got[0] += 1

    async def scraper(session: aiohttp.ClientSession, got: list[int]) -> None:
        while True:
            async with session.get(url + "metrics") as resp:
                await resp.read()
            got[1] += 1
            await asyncio.sleep(1.0)

    async def run() -> None:
        got = [0, 0]
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(dashboard(session, got)) for _ in range(DASHBOARDS)]
            tasks.append(asyncio.create_task(scraper(session, got)))
            while not stop.is_set():
                await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        counts.put((got[0], got[1]))

    asyncio.run(run())


class Target:
    """One daemon with the bench's nodes; optionally watched."""

    def __init__(self, tmp: Path, name: str, src: Path, size: int, watched: bool) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.size = size
        extra: list[str] = []
        self.url = ""
        if watched:
            token = self.dir / "token"
            token.write_text("bench-token\n")
            port = free_port()
            extra = ["--http", f"127.0.0.1:{port}", "--http-token-file", str(token)]
            self.url = f"http://127.0.0.1:{port}/"
        self.server = qmpd_server(str(self.dir), 2, *extra)
        self.c = Client(self.server.sockets[0])
        self.c.cmd("blockdev-add", **{"driver": "raw", "node-name": "src",
                                      "file": {"driver": "file", "filename": str(src)}})
        self.c.cmd("block-dirty-bitmap-add", node="src", name="b0")
        for i in range(64):  # scattered dirty clusters for the heat strip
            self.c.cmd("human-monitor-command",
                       **{"command-line": f'qemu-io src "write -P {i} {i * (size // 64)} 64k"'})
        self.c.cmd("blockdev-add", **{"driver": "null-co", "node-name": "slow-t", "size": size})
        self.n = 0
        self.stop_watch: Any = None
        self.watch_proc: Any = None
        self.counts: Any = None

    def watch(self) -> None:
        if not self.url:
            return
        ctx = mp.get_context("fork")
        self.stop_watch = ctx.Event()
        self.counts = ctx.Queue()
        self.watch_proc = ctx.Process(target=watchers, args=(self.url, self.stop_watch, self.counts))
        self.watch_proc.start()

    def cpu(self) -> int:
        return cpu_ns(self.server.proc.pid)

    def backup(self) -> tuple[float, float]:
        """:return: bytes/s of wall time and bytes per daemon CPU second."""
        self.n += 1
        tgt = self.dir / "t.img"
        fresh(tgt, self.size)
        node, job = f"t{self.n}", f"j{self.n}"
        self.c.cmd("blockdev-add", **{"driver": "raw", "node-name": node,
                                      "file": {"driver": "file", "filename": str(tgt)}})
        c0, t0 = self.cpu(), time.perf_counter()
        self.c.cmd("blockdev-backup", device="src", target=node, sync="full", **{"job-id": job})
        ev = self.c.wait_event("BLOCK_JOB_COMPLETED", job)
        elapsed = time.perf_counter() - t0
        cpu = (self.cpu() - c0) / 1e9
        assert "error" not in ev["data"], ev
        self.c.cmd("blockdev-del", **{"node-name": node})
        tgt.unlink()
        return self.size / elapsed, self.size / cpu

    def round_trips(self, seconds: float) -> tuple[float, float]:
        """:return: round trips per wall second and per daemon CPU second, while a
        speed-limited backup runs (the dashboards get a push every 0.5 s)."""
        self.n += 1
        job = f"s{self.n}"
        self.c.cmd("blockdev-backup", device="src", target="slow-t", sync="full", speed=MiB,
                   **{"job-id": job})
        q = RawQMP(self.server.sockets[1])
        for _ in range(200):
            q.roundtrip(REQ)
        n = 0
        c0, t0 = self.cpu(), time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for _ in range(50):
                q.roundtrip(REQ)
            n += 50
        elapsed = time.perf_counter() - t0
        cpu = (self.cpu() - c0) / 1e9
        q.close()
        self.c.cmd("job-cancel", id=job)
        self.c.wait_event("BLOCK_JOB_CANCELLED", job)
        return n / elapsed, n / cpu

    def close(self) -> tuple[int, int]:
        got = (0, 0)
        if self.watch_proc is not None:
            self.stop_watch.set()
            got = self.counts.get(timeout=30)
            self.watch_proc.join(10)
        self.c.close()
        self.server.stop()
        return got


def cfr_ceiling(src: Path, dst: Path) -> float:
    dst.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = os.fstat(fi.fileno()).st_size
        while left:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 1 << 30))
            if not n:
                break
            left -= n
    elapsed = time.perf_counter() - t0
    dst.unlink()
    return src.stat().st_size / elapsed


def qsd_round_trips(tmp: Path, seconds: float) -> float | None:
    for name, argv, socks in qemu_servers(str(tmp), 1):
        if name != "qemu-storage-daemon":
            continue
        srv = Server(name, argv, socks)
        try:
            q = RawQMP(socks[0])
            n = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                for _ in range(50):
                    q.roundtrip(REQ)
                n += 50
            q.close()
            return n / seconds
        finally:
            srv.stop()
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="directory for the images (default /dev/shm: keeps the disk out of the figures)")
    args = ap.parse_args()
    size = args.size_mib * MiB
    bk: dict[str, list[tuple[float, float]]] = {"plain": [], "watched": []}
    rt: dict[str, list[tuple[float, float]]] = {"plain": [], "watched": []}
    with tempfile.TemporaryDirectory(prefix="qmpbench-web-", dir=args.dir) as tmpdir:
        tmp = Path(tmpdir)
        src = tmp / "src.img"
        make_dense(src, size)
        warm(src)
        plain = Target(tmp, "plain", src, size, watched=False)
        watched = Target(tmp, "watched", src, size, watched=True)
        watched.watch()
        pairs = [("plain", plain), ("watched", watched)]
        try:
            for _, t in pairs:  # warm-up: page cache, first allocations, code paths
                t.backup()
                t.round_trips(0.3)
            for rep in range(args.reps):
                for name, t in pairs if rep % 2 == 0 else pairs[::-1]:
                    bk[name].append(t.backup())
                    rt[name].append(t.round_trips(args.seconds))
        finally:
            plain.close()
            pushes, scrapes = watched.close()
        ceiling = cfr_ceiling(src, tmp / "ceiling.img")
        qsd = qsd_round_trips(tmp, args.seconds)

    def med(rows: list[tuple[float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    print(f"{'daemon':<48}{'backup MiB/s':>13}{'per CPU s':>11}{'QMP rt/s':>10}{'per CPU s':>11}")
    for name, label in (("plain", "qmpd (no --http)"),
                        ("watched", f"qmpd --http, {DASHBOARDS} dashboards + /metrics 1/s")):
        print(f"{label:<48}{med(bk[name], 0) / MiB:>13,.0f}{med(bk[name], 1) / MiB:>11,.0f}"
              f"{med(rt[name], 0):>10,.0f}{med(rt[name], 1):>11,.0f}")
    print(f"dashboard pushes received: {pushes} over {DASHBOARDS} sockets; /metrics scrapes: {scrapes}")
    ratios = {what: (med(rows["watched"], i) / med(rows["plain"], i)) for what, rows in (("bk", bk), ("rt", rt))
              for i in (0,)}
    cpu_ratios = {what: (med(rows["watched"], 1) / med(rows["plain"], 1)) for what, rows in (("bk", bk), ("rt", rt))}
    print(f"ratio watched/plain, wall clock:  backup throughput {ratios['bk']:.3f}, "
          f"QMP round trips/s {ratios['rt']:.3f}")
    print(f"ratio watched/plain, per daemon CPU second: backup {cpu_ratios['bk']:.3f}, "
          f"QMP round trips {cpu_ratios['rt']:.3f}   (target: > 0.97, a drop < 3 %)")
    print(f"backup vs copy_file_range ceiling ({ceiling / MiB:,.0f} MiB/s): "
          f"plain {med(bk['plain'], 0) / ceiling:.2f}, watched {med(bk['watched'], 0) / ceiling:.2f}")
    if qsd is not None:
        print(f"QMP rt/s vs qemu-storage-daemon ({qsd:,.0f}/s, idle): plain {med(rt['plain'], 0) / qsd:.2f}x, "
              f"watched {med(rt['watched'], 0) / qsd:.2f}x")
    print("(the per-CPU-second figures hold up on a shared machine; wall-clock ratios swing with its load)")


if __name__ == "__main__":
    main()
