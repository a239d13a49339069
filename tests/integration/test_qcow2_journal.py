"""qcow2 persistent bitmaps through the ``--state-dir`` journal (issue 12):
after kill -9 QEMU (and qmpd without a state directory) finds the bitmap
``in_use`` and loads it inconsistent; with a state directory qmpd recovers
it from the journal, consistent and holding every cluster written.  The
image stays valid for QEMU throughout (``qemu-img check``, ``qemu-img info``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_persistent_bitmaps import _bitmaps, _hmp, _ok, _wait_event
from tests.support.daemon import DaemonProcess, RawClient

SIZE = 16 << 20


class Env:
    def __init__(self, tmp: Path, sock_dir: Path) -> None:
        self.tmp, self.sock_dir = tmp, sock_dir
        self.disk = tmp / "disk.qcow2"
        self.state = tmp / "state"
        self.target = tmp / "full.img"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(self.disk), str(SIZE)],
                       check=True, capture_output=True)
        with open(self.target, "wb") as f:
            f.truncate(SIZE)
        self.proc: DaemonProcess | None = None

    def start(self, *, state: bool = True) -> RawClient:
        for stale in ("qmpd.sock", "qmpd.sock.pid"):  # left behind by kill -9
            if os.path.exists(self.sock_dir / stale):
                os.unlink(self.sock_dir / stale)
        args = ["--blockdev", json.dumps({"driver": "qcow2", "node-name": "d0",
                                          "file": {"driver": "file", "filename": str(self.disk)}})]
        if state:
            args += ["--state-dir", str(self.state)]
        self.proc = DaemonProcess(self.sock_dir, *args)
        return RawClient(self.proc.path)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)

    def add_target(self, c: RawClient) -> None:
        _ok(c, "blockdev-add", driver="raw", node_name="t0",
            file={"driver": "file", "filename": str(self.target)})

    def check_image(self, *, in_use: bool) -> None:
        r = subprocess.run(["qemu-img", "check", "-U", str(self.disk)], capture_output=True, text=True)
        assert r.returncode in ((0, 3) if in_use else (0,)) and "ERROR" not in r.stdout, r.stdout
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(self.disk)],
                                         check=True, capture_output=True, text=True).stdout)
        [bm] = info["format-specific"]["data"]["bitmaps"]
        assert bm["name"] == "b0" and ("in-use" in bm["flags"]) == in_use, bm

    def same_as_disk(self) -> bool:
        r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                            str(self.target), str(self.disk)], capture_output=True, text=True)
        assert r.returncode in (0, 1), r.stderr
        return r.returncode == 0


@pytest.fixture
def env(tmp_path: Path, sock_dir: Path) -> Iterator[Env]:
    e = Env(tmp_path, sock_dir)
    try:
        yield e
    finally:
        if e.proc is not None:
            e.proc.stop()


def _full(env: Env, c: RawClient) -> None:
    env.add_target(c)
    _ok(c, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0", "persistent": True}},
        {"type": "blockdev-backup", "data": {"device": "d0", "target": "t0", "sync": "full", "job-id": "f"}}])
    _wait_event(c, "BLOCK_JOB_COMPLETED")


def _setup(env: Env, *, state: bool = True, state_before: bool | None = None) -> RawClient:
    """Full backup with a new persistent bitmap, then a clean quit (QEMU and
    qmpd write a qcow2's bitmaps at close) and a restart, which marks the
    bitmap in use in the image."""
    c = env.start(state=state if state_before is None else state_before)
    _full(env, c)
    _ok(c, "quit")
    assert env.proc is not None
    env.proc.proc.wait(10)
    env.check_image(in_use=False)
    return env.start(state=state)


def _incremental(env: Env, c: RawClient, job: str) -> None:
    env.add_target(c)
    _ok(c, "blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="b0", job_id=job)
    ev = _wait_event(c, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"], ev
    _ok(c, "blockdev-del", node_name="t0")


def test_without_state_dir_in_use_bitmap_is_inconsistent_as_in_qemu(env: Env) -> None:
    c = _setup(env, state=False)
    _hmp(c, 'qemu-io d0 "write -P 0x31 1M 64k"')
    env.kill()
    env.check_image(in_use=True)
    c = env.start(state=False)
    [bm] = _bitmaps(c)
    assert bm["inconsistent"] is True and bm["persistent"] and not bm["recording"]


@pytest.mark.parametrize("state_before", [True, False], ids=["journaled", "state-dir-added-later"])
def test_kill9_after_writes_recovers_qcow2_bitmap(env: Env, state_before: bool) -> None:
    c = _setup(env, state_before=state_before)
    _hmp(c, 'qemu-io d0 "write -P 0x41 3M 4k"')
    _hmp(c, 'qemu-io d0 "write -P 0x42 9M 128k"')
    env.kill()
    env.check_image(in_use=True)
    c = env.start()
    [bm] = _bitmaps(c)
    assert bm["persistent"] and bm["recording"] and "inconsistent" not in bm
    assert bm["count"] >= 65536 + 131072
    _incremental(env, c, "i")
    assert env.same_as_disk()
    assert _bitmaps(c)[0]["count"] == 0
    _ok(c, "quit")
    assert env.proc is not None
    env.proc.proc.wait(10)
    env.check_image(in_use=False)
    # The clean close: the image is authoritative again.
    c = env.start()
    [bm] = _bitmaps(c)
    assert bm["count"] == 0 and "inconsistent" not in bm and bm["recording"]


def _nbd_writer(env: Env, c: RawClient, rng: random.Random) -> subprocess.Popen[bytes]:
    nbd = str(env.sock_dir / "nbd.sock")
    if os.path.exists(nbd):
        os.unlink(nbd)
    _ok(c, "nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    _ok(c, "block-export-add", type="nbd", id="e0", node_name="d0", writable=True)
    cmds = []
    for _ in range(400):
        off = rng.randrange(0, SIZE - (256 << 10)) & ~4095
        cmds += ["-c", f"aio_write -P {rng.randrange(1, 255)} {off} {rng.choice([4096, 65536, 200704])}"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, "-c", "aio_flush",
                             f"nbd+unix:///d0?socket={nbd}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill9_during_nbd_writes_repeated(env: Env) -> None:
    """kill -9 while an NBD client has writes in flight, several times:
    after each restart the bitmap is consistent and an incremental backup
    into the previous backup equals the disk byte for byte."""
    rng = random.Random(int(os.environ.get("QMPD_CRASH_SEED", "12")))
    c = _setup(env)
    for round_ in range(int(os.environ.get("QMPD_QCOW2_CRASH_CYCLES", "6"))):
        writer = _nbd_writer(env, c, rng)
        # Kill once the writes are landing (observed, not timed).
        while _bitmaps(c)[0]["count"] == 0:
            pass
        env.kill()
        writer.wait(30)
        env.check_image(in_use=True)
        c = env.start()
        [bm] = _bitmaps(c)
        assert bm["persistent"] and bm["recording"] and "inconsistent" not in bm, (round_, bm)
        assert bm["count"] > 0
        _incremental(env, c, f"i{round_}")
        assert env.same_as_disk(), round_
