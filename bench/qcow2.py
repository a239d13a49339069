#!/usr/bin/env python3
"""qcow2: qmpd against QEMU 7.2 (qemu-system-x86_64 -machine none), same QMP.

Both servers run at once and each repetition measures one, then the other
(the order alternates), so load on a shared machine hits both alike.
Cases (identical QMP sequences; only the measured part is timed; medians):
- full backup of a dense qcow2 source into a new qcow2 target
  (``blockdev-backup sync=full``; target made by ``qemu-img create``);
- incremental backup with 1 % of the 64 KiB clusters dirty, scattered:
  the dirty clusters are written once (HMP ``qemu-io``) under a disabled
  bitmap; each repetition merges it into a fresh bitmap and runs
  ``sync: incremental`` into a new qcow2 (``--incr-reps``, default 11:
  each run is short, so the median of many);
- allocating 1 MiB writes into an empty qcow2 through HMP ``qemu-io``;
- ``blockdev-add`` of a 1 TiB sparse qcow2 (open latency).
Then the metadata memory qmpd holds for the 1 TiB image and for the dense
source once read through (L2 cache and refcount blocks), against QEMU's
default bounds.

    .venv/bin/python bench/qcow2.py [--size-mib 2048] [--reps 3] [--incr-reps 11] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
        tgt.unlink()  # its dirty pages need no writeback now
        return elapsed

    def hmp(self, node: str, cmd: str) -> None:
        self.c.cmd("human-monitor-command", **{"command-line": f'qemu-io {node} "{cmd}"'})

    def prepare_incremental(self, src: str, clusters: list[int]) -> None:
        """Write the dirty clusters once, recorded in the disabled bitmap ``dirty``."""
        self.c.cmd("block-dirty-bitmap-add", node=src, name="dirty")
        for c in clusters:
            self.hmp(src, f"write -P {c % 251} {c * CLUSTER} {CLUSTER}")
        self.c.cmd("block-dirty-bitmap-disable", node=src, name="dirty")

    def incremental(self, src: str, tgt: Path, size: int) -> float:
        bm = f"bm{self.n}"
        self.c.cmd("block-dirty-bitmap-add", node=src, name=bm)
        self.c.cmd("block-dirty-bitmap-merge", node=src, target=bm, bitmaps=["dirty"])
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


class Ceiling:
    """The physical ceiling of the backup cases: the kernel copying the
    same bytes file to file (``os.copy_file_range`` in one thread, as
    bench/backup.py's ceiling), no image format.  qmpd copies with several
    threads at once, so it can pass this one-thread figure."""

    def __init__(self, src: Path, clusters: list[int]) -> None:
        self.src = src
        self.clusters = clusters

    def _copy(self, tgt: Path, ranges: list[tuple[int, int]]) -> float:
        os.sync()
        t0 = time.perf_counter()
        with open(self.src, "rb") as fi, open(tgt, "wb") as fo:
            for off, n in ranges:
                done = 0
                while done < n:
                    k = os.copy_file_range(fi.fileno(), fo.fileno(), n - done, off + done, off + done)
                    if k == 0:
                        break
                    done += k
        elapsed = time.perf_counter() - t0
        tgt.unlink()
        return elapsed

    def backup(self, src: str, tgt: Path, size: int, **extra: Any) -> float:
        return self._copy(tgt, [(0, self.src.stat().st_size)])

    def incremental(self, src: str, tgt: Path, size: int) -> float:
        return self._copy(tgt, [(c * CLUSTER, CLUSTER) for c in self.clusters])


def interleaved(benches: list[tuple[str, Any]], reps: int,
                run: Callable[[str, Any], float]) -> dict[str, float]:
    """:return: each server's median of ``reps`` runs, taken in turns
    (qmpd first on even repetitions, QEMU first on odd ones)."""
    times: dict[str, list[float]] = {label: [] for label, _ in benches}
    for i in range(reps):
        for label, b in (benches if i % 2 == 0 else benches[::-1]):
            times[label].append(run(label, b))
    return {label: statistics.median(t) for label, t in times.items()}


def metadata_memory(src: Path, big: Path) -> list[str]:
    """Open both images in-process with qmpd's driver, read the source
    through, and report what the L2 cache and refcount blocks hold."""
    sys.path.insert(0, str(ROOT))
    from qmpd.block.graph import BlockGraph

    async def measure(path: Path, read_all: bool) -> tuple[int, int, int, int]:
        g = BlockGraph()
        node = await g.add({"driver": "qcow2", "node-name": "m", "read-only": True,
                            "file": {"driver": "file", "filename": str(path)}})
        image = node.driver.image  # type: ignore[attr-defined]
        if read_all:
            pos = 0
            while pos < node.length:
                _, n = await node.block_status(pos, node.length - pos)
                pos += n
        refs = sum(len(b.data) for b in image.refs.blocks.values())
        out = (image.cache.memory, image.cache.capacity * image.g.cluster_size, refs, node.length)
        await g.close()
        return out

    lines = []
    for label, path, read_all in (("1 TiB sparse, opened", big, False),
                                  ("dense source, read through", src, True)):
        l2, cap, refs, size = asyncio.run(measure(path, read_all))
        qemu_l2 = min(32 * MiB, -(-size // (CLUSTER * (CLUSTER // 8))) * CLUSTER)
        lines.append(f"  {label:<28} L2 cache {l2 / MiB:7.2f} MiB (bound {cap / MiB:.2f} MiB; "
                     f"QEMU's default {qemu_l2 / MiB:.2f} MiB), refcount blocks "
                     f"{refs / 1024:.0f} KiB (QEMU's refcount cache: {4 * CLUSTER // 1024} KiB)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--write-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--incr-reps", type=int, default=11)
    ap.add_argument("--dir", default=str(ROOT / ".bench-tmp"))
    ap.add_argument("--no-qemu", action="store_true")
    opts = ap.parse_args()
    size = opts.size_mib * MiB
    Path(opts.dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="q2-", dir=opts.dir))
    rng = random.Random(1)
    benches: list[tuple[str, Q2Bench]] = []
    try:
        raw, src = tmp / "dense.img", tmp / "dense.qcow2"
        make_dense(raw, size)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True)
        raw.unlink()
        # one copy of the source per server (each opens it read-write)
        sources = {"qmpd": src, "qemu": tmp / "dense-qemu.qcow2"}
        if not opts.no_qemu:
            shutil.copyfile(src, sources["qemu"])
        for path in sources.values():
            if path.exists():
                warm(path)
        big = tmp / "big.qcow2"
        qcow2(big, "1T")
        nclusters = size // CLUSTER
        dirty = sorted(rng.sample(range(nclusters), nclusters // 100))
        benches.append(("qmpd", Q2Bench(qmpd_server(str(tmp)))))
        if not opts.no_qemu:
            for name, argv, socks in qemu_servers(str(tmp)):
                if name == "qemu-system-x86_64":
                    benches.append(("qemu", Q2Bench(Server(name, argv, socks))))
        for label, b in benches:
            b.add("src", sources[label])
            b.prepare_incremental("src", dirty)
        results: dict[str, dict[str, float]] = {label: {} for label, _ in benches}
        cases: list[tuple[str, int, Callable[[str, Any], float]]] = [
            ("full", opts.reps, lambda label, b: b.backup("src", tmp / f"full-{label}.qcow2", size,
                                                          sync="full")),
            ("incr", opts.incr_reps, lambda label, b: b.incremental("src", tmp / f"incr-{label}.qcow2",
                                                                    size)),
            ("writes", opts.reps, lambda label, b: b.writes(tmp / f"writes-{label}.qcow2",
                                                            opts.write_mib * MiB)),
            ("open", opts.reps, lambda label, b: b.open_big(big)),
        ]
        ceiling = ("ceiling", Ceiling(src, dirty))
        results["ceiling"] = {}
        for key, reps, run in cases:
            contenders: list[tuple[str, Any]] = [*benches, ceiling] if key in ("full", "incr") else benches
            for label, t in interleaved(contenders, reps, run).items():
                results[label][key] = t
        for _, b in benches:
            b.close()
        benches = []
        mb = size / 1e6
        rows = [("full dense", mb, "full"), ("incr 1%", len(dirty) * CLUSTER / 1e6, "incr"),
                (f"alloc 1M x{opts.write_mib}", opts.write_mib * MiB / 1e6, "writes")]
        print(f"qcow2, {opts.size_mib} MiB source; medians of {opts.reps} runs ({opts.incr_reps} for "
              "incr), qmpd, QEMU (and the ceiling) in turns (MB/s; time); qmpd/qemu = qmpd speed / "
              "QEMU speed; of ceiling = qmpd speed / one thread's copy_file_range of the same bytes")
        print(f"{'case':<18}{'qmpd':>20}{'qemu':>20}{'qmpd/qemu':>11}{'of ceiling':>12}")
        for case, nbytes, key in rows:
            q = results["qmpd"][key]
            e = results.get("qemu", {}).get(key)
            c = results["ceiling"].get(key)
            fq = f"{nbytes / q:8.0f} ({q:7.3f}s)"
            fe = f"{nbytes / e:8.0f} ({e:7.3f}s)" if e else ""
            ratio = f"{e / q:10.2f}x" if e else " " * 11
            ceil = f"{c / q:11.2f}" if c else ""
            print(f"{case:<18}{fq:>20}{fe:>20}{ratio}{ceil}")
        q = results["qmpd"]["open"] * 1e3
        e = results.get("qemu", {}).get("open")
        print(f"{'open 1 TiB sparse':<18}{q:17.1f} ms" + (f"{e * 1e3:17.1f} ms" if e else ""))
        print("metadata memory held by qmpd:")
        for line in metadata_memory(src, big):
            print(line)
    finally:
        for _, b in benches:
            b.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
