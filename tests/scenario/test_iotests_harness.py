"""QEMU 7.2's own iotests harness drives qmpd as ``QEMU_PROG``: ``./check -raw 055``
and ``./check -qcow2 257``.

The harness (an unmodified copy in ../shared/qemu-iotests-7.2) probes the
binary (``-machine help``, ``-drive format=help``, ``-M none -device help``),
then starts one qmpd per test case with QEMU's command line
(``-chardev socket,...`` in client mode, ``-mon``, ``-qtest``, ``-drive
if=virtio,...blkdebug::...``) and runs 055's 40 cases: drive-backup and
blockdev-backup, cancel, pause with blkdebug breakpoints, set-speed,
block_resize refusals, transactions.

055's six ``TestCompressedToQcow2`` cases back up to a qcow2 target with
``compress=true``; they need a qcow2 driver.  Until one is registered they
are the only failures allowed, and they must fail for that reason.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _harness() -> Path | None:
    for base in REPO.parents:
        cand = base / "shared" / "qemu-iotests-7.2"
        if (cand / "tests" / "qemu-iotests" / "check").exists():
            return cand
    return None


def _run_check(tmp_path: Path, fmt: str, test: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Copy the harness into ``tmp_path``, run ``./check -FMT TEST`` with
    qmpd as QEMU_PROG; :return: the process and the harness directory."""
    src = _harness()
    if src is None:
        pytest.skip("../shared/qemu-iotests-7.2 is not there")
    tree = tmp_path / "q"
    shutil.copytree(src, tree, symlinks=True)
    launcher = tmp_path / "qmpd-launch"
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m qmpd \"$@\"\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env.update(
        QEMU_PROG=str(launcher),
        QEMU_IMG_PROG=shutil.which("qemu-img") or "qemu-img",
        QEMU_IO_PROG=shutil.which("qemu-io") or "qemu-io",
        QEMU_NBD_PROG=shutil.which("qemu-nbd") or "qemu-nbd",
        QSD_PROG=shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
        PYTHON=sys.executable,
    )
    env.pop("PYTHONPATH", None)
    workdir = tree / "tests" / "qemu-iotests"
    proc = subprocess.run(["./check", f"-{fmt}", test], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, workdir


def _bad_output(workdir: Path, test: str) -> str:
    bad = workdir / "scratch" / f"{test}.out.bad"
    return bad.read_text(errors="replace") if bad.exists() else "(no .out.bad)"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_check_raw_055(tmp_path: Path) -> None:
    """iotest 055 unmodified (issue 9): all 40 cases, the six compressed
    qcow2 targets included."""
    proc, workdir = _run_check(tmp_path, "raw", "055")
    assert proc.returncode == 0 and "Passed all 1 iotests" in proc.stdout, \
        proc.stdout + proc.stderr + _bad_output(workdir, "055")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_check_qcow2_257(tmp_path: Path) -> None:
    """iotest 257 unmodified (issue 10): bitmap-mode never/on-success/always
    x sync bitmap/full/top x no failure/simulated (blkdebug read_aio under a
    qcow2 node)/intermediate (cancel); every reply, event and bitmap count
    against QEMU's 257.out, and the qemu-img compare verifications."""
    proc, workdir = _run_check(tmp_path, "qcow2", "257")
    assert proc.returncode == 0, proc.stdout + proc.stderr + _bad_output(workdir, "257")
    assert "Passed all 1 iotests" in proc.stdout, proc.stdout
    assert "Not run" not in proc.stdout, proc.stdout
