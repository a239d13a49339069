"""qmpbackup 0.67, unmodified, against qmpd: full + two incrementals with
guest writes in between, checked byte for byte (tools/qmpbackup_flow.py).

Runs when qmpbackup is installed (on PATH, or ``QMPBACKUP=/path/to/qmpbackup``);
it is not on PyPI: ``pip install git+https://github.com/abbbi/qmpbackup@v0.67``
plus its requirements (qemu.qmp, colorlog).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_qmpbackup_full_and_two_incrementals(tmp_path: Path) -> None:
    qmpbackup = os.environ.get("QMPBACKUP") or shutil.which("qmpbackup")
    if not qmpbackup:
        pytest.skip("qmpbackup is not installed")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "qmpbackup_flow.py"),
                          "--qmpbackup", qmpbackup, "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "qmpbackup flow: OK"


@pytest.mark.slow
@pytest.mark.timeout(700)
@pytest.mark.parametrize("restart", ["quit", "kill"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_qmpbackup_chain_continues_across_restart(tmp_path: Path, fmt: str, restart: str) -> None:
    """Full, writes, incremental, daemon restart with ``--state-dir`` (clean
    quit, or kill -9: the bitmap is recovered from the journal instead of
    coming back inconsistent or lost), writes, incremental: the chain
    continues (no new full) and full + incrementals equal the disk byte for
    byte.  qmpbackup 0.67 adds its bitmaps on raw disks with ``persistent:
    false`` (libqmpbackup/qmpcommon.py), so the raw flow runs the daemon
    with ``--state-keep-transient-bitmaps``."""
    qmpbackup = os.environ.get("QMPBACKUP") or shutil.which("qmpbackup")
    if not qmpbackup:
        pytest.skip("qmpbackup is not installed")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "qmpbackup_flow.py"),
                          "--qmpbackup", qmpbackup, "--workdir", str(tmp_path),
                          "--format", fmt, "--restart", restart],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "qmpbackup flow: OK"
