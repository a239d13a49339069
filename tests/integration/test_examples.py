"""The examples run against a live daemon and print what they promise."""

from __future__ import annotations

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


def test_full_then_incremental(qmpd_proc: DaemonProcess, tmp_path: Path) -> None:
    lines = _example("full_then_incremental.py", qmpd_proc, tmp_path)
    assert lines == [
        "full backup: 67108864 of 67108864 bytes",
        "bitmap0 before the incremental: 262144 dirty bytes",
        "incremental backup: 262144 of 262144 bytes",
        "restored image matches the live disk",
    ]


def test_resume_failed_backup(qmpd_proc: DaemonProcess, tmp_path: Path) -> None:
    lines = _example("resume_failed_backup.py", qmpd_proc, tmp_path)
    # with max-workers 1 the chunks are {0}, {3}, {17}, {64,65}, {200}, {511}...:
    # the sixth read fails after 6 clusters were copied
    assert lines == [
        "dirty before the backup: 12 clusters",
        "first run: Input/output error, copied 393216 of 786432 bytes",
        "still dirty after the failure: 6 clusters",
        "second run: ok, copied 393216 of 393216 bytes",
        "target matches the source on every written cluster",
    ]


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
