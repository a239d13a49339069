#!/usr/bin/env python3
"""Start-to-greeting time: qmpd next to ``python -c "import asyncio"``, QEMU and QSD.

Each figure is the median of ``--runs`` starts (process start until the
QMP greeting was read on the socket; for the Python baseline, until the
process exited).  The target of issue 7 is qmpd <= 1.5x the baseline.
The programs take turns (one start of each per round), so a change in the
load of a shared machine affects every row alike.

qmpd runs as installed: its modules byte-compiled beforehand (into the
tree's ``__pycache__`` directories, as pip does at install time).  Where
``PYTHONDONTWRITEBYTECODE`` is set and the tree has no bytecode yet, a row
measured before compiling shows that cost too.  "first
reply" is start until the answer to ``qmp_capabilities`` + ``query-block``
(the first typed command builds its argument model then).

    python bench/startup.py [--runs 9]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Server, qemu_servers, qmpd_server  # noqa: E402


def _python_baseline() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import asyncio"], check=True)
    return time.perf_counter() - t0


def _server(make: "object") -> float:
    with tempfile.TemporaryDirectory(prefix="qmpd-st-") as tmp:
        server: Server = make(tmp)  # type: ignore[operator]
        server.stop()
        return server.greeting_s


def _first_reply(server: Server) -> float:
    """:return: seconds from start until ``query-block`` was answered."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.sockets[0])
    f = s.makefile("rb")
    f.readline()
    for cmd in ("qmp_capabilities", "query-block"):
        s.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
        reply = json.loads(f.readline())
        assert "return" in reply, reply
    elapsed = time.perf_counter() - server.t0
    s.close()
    return elapsed


def _qmpd() -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="qmpd-st-") as tmp:
        server = qmpd_server(tmp)
        first = _first_reply(server)
        server.stop()
        return server.greeting_s, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    extra = []
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not (ROOT / "qmpd" / "__pycache__").exists():
        cold = [_qmpd() for _ in range(args.runs)]
        extra.append(("qmpd, no bytecode cache", statistics.median(g for g, _ in cold),
                      statistics.median(f for _, f in cold)))
    compileall.compile_dir(str(ROOT / "qmpd"), quiet=1)
    makers = {}
    for name, _argv, _socks in qemu_servers("/nonexistent"):
        def make(tmp: str, name: str = name) -> Server:
            flavour = next(f for f in qemu_servers(tmp) if f[0] == name)
            return Server(name, flavour[1], flavour[2])
        makers[name] = make
    times: dict[str, list[float]] = {"base": [], "qmpd": [], "first": [], **{n: [] for n in makers}}
    for _ in range(args.runs):
        times["base"].append(_python_baseline())
        greet, first = _qmpd()
        times["qmpd"].append(greet)
        times["first"].append(first)
        for name, make in makers.items():
            times[name].append(_server(make))
    base = statistics.median(times["base"])
    qmpd, qmpd_first = statistics.median(times["qmpd"]), statistics.median(times["first"])
    rows = [("python -c 'import asyncio'", base), ("qmpd", qmpd)]
    rows += [(name, statistics.median(times[name])) for name in makers]
    print(f"start-to-greeting, median of {args.runs} (cpu count {os.cpu_count()}):")
    for name, t in rows:
        print(f"  {name:28s} {t * 1000:7.1f} ms   {t / base:5.2f}x import-asyncio")
    print(f"  {'qmpd, first reply':28s} {qmpd_first * 1000:7.1f} ms   {qmpd_first / base:5.2f}x import-asyncio")
    for name, greet, first in extra:
        print(f"  {name:28s} {greet * 1000:7.1f} ms   {greet / base:5.2f}x import-asyncio"
              f"   (first reply {first * 1000:.1f} ms)")
    print(f"qmpd / import-asyncio = {qmpd / base:.2f} (target <= 1.5)")
    for name, t in rows[2:]:
        print(f"qmpd / {name} = {qmpd / t:.1f}")


if __name__ == "__main__":
    main()
