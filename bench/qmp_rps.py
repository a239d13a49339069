#!/usr/bin/env python3
"""QMP request rate and start-up time: qmpd against QEMU, side by side.

Prints round trips per second of sequential ``query-version`` on one
connection and on 8 concurrent connections (8 client processes; QEMU serves
one client per socket, so it gets 8 monitor sockets), and the time from
process start to the greeting (median of 5 starts).  Ratios are qmpd/QEMU.

    python bench/qmp_rps.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RawQMP, Server, qemu_servers, qmpd_server  # noqa: E402

REQ = b'{"execute":"query-version","id":1}'


def _client(path: str, seconds: float, out: "mp.Queue[int]", start: "mp.Event") -> None:  # type: ignore[type-arg]
    c = RawQMP(path)
    for _ in range(50):
        c.roundtrip(REQ)
    start.wait()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            c.roundtrip(REQ)
        n += 50
    c.close()
    out.put(n)


def rate(paths: list[str], seconds: float) -> float:
    ctx = mp.get_context("fork")
    out: mp.Queue[int] = ctx.Queue()
    start = ctx.Event()
    procs = [ctx.Process(target=_client, args=(p, seconds, out, start)) for p in paths]
    for p in procs:
        p.start()
    time.sleep(0.3)
    start.set()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def startup(make: "callable[[], Server]", runs: int = 5) -> float:  # type: ignore[valid-type]
    times = []
    for _ in range(runs):
        s = make()
        times.append(s.greeting_s)
        s.stop()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmpbench-") as tmp:
        srv = qmpd_server(tmp, 1)
        try:
            one = rate([srv.sockets[0]], args.seconds)
            eight = rate([srv.sockets[0]] * 8, args.seconds)
        finally:
            srv.stop()
        start_s = startup(lambda: qmpd_server(tmp, 1))
        rows.append(("qmpd", one, eight, start_s))
        for name, argv, socks in qemu_servers(tmp, 8):
            srv = Server(name, argv, socks)
            try:
                q1 = rate([socks[0]], args.seconds)
                q8 = rate(socks, args.seconds)
            finally:
                srv.stop()
            qs = startup(lambda: Server(name, argv, socks))
            rows.append((name, q1, q8, qs))
    print(f"{'server':<22}{'1 conn rt/s':>14}{'8 conn rt/s':>14}{'start→greeting':>16}")
    for name, one, eight, st in rows:
        print(f"{name:<22}{one:>14,.0f}{eight:>14,.0f}{st * 1000:>13.1f} ms")
    base = rows[0]
    for name, one, eight, st in rows[1:]:
        print(f"ratio qmpd/{name}: 1 conn {base[1] / one:.2f}x, 8 conn {base[2] / eight:.2f}x, "
              f"start-up time {base[3] / st:.2f}x (lower is faster)")
    print(f"qmpd 8 conn / 1 conn: {base[2] / base[1]:.2f}x   (targets: 1 conn >= 3x QEMU; 8 conn > 1 conn)")


if __name__ == "__main__":
    main()
