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
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QCOW2_CASES = {f"TestCompressedToQcow2.test_{kind}_{cmd}"
               for kind in ("complete_compress", "compress_cancel", "compress_pause")
               for cmd in ("drive_backup", "blockdev_backup")}


def _harness() -> Path | None:
    for base in REPO.parents:
        cand = base / "shared" / "qemu-iotests-7.2"
        if (cand / "tests" / "qemu-iotests" / "check").exists():
            return cand
    return None


def _failed_cases(out_bad: Path) -> set[str]:
    text = out_bad.read_text(errors="replace")
    return set(re.findall(r"^(?:FAIL|ERROR): test_\w+ \(__main__\.(\w+\.test_\w+)\)", text, re.M))


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
    proc, workdir = _run_check(tmp_path, "raw", "055")
    if proc.returncode == 0:
        assert "Passed all 1 iotests" in proc.stdout, proc.stdout
        return
    out_bad = workdir / "scratch" / "055.out.bad"
    assert out_bad.exists(), proc.stdout + proc.stderr
    failed = _failed_cases(out_bad)
    from qmpd.block.drivers import DRIVERS

    assert "qcow2" not in DRIVERS, f"055 failed with a qcow2 driver present: {sorted(failed)}"
    assert failed == QCOW2_CASES, out_bad.read_text()
    assert "Ran 40 tests" in out_bad.read_text()


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
