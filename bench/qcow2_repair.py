#!/usr/bin/env python3
"""Repair of a dirty qcow2 at a read-write open: qmpd against QEMU 7.2.

A lazy-refcount image is written by ``qemu-io`` (``--write-mib`` of 64 KiB
clusters, scattered over ``--size-mib``), which then aborts: the image is
dirty and its refcounts are missing.  Each repetition copies it twice and
times the read-write open that repairs it, closed again: ``qemu-io -c quit``
(QEMU) and ``blockdev-add`` + close in qmpd's block layer (a subprocess);
the same open of the then clean image is subtracted, so the process starts
cancel out.  Prints each run and the ratio of medians.

    .venv/bin/python bench/qcow2_repair.py [--size-mib 4096] [--write-mib 1024] [--reps 3]
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

ROOT = Path(__file__).resolve().parents[1]
OPEN = r"""
import asyncio, sys
from qmpd.block.graph import BlockGraph
async def main(path):
    g = BlockGraph()
    n = await g.add({"driver": "qcow2", "node-name": "d",
                     "file": {"driver": "file", "filename": path}})
    assert n.driver.dirty_flag() is False
    await g.close()
asyncio.run(main(sys.argv[1]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=4096)
    ap.add_argument("--write-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        src = Path(d) / "dirty.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                        str(src), f"{a.size_mib}M"], check=True)
        step = a.size_mib // a.write_mib * 65536 * 16
        cmds = []
        for i in range(a.write_mib // 1):
            cmds += ["-c", f"write -P {i % 250 + 1} {(i * step) % (a.size_mib << 20)} 1M"]
        cmds += ["-c", "abort"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(src)], capture_output=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        times: dict[str, list[float]] = {"qemu": [], "qmpd": []}
        for rep in range(a.reps):
            for side in ("qemu", "qmpd"):
                img = Path(d) / f"{side}.qcow2"
                shutil.copy(src, img)
                argv = (["qemu-io", "-f", "qcow2", "-c", "quit", str(img)] if side == "qemu"
                        else [sys.executable, "-c", OPEN, str(img)])
                spent = []
                for _ in ("dirty", "clean"):           # the second open has nothing to repair
                    t = time.perf_counter()
                    subprocess.run(argv, env=env, check=True, capture_output=True)
                    spent.append(time.perf_counter() - t)
                times[side].append(max(0.0, spent[0] - spent[1]))
                r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
                assert r.returncode == 0, r.stdout + r.stderr
            print(f"run {rep + 1}: repair (dirty open minus clean open) QEMU "
                  f"{times['qemu'][-1] * 1000:.0f} ms, qmpd {times['qmpd'][-1] * 1000:.0f} ms")
        q, m = statistics.median(times["qemu"]), statistics.median(times["qmpd"])
        print(f"repair at open, {a.write_mib} MiB written into {a.size_mib} MiB: "
              f"QEMU {q * 1000:.0f} ms, qmpd {m * 1000:.0f} ms, qmpd/QEMU time {m / q:.2f}x")


if __name__ == "__main__":
    main()
