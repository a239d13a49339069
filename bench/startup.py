#!/usr/bin/env python3
"""Start-to-greeting time: qmpd next to ``python -c "import asyncio"``, QEMU and QSD.

Each figure is the median of ``--runs`` starts (process start until the
QMP greeting was read on the socket; for the Python baseline, until the
process exited).  The target of issue 7 is qmpd <= 1.5x the baseline.

    python bench/startup.py [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Server, qemu_servers, qmpd_server  # noqa: E402


def _python_baseline(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import asyncio"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _server(make: "object", runs: int) -> float:
    times = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="qmpd-st-") as tmp:
            server: Server = make(tmp)  # type: ignore[operator]
            times.append(server.greeting_s)
            server.stop()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    base = _python_baseline(args.runs)
    rows = [("python -c 'import asyncio'", base)]
    qmpd = _server(lambda tmp: qmpd_server(tmp), args.runs)
    rows.append(("qmpd", qmpd))
    for name, _argv, _socks in qemu_servers("/nonexistent"):
        def make(tmp: str, name: str = name) -> Server:
            flavour = next(f for f in qemu_servers(tmp) if f[0] == name)
            return Server(name, flavour[1], flavour[2])
        rows.append((name, _server(make, args.runs)))
    print(f"start-to-greeting, median of {args.runs} (cpu count {os.cpu_count()}):")
    for name, t in rows:
        print(f"  {name:28s} {t * 1000:7.1f} ms   {t / base:5.2f}x import-asyncio")
    print(f"qmpd / import-asyncio = {qmpd / base:.2f} (target <= 1.5)")
    for name, t in rows[2:]:
        print(f"qmpd / {name} = {qmpd / t:.1f}")


if __name__ == "__main__":
    main()
