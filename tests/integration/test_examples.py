"""The examples run against a live daemon and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import DaemonProcess, RawClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hello(qmpd_proc: DaemonProcess) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "hello.py"), qmpd_proc.path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "QEMU 9.0.0 (qmpd-0.1.0)"
    assert "query-version" in lines[1:] and "qmp_capabilities" in lines[1:]
    assert lines[1:] == sorted(lines[1:])


def _example(name: str, proc: DaemonProcess, workdir: Path) -> list[str]:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), proc.path, str(workdir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each data extent of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop - start))
            pos = stop
    return out


def _numbers(line: str) -> list[int]:
    return [int(w) for w in line.replace(":", " ").split() if w.isdigit()]


def test_full_then_incremental(qmpd_proc: DaemonProcess, tmp_path: Path) -> None:
    lines = _example("full_then_incremental.py", qmpd_proc, tmp_path)
    disk = (tmp_path / "fti-disk.img").read_bytes()
    full, inc = tmp_path / "fti-full.img", tmp_path / "fti-inc.img"
    # the restore the example did, checked here on the files themselves
    assert (tmp_path / "fti-restored.img").read_bytes() == disk
    # the incremental holds exactly the clusters written after the full
    # backup, with the live data; everything else there is a hole
    later = [(0x10000, 65536), (5 << 20, 65536), (33 << 20, 65536), ((64 << 20) - (128 << 10), 65536)]
    assert _data_extents(inc) == later
    inc_bytes = inc.read_bytes()
    assert all(inc_bytes[o:o + n] == disk[o:o + n] == b"\xaa" * n for o, n in later)
    # the full backup is the disk as it was before those writes
    full_bytes = bytearray(full.read_bytes())
    for o, n in later:
        full_bytes[o:o + n] = disk[o:o + n]
    assert bytes(full_bytes) == disk and full.read_bytes()[:1 << 20] != disk[:1 << 20]
    # what the example printed agrees with the images
    full_line, dirty_line, inc_line, last = lines
    assert _numbers(full_line) == [len(disk), len(disk)]
    assert _numbers(dirty_line)[-1] == _numbers(inc_line)[0] == _numbers(inc_line)[1] == sum(n for _, n in later)
    assert last == "restored image matches the live disk"


def test_resume_failed_backup(qmpd_proc: DaemonProcess, tmp_path: Path) -> None:
    lines = _example("resume_failed_backup.py", qmpd_proc, tmp_path)
    cluster = 64 << 10
    written = [0, 3, 17, 64, 65, 200, 511, 700, 701, 702, 900, 1023]  # as the example writes them
    src, dst = (tmp_path / "rfb-disk.img").read_bytes(), (tmp_path / "rfb-target.img").read_bytes()
    # after the failed run and the resumed one, every written cluster is in
    # the target, and nothing else was copied
    for c in written:
        assert dst[c * cluster:(c + 1) * cluster] == src[c * cluster:(c + 1) * cluster] == \
            bytes([c % 251 + 1]) * cluster, c
    assert [o // cluster for o, _ in _data_extents(tmp_path / "rfb-target.img")] == \
        [0, 3, 17, 64, 200, 511, 700, 900, 1023]  # 64-65 and 700-702 are runs
    # the printed figures add up: the second run copies exactly what the
    # first left dirty, and the two copy every written cluster once
    dirty, first, left, second, last = lines
    assert _numbers(dirty) == [len(written)]
    assert first.startswith("first run: Input/output error")
    copied1, total1 = _numbers(first)
    (left_clusters,) = _numbers(left)
    copied2, total2 = _numbers(second)
    assert second.startswith("second run: ok") and total1 == len(written) * cluster
    assert 0 < copied1 < total1 and copied2 == total2 == left_clusters * cluster == total1 - copied1
    assert last == "target matches the source on every written cluster"


def test_examples_back_to_back_on_one_daemon(qmpd_proc: DaemonProcess, tmp_path: Path) -> None:
    """Each example owns its node names and files and cleans up, even run
    repeatedly and in the same directory; without WORKDIR it uses a temporary one."""
    full = _example("full_then_incremental.py", qmpd_proc, tmp_path)
    resume = _example("resume_failed_backup.py", qmpd_proc, tmp_path)
    assert _example("full_then_incremental.py", qmpd_proc, tmp_path) == full
    assert _example("resume_failed_backup.py", qmpd_proc, tmp_path) == resume
    out = subprocess.run([sys.executable, str(EXAMPLES / "full_then_incremental.py"), qmpd_proc.path],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines() == full, out.stderr
    client = RawClient(qmpd_proc.path)
    try:
        assert client.cmd("query-named-block-nodes") == {"return": [], "id": "t"}
        assert client.cmd("query-jobs") == {"return": [], "id": "t"}
    finally:
        client.close()
