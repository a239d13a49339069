#!/usr/bin/env python3
"""qmpbackup (github abbbi/qmpbackup, v0.67, unmodified) against qmpd.

    python tools/qmpbackup_flow.py [--qmpbackup PATH] [--workdir DIR]

Starts qmpd as QEMU is started for qmpbackup (``-drive if=none,id=drive0,...
-device virtio-blk-pci,drive=drive0,id=vblk0 -qmp unix:...``), then runs
``qmpbackup backup --include-raw`` three times: a full backup, guest-style
writes (HMP ``qemu-io drive0``, through the BlockBackend), an incremental,
more writes, a second incremental.  It checks, byte for byte:

* the full image equals the disk at the full backup's point in time;
* each incremental holds exactly the 64 KiB clusters written since the
  previous backup (their contents as they were then) and nothing else
  (raw incrementals are sparse full-size files: only zeros elsewhere);
* full + incrementals, applied in order, equal the final disk.

``--restart quit|kill`` restarts the daemon (``--state-dir``) between the
two incrementals, by ``quit`` or kill -9: the chain must continue (no new
full backup).  After kill -9 the second incremental may hold more clusters
than were written (the journal's bitmap holds more, never less); each of
them must equal the disk then.  qmpbackup adds raw disks' bitmaps with
``persistent: false``, so for ``--format raw`` the daemon also gets
``--state-keep-transient-bitmaps``.

Exit status 0 when all hold.  qmpbackup needs ``query-block`` with a
``qdev``, ``qom-set`` of the device's ``drive``, ``copy-before-write`` and
``snapshot-access``; tests/scenario/test_qmpbackup.py runs this script when
qmpbackup is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64 << 20
CLUSTER = 64 << 10
#: (pattern, offset, length) guest writes before each incremental.
WRITES = [
    [(0x31, 0x10000, 64 << 10), (0x32, 5 << 20, 200 << 10), (0x33, SIZE - CLUSTER, CLUSTER)],
    [(0x41, 0x10000 + 4096, 4096), (0x42, 40 << 20, 1 << 20)],
]


class Qmp:
    """A minimal blocking QMP client (HMP qemu-io for guest writes)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        deadline = time.monotonic() + 30
        while True:  # the socket file exists a moment before listen()
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.sock.makefile("rb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> object:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode())
        while True:
            msg = json.loads(self.f.readline())
            if "event" not in msg:
                if "error" in msg:
                    raise RuntimeError(f"{name}: {msg['error']}")
                return msg["return"]

    def close(self) -> None:
        self.sock.close()


def _clusters(data: bytes) -> set[int]:
    return {i for i in range(0, len(data), CLUSTER) if data[i:i + CLUSTER].count(0) != CLUSTER}


def _raw_view(path: Path, fmt: str) -> bytes:
    """The guest-visible bytes of an image (qcow2 through qemu-img)."""
    if fmt == "raw":
        return path.read_bytes()
    out = path.with_name(path.name + ".rawview")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)],
                   check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _start(disk: Path, fmt: str, sock: str, state: Path | None) -> subprocess.Popen[bytes]:
    if os.path.exists(sock):
        os.unlink(sock)  # left behind by kill -9
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    extra = ["--state-dir", str(state)] if state is not None else []
    if state is not None and fmt == "raw":
        # qmpbackup adds raw disks' bitmaps with persistent: false.
        extra.append("--state-keep-transient-bitmaps")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpd", "-machine", "pc", "-nodefaults", "-display", "none",
         "-drive", f"if=none,id=drive0,file={disk},format={fmt}",
         "-device", "virtio-blk-pci,drive=drive0,id=vblk0",
         "-qmp", f"unix:{sock},server=on,wait=off", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("qmpd did not start: " + (proc.stderr.read().decode() if proc.stderr else ""))
        time.sleep(0.02)
    return proc


