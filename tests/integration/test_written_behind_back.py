"""After kill -9 of qmpd, someone else (qemu-io here, QEMU in real life)
writes the image before qmpd starts again: the journal's bitmaps miss those
writes, so they must come back inconsistent, with a log line naming the
image (the write lease, qmpd.bitmap.journal).  Without a foreign write the
same crash recovers them consistent (test_persistent_bitmaps.py,
test_qcow2_journal.py, test_bitmap_crash.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpd.bitmap.journal import Lease, decode_lease
from tests.integration.test_persistent_bitmaps import _bitmaps, _hmp, _ok
from tests.support.daemon import DaemonProcess, RawClient

SIZE = 16 << 20


class Env:
    def __init__(self, tmp: Path, sock_dir: Path, fmt: str) -> None:
        self.sock_dir, self.fmt = sock_dir, fmt
        self.disk = tmp / f"disk.{fmt}"
        self.state = tmp / "state"
        subprocess.run(["qemu-img", "create", "-f", fmt, str(self.disk), str(SIZE)],
                       check=True, capture_output=True)
        self.proc: DaemonProcess | None = None

    def start(self, *extra: str) -> RawClient:
        for stale in ("qmpd.sock", "qmpd.sock.pid"):  # left behind by kill -9
            if os.path.exists(self.sock_dir / stale):
                os.unlink(self.sock_dir / stale)
        node = {"driver": self.fmt, "node-name": "d0",
                "file": {"driver": "file", "filename": str(self.disk)}}
        self.proc = DaemonProcess(self.sock_dir, "--blockdev", json.dumps(node),
                                  "--state-dir", str(self.state), *extra)
        return RawClient(self.proc.path)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)

    def quit(self, c: RawClient) -> str:
        """Clean quit; :return: the daemon's log."""
        _ok(c, "quit")
        assert self.proc is not None and self.proc.proc.wait(10) == 0
        assert self.proc.proc.stderr is not None
        return self.proc.proc.stderr.read().decode()

    def lease(self) -> Lease | None:
        [qwi] = self.state.glob("*.qwi")
        return decode_lease(qwi.read_bytes())

    def wait_lease(self, held: bool) -> Lease:
        """Until the lease on disk is held/released (a lazy store releases
        it once no write is in flight)."""
        deadline = time.monotonic() + 30
        while True:
            lease = self.lease()
            if lease is not None and lease.held == held:
                return lease
            assert time.monotonic() < deadline, lease

    def qemu_io(self, cmd: str) -> None:
        r = subprocess.run(["qemu-io", "-f", self.fmt, "-c", cmd, str(self.disk)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr


@pytest.fixture(params=["raw", "qcow2"])
def env(request: pytest.FixtureRequest, tmp_path: Path, sock_dir: Path) -> Iterator[Env]:
    e = Env(tmp_path, sock_dir, request.param)
    try:
        yield e
    finally:
        if e.proc is not None:
            e.proc.stop()


def _written(env: Env) -> RawClient:
    """A persistent bitmap with guest-style writes, the daemon running
    (qcow2: after a clean restart, so the image has the bitmap in use)."""
    c = env.start("--state-flush-interval", "0.05")
    _ok(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
    if env.fmt == "qcow2":
        env.quit(c)
        c = env.start("--state-flush-interval", "0.05")
    _hmp(c, 'qemu-io d0 "write -P 0x41 1M 64k"')
    _hmp(c, 'qemu-io d0 "write -P 0x42 6M 128k"')
    return c


def _expect_inconsistent(env: Env) -> None:
    c = env.start()
    [bm] = _bitmaps(c)
    assert bm["persistent"] and bm.get("inconsistent") is True and not bm["recording"], bm
    log = env.quit(c)
    if env.fmt == "raw":
        line = f"persistent bitmaps of {env.disk} (b0) marked inconsistent: the image was modified after qmpd"
    else:
        line = f"qcow2 bitmaps of {env.disk} (b0) left inconsistent: the image was modified after qmpd"
    assert line in log, log


def test_kill9_then_foreign_write_marks_inconsistent(env: Env) -> None:
    _written(env)
    env.wait_lease(held=False)  # qmpd idle: the lazy store released the lease
    env.kill()
    env.qemu_io("write -P 0x55 9M 4k")
    _expect_inconsistent(env)


def test_kill9_during_writes_then_foreign_write_after_the_lease(env: Env) -> None:
    """Killed while the lease was held (no store since the writes): a
    foreign write stamped after the lease's end is seen."""
    c = env.start("--state-flush-interval", "3600", "--state-write-lease", "0.2")
    _ok(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
    if env.fmt == "qcow2":
        env.quit(c)
        c = env.start("--state-flush-interval", "3600", "--state-write-lease", "0.2")
    _hmp(c, 'qemu-io d0 "write -P 0x41 1M 64k"')
    lease = env.wait_lease(held=True)
    env.kill()
    while time.time_ns() <= lease.until:  # the lease ends (0.2 s)
        pass
    env.qemu_io("write -P 0x55 9M 4k")
    _expect_inconsistent(env)


def test_kill9_without_foreign_write_recovers(env: Env) -> None:
    _written(env)
    env.wait_lease(held=False)
    env.kill()
    c = env.start()
    [bm] = _bitmaps(c)
    assert bm["persistent"] and bm["recording"] and "inconsistent" not in bm, bm
    assert bm["count"] >= (64 << 10) + (128 << 10)
    env.quit(c)
