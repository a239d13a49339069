#!/usr/bin/env python3
"""Hostile clients against qmpd while a witness measures ``query-status``.

Abuse (issue 7, items 1 and 2), all at once for ``--seconds``:

* huge messages: ``query-status`` with a 4 Mi element array (over QEMU's
  2 Mi token limit), sent again and again by 2 clients;
* 16 clients that send ``query-qmp-schema`` in a loop and never read;
* 8 clients that each send 60 MiB of one unfinished message;
* bursts of connects beyond ``--max-connections``.

Prints the witness's latency percentiles and the daemon's peak RSS against
its buffer budget.  Targets: witness p99 < 50 ms, RSS < 512 MiB with the
default budget.

    python bench/abuse.py [--seconds 10] [--max-buffer 256M]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RawQMP, qmpd_server  # noqa: E402

HUGE = b'{"execute": "query-status", "arguments": {"x": [' + b"1," * (4 << 20) + b'1]}}'


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of ``pid`` in KiB."""
    cur = peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


def _connect(path: str, negotiate: bool = True) -> socket.socket | None:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        if negotiate:
            s.sendall(b'{"execute":"qmp_capabilities"}')
        return s
    except OSError:
        return None


def _huge_sender(path: str, stop: threading.Event) -> None:
    while not stop.is_set():
        s = _connect(path)
        if s is None:
            continue
        try:
            s.settimeout(5)
            s.sendall(HUGE)
            s.recv(4096)
        except OSError:
            pass
        finally:
            s.close()


def _non_reader(path: str, stop: threading.Event) -> None:
    while not stop.is_set():
        s = _connect(path)
        if s is None:
            continue
        s.settimeout(2)
        try:
            while not stop.is_set():
                s.sendall(b'{"execute":"query-qmp-schema"}' * 8)
        except OSError:
            pass  # aborted by the daemon: reconnect
        finally:
            s.close()


def _unfinished(path: str, stop: threading.Event) -> None:
    chunk = b"x" * (1 << 20)
    while not stop.is_set():
        s = _connect(path)
        if s is None:
            continue
        s.settimeout(2)
        try:
            s.sendall(b'{"execute": "query-status", "arguments": {"a": "')
            for _ in range(60):
                s.sendall(chunk)
            stop.wait(1)
        except OSError:
            pass
        finally:
            s.close()


def _burst(path: str, stop: threading.Event) -> None:
    while not stop.is_set():
        socks = [s for s in (_connect(path, False) for _ in range(100)) if s is not None]
        stop.wait(0.5)
        for s in socks:
            s.close()


_KINDS = {"huge": [_huge_sender] * 2, "nonreader": [_non_reader] * 16,
          "unfinished": [_unfinished] * 8, "burst": [_burst]}


def _abuse(path: str, seconds: float, kinds: list[str]) -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=f, args=(path, stop), daemon=True)
               for k in kinds for f in _KINDS[k]]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-buffer", default=None, help="passed to qmpd (default: its default)")
    parser.add_argument("--only", nargs="+", choices=sorted(_KINDS), default=sorted(_KINDS),
                        help="run only these kinds of abuse")
    args = parser.parse_args()
    extra = ["--max-buffer", args.max_buffer] if args.max_buffer else []
    with tempfile.TemporaryDirectory(prefix="qmpd-abuse-") as tmp:
        server = qmpd_server(tmp, 1, *extra)
        path = server.sockets[0]
        pid = server.proc.pid
        witness = RawQMP(path)
        base_rss = _rss_kib(pid)[0]
        # The abusers run in another process, so the witness's figures are
        # the daemon's latency, not this process's GIL.
        abuser = mp.Process(target=_abuse, args=(path, args.seconds + 5, args.only), daemon=True)
        abuser.start()
        time.sleep(1)  # let the abuse ramp up before measuring
        lat: list[float] = []
        rss_max = 0
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            witness.roundtrip(b'{"execute":"query-status"}')
            lat.append(time.perf_counter() - t0)
            rss_max = max(rss_max, _rss_kib(pid)[0])
            time.sleep(0.005)
        abuser.terminate()
        peak = _rss_kib(pid)[1]
        witness.close()
        server.stop()
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    budget = args.max_buffer or "256M (default)"
    print(f"abuse for {args.seconds:g} s: 2 huge-message senders, 16 non-readers, "
          f"8 x 60 MiB unfinished, connect bursts of 100")
    print(f"witness query-status: n={len(lat)} p50={q[49] * 1000:.1f} ms p99={q[98] * 1000:.1f} ms "
          f"max={lat[-1] * 1000:.1f} ms   (target p99 < 50 ms)")
    print(f"daemon RSS: start {base_rss / 1024:.0f} MiB, max sampled {rss_max / 1024:.0f} MiB, "
          f"peak (VmHWM) {peak / 1024:.0f} MiB; --max-buffer {budget}   (target < 512 MiB)")


if __name__ == "__main__":
    main()