def run(qmpbackup: str, work: Path, fmt: str = "raw", restart: str = "none") -> list[str]:
    """``restart``: none, quit (clean) or kill (kill -9) of the daemon,
    with ``--state-dir``, between the first and the second incremental.

    :return: failures (empty when the flow is right)."""
    disk, sock, target = work / f"disk.{fmt}", str(work / "qmp.sock"), work / "backup"
    raw = work / "disk.raw-src"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(b"\x11" * (1 << 20))
        f.seek(10 << 20)
        f.write(b"\x22" * (512 << 10))
    if fmt == "raw":
        raw.rename(disk)
    else:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(disk)],
                       check=True, capture_output=True)
        raw.unlink()
    state = work / "state" if restart != "none" else None
    proc = _start(disk, fmt, sock, state)
    failures: list[str] = []
    try:
        qmp = Qmp(sock)
        states: list[bytes] = []
        for level in ("full", "inc", "inc"):
            if len(states) == 2 and restart != "none":
                if restart == "quit":
                    qmp.cmd("quit")
                    proc.wait(30)
                else:
                    proc.kill()
                    proc.wait(30)
                qmp.close()
                proc = _start(disk, fmt, sock, state)
                qmp = Qmp(sock)
            if states:
                # qmpbackup names images by the second (INC-<epoch>-disk.img):
                # two in the same second would share a name.  Not a sync wait.
                time.sleep(1.05 - time.time() % 1)
                for pattern, off, length in WRITES[len(states) - 1]:
                    qmp.cmd("human-monitor-command",
                            **{"command-line": f'qemu-io drive0 "write -P {pattern:#x} {off} {length}"'})
            states.append(_raw_view(disk, fmt))
            out = subprocess.run([qmpbackup, "--socket", sock, "backup", "--level", level,
                                  "--target", str(target), "--include-raw"],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                failures.append(f"qmpbackup {level} exited {out.returncode}: {(out.stderr + out.stdout)[-2000:]}")
                return failures
        qmp.close()
    finally:
        proc.terminate()
        proc.wait(30)
    images = sorted((target / disk.name).iterdir(), key=lambda p: p.stat().st_mtime_ns)
    images = [p for p in images if not p.name.endswith((".partial", ".config"))]
    names = [p.name.split("-", 1)[0] for p in images]
    if names != ["FULL", "INC", "INC"]:
        return [f"backup images {[p.name for p in images]}"]
    full = _raw_view(images[0], fmt)
    if full != states[0]:
        failures.append("full image differs from the disk at its point in time")
    restored = bytearray(full)
    for n, (img, writes) in enumerate(zip(images[1:], WRITES), 1):
        data = _raw_view(img, fmt)
        want: set[int] = set()
        for _, off, length in writes:
            want |= set(range(off - off % CLUSTER, off + length, CLUSTER))
        got = _clusters(data)
        if restart == "kill" and n == 2 and got >= want:
            # After kill -9 the bitmap may hold more, never less (a clear
            # needs no sync; coarse write-intent bits): the extra clusters
            # must still equal the disk then (checked below).
            extra = got - want
            print(f"incremental {n}: {len(extra)} extra clusters after kill -9")
            want = got
        if got != want:
            failures.append(f"incremental {n}: clusters {sorted(got)} != written {sorted(want)}")
        for c in want:
            if data[c:c + CLUSTER] != states[n][c:c + CLUSTER]:
                failures.append(f"incremental {n}: cluster {c:#x} differs from the disk then")
            restored[c:c + CLUSTER] = data[c:c + CLUSTER]
        print(f"incremental {n}: {len(got)} clusters ({len(got) * CLUSTER} bytes)")
    if bytes(restored) != states[-1]:
        failures.append("full + incrementals differ from the final disk")
    print(f"full: {len(full)} bytes, {len(_clusters(full))} data clusters")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qmpbackup", default=shutil.which("qmpbackup"), help="the qmpbackup script")
    ap.add_argument("--workdir", help="keep the files here (default: a temporary directory)")
    ap.add_argument("--format", default="raw", choices=["raw", "qcow2"], help="the disk's format")
    ap.add_argument("--restart", default="none", choices=["none", "quit", "kill"],
                    help="restart the daemon (with --state-dir) before the second incremental")
    opts = ap.parse_args()
    if not opts.qmpbackup:
        print("qmpbackup not found (pip install git+https://github.com/abbbi/qmpbackup@v0.67)")
        return 2
    with tempfile.TemporaryDirectory(prefix="qmpbackup-") as tmp:
        work = Path(opts.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        failures = run(opts.qmpbackup, work, opts.format, opts.restart)
    for f in failures:
        print("FAIL:", f)
    print("qmpbackup flow: " + ("OK" if not failures else f"{len(failures)} failures"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
