"""``--state-keep-transient-bitmaps``: bitmaps added on raw nodes with
``persistent: false`` (as qmpbackup 0.67 ``--include-raw`` adds them) are
kept in the state directory and come back after a restart, still listed
``persistent: false``; without the option they are gone, as in QEMU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.test_persistent_bitmaps import SIZE, Env, _bitmaps, _cmd, _hmp, _ok
from tests.integration.test_persistent_bitmaps import env as env  # noqa: F401 (the fixture)
from tests.support.daemon import DaemonProcess, RawClient

KEEP = "--state-keep-transient-bitmaps"


def _transient(count: int) -> dict[str, object]:
    return {"name": "qmpbackup-drive0-x", "count": count, "granularity": 65536, "recording": True,
            "busy": False, "persistent": False}


def test_kept_across_quit_and_kill9(env: Env) -> None:
    c = env.start(KEEP)
    _ok(c, "transaction", actions=[{"type": "block-dirty-bitmap-add", "data": {
        "node": "d0", "name": "qmpbackup-drive0-x", "persistent": False}}])
    _hmp(c, 'qemu-io d0 "write -P 0x31 1M 64k"')
    assert _bitmaps(c) == [_transient(65536)]
    sha = _ok(c, "x-debug-block-dirty-bitmap-sha256", node="d0", name="qmpbackup-drive0-x")
    _ok(c, "quit")
    assert env.proc is not None and env.proc.proc.wait(10) == 0
    c = env.start(KEEP)
    assert _bitmaps(c) == [_transient(65536)]
    assert _ok(c, "x-debug-block-dirty-bitmap-sha256", node="d0", name="qmpbackup-drive0-x") == sha
    # kill -9: recovered from the journal like a persistent one (more, never less)
    _hmp(c, 'qemu-io d0 "write -P 0x32 5M 4k"')
    env.proc.proc.send_signal(signal.SIGKILL)
    env.proc.proc.wait(10)
    c = env.start(KEEP)
    [bm] = _bitmaps(c)
    assert bm["persistent"] is False and bm["recording"] and "inconsistent" not in bm
    assert int(bm["count"]) >= 65536 * 2  # type: ignore[call-overload]
    # removed is removed
    _ok(c, "block-dirty-bitmap-remove", node="d0", name="qmpbackup-drive0-x")
    env.proc.proc.send_signal(signal.SIGKILL)
    env.proc.proc.wait(10)
    c = env.start(KEEP)
    assert _bitmaps(c) == []


def test_without_the_option_they_are_gone_as_in_qemu(env: Env) -> None:
    c = env.start(KEEP)
    _ok(c, "block-dirty-bitmap-add", node="d0", name="qmpbackup-drive0-x", persistent=False)
    _ok(c, "block-dirty-bitmap-add", node="d0", name="p", persistent=True)
    _ok(c, "quit")
    assert env.proc is not None
    env.proc.proc.wait(10)
    c = env.start()  # restarted without the option: only the persistent one
    assert [b["name"] for b in _bitmaps(c)] == ["p"]
    _ok(c, "quit")
    env.proc.proc.wait(10)
    assert (f"transient bitmaps of {env.disk} (qmpbackup-drive0-x) dropped: "
            "--state-keep-transient-bitmaps is off") in env.stderr()


def test_dropped_not_inconsistent_when_the_image_changed(env: Env) -> None:
    c = env.start(KEEP)
    _ok(c, "block-dirty-bitmap-add", node="d0", name="qmpbackup-drive0-x", persistent=False)
    _ok(c, "quit")
    assert env.proc is not None
    env.proc.proc.wait(10)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 2M 4k", str(env.disk)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = env.start(KEEP)
    # Inconsistent is for persistent bitmaps (QEMU asserts it): it is gone,
    # and a client's next full backup can add it again.
    assert _bitmaps(c) == []
    _ok(c, "quit")
    env.proc.proc.wait(10)
    log = env.stderr()
    assert f"transient bitmaps of {env.disk} (qmpbackup-drive0-x) dropped: the image was modified" in log, log


def test_needs_state_dir(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "qmpd", "--socket", str(tmp_path / "s"), KEEP],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, "qmpd: --state-keep-transient-bitmaps needs --state-dir\n")


def test_qcow2_transient_bitmaps_stay_transient(tmp_path: Path, sock_dir: Path) -> None:
    """qcow2 keeps its own bitmaps; the option is about raw images only."""
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(disk), str(SIZE)], check=True, capture_output=True)
    args = ["--blockdev", json.dumps({"driver": "qcow2", "node-name": "d0",
                                      "file": {"driver": "file", "filename": str(disk)}}),
            "--state-dir", str(tmp_path / "state"), KEEP]
    proc = DaemonProcess(sock_dir, *args)
    try:
        c = RawClient(proc.path)
        _ok(c, "block-dirty-bitmap-add", node="d0", name="t", persistent=False)
        _ok(c, "quit")
        proc.proc.wait(10)
        proc = DaemonProcess(sock_dir, *args)
        c = RawClient(proc.path)
        assert _bitmaps(c) == []
        assert _cmd(c, "quit") == {"return": {}}
    finally:
        proc.stop()
