"""Persistent bitmaps on raw images with ``--state-dir`` (issue 12), over a
real socket with the daemon as a subprocess: stored on blockdev-del, quit
and SIGTERM, recovered after kill -9, distrusted when the image changed
behind qmpd's back; ``__org.qmpd_query-instance`` shows restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, RawClient

SIZE = 8 << 20
#: Events read while waiting for a reply, per client.
_EVENTS: dict[int, list[dict[str, Any]]] = {}


def _cmd(c: RawClient, command: str, /, **args: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"execute": command}
    if args:
        req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
    c.send(json.dumps(req))
    while True:
        msg = c.read_msg()
        if "event" not in msg:
            return msg
        _EVENTS.setdefault(id(c), []).append(msg)


def _ok(c: RawClient, command: str, /, **args: Any) -> Any:
    reply = _cmd(c, command, **args)
    assert "return" in reply, reply
    return reply["return"]


def _wait_event(c: RawClient, name: str) -> dict[str, Any]:
    seen = _EVENTS.setdefault(id(c), [])
    for i, ev in enumerate(seen):
        if ev["event"] == name:
            return seen.pop(i)
    while True:
        msg = c.read_msg()
        if msg.get("event") == name:
            return msg


def _hmp(c: RawClient, line: str) -> str:
    out: str = _ok(c, "human-monitor-command", command_line=line)
    return out


def _bitmaps(c: RawClient, node: str = "d0") -> list[dict[str, Any]]:
    for n in _ok(c, "query-named-block-nodes"):
        if n["node-name"] == node:
            return list(n.get("dirty-bitmaps", []))
    raise AssertionError(f"no node {node}")


class Env:
    def __init__(self, tmp: Path, sock_dir: Path) -> None:
        self.tmp, self.sock_dir = tmp, sock_dir
        self.disk = tmp / "disk.img"
        self.state = tmp / "state"
        with open(self.disk, "wb") as f:
            f.truncate(SIZE)
        self.proc: DaemonProcess | None = None

    def start(self, *extra: str, state: bool = True) -> RawClient:
        for stale in ("qmpd.sock", "qmpd.sock.pid"):  # left behind by kill -9
            if os.path.exists(self.sock_dir / stale):
                os.unlink(self.sock_dir / stale)
        args = ["--blockdev", json.dumps({"driver": "raw", "node-name": "d0",
                                          "file": {"driver": "file", "filename": str(self.disk)}})]
        if state:
            args += ["--state-dir", str(self.state)]
        self.proc = DaemonProcess(self.sock_dir, *args, *extra)
        return RawClient(self.proc.path)

    def stderr(self) -> str:
        assert self.proc is not None and self.proc.proc.stderr is not None
        return self.proc.proc.stderr.read().decode()


@pytest.fixture
def env(tmp_path: Path, sock_dir: Path) -> Iterator[Env]:
    e = Env(tmp_path, sock_dir)
    try:
        yield e
    finally:
        if e.proc is not None:
            e.proc.stop()


def test_refused_without_state_dir(env: Env) -> None:
    c = env.start(state=False)
    assert _cmd(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True) == {"error": {
        "class": "GenericError", "desc": "Can't store persistent bitmaps to d0: Operation not supported"}}
    info = _ok(c, "__org.qmpd_query-instance")
    assert "state-dir" not in info


@pytest.mark.slow
def test_stored_on_blockdev_del_quit_and_sigterm(env: Env) -> None:
    c = env.start()
    assert stat.S_IMODE(os.stat(env.state).st_mode) == 0o700
    _ok(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True, granularity=4096)
    _ok(c, "block-dirty-bitmap-add", node="d0", name="off", persistent=True, disabled=True)
    _ok(c, "block-dirty-bitmap-add", node="d0", name="tmp")
    _hmp(c, 'qemu-io d0 "write -P 0x11 1M 12k"')
    _hmp(c, 'qemu-io d0 "write -P 0x12 7M 512"')
    sha = _ok(c, "x-debug-block-dirty-bitmap-sha256", node="d0", name="b0")["sha256"]
    off = {"name": "off", "count": 0, "granularity": 65536, "recording": False, "busy": False, "persistent": True}
    b0 = {"name": "b0", "count": 16384, "granularity": 4096, "recording": True, "busy": False, "persistent": True}
    assert _bitmaps(c) == [
        {"name": "tmp", "count": 131072, "granularity": 65536, "recording": True, "busy": False,
         "persistent": False}, off, b0]
    expect = [b0, off]  # reloaded in QEMU's order (test_persistent_vs_qemu.py)
    for name in os.listdir(env.state):
        assert stat.S_IMODE(os.stat(env.state / name).st_mode) == 0o600
    # blockdev-del stores, blockdev-add loads
    _ok(c, "blockdev-del", node_name="d0")
    _ok(c, "blockdev-add", driver="raw", node_name="d0", file={"driver": "file", "filename": str(env.disk)})
    assert _bitmaps(c) == expect
    assert _ok(c, "x-debug-block-dirty-bitmap-sha256", node="d0", name="b0")["sha256"] == sha
    # quit stores
    _ok(c, "quit")
    assert env.proc is not None and env.proc.proc.wait(10) == 0
    c = env.start()
    assert _bitmaps(c) == expect
    # SIGTERM stores
    assert env.proc is not None
    env.proc.proc.send_signal(signal.SIGTERM)
    assert env.proc.proc.wait(10) == 0
    c = env.start()
    assert _bitmaps(c) == expect
    assert _ok(c, "x-debug-block-dirty-bitmap-sha256", node="d0", name="b0")["sha256"] == sha
    # remove is stored too
    _ok(c, "block-dirty-bitmap-remove", node="d0", name="off")
    _ok(c, "quit")
    env.proc.proc.wait(10)
    c = env.start()
    assert [b["name"] for b in _bitmaps(c)] == ["b0"]


def test_kill9_recovers_every_write_and_shows_restart(env: Env) -> None:
    c = env.start()
    boot = _ok(c, "__org.qmpd_query-instance")
    assert boot["state-dir"] == str(env.state.resolve()) and boot["pid"] == env.proc.proc.pid  # type: ignore[union-attr]
    _ok(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
    _hmp(c, 'qemu-io d0 "write -P 0x21 3M 4k"')
    _hmp(c, 'qemu-io d0 "write -P 0x22 5M 64k"')
    assert env.proc is not None
    env.proc.proc.send_signal(signal.SIGKILL)
    env.proc.proc.wait(10)
    c = env.start()
    again = _ok(c, "__org.qmpd_query-instance")
    assert again["boot-id"] != boot["boot-id"]
    assert (again["start-time"]["seconds"], again["start-time"]["microseconds"]) >= (
        boot["start-time"]["seconds"], boot["start-time"]["microseconds"])
    [bm] = _bitmaps(c)
    assert bm["persistent"] and bm["recording"] and "inconsistent" not in bm
    # More than was written (coarse bits), never less: an incremental
    # backup from it covers both writes.
    target = env.tmp / "t.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    _ok(c, "blockdev-add", driver="raw", node_name="t0", file={"driver": "file", "filename": str(target)})
    _ok(c, "blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="b0", job_id="j")
    _wait_event(c, "BLOCK_JOB_COMPLETED")
    assert target.read_bytes() == env.disk.read_bytes()
    assert _bitmaps(c)[0]["count"] == 0


@pytest.mark.slow
def test_image_changed_behind_qmpds_back(env: Env) -> None:
    c = env.start()
    _ok(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
    _ok(c, "quit")
    assert env.proc is not None
    env.proc.proc.wait(10)
    with open(env.disk, "r+b") as f:
        f.write(b"changed by someone else")
    st = os.stat(env.disk)
    os.utime(env.disk, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    c = env.start()
    assert _bitmaps(c) == [{"name": "b0", "count": 0, "granularity": 65536, "recording": False, "busy": False,
                            "persistent": True, "inconsistent": True}]
    assert _cmd(c, "block-dirty-bitmap-clear", node="d0", name="b0")["error"]["desc"] == (
        "Bitmap 'b0' is inconsistent and cannot be used")
    _ok(c, "quit")
    env.proc.proc.wait(10)
    log = env.stderr()
    assert "persistent bitmaps of" in log and "(b0) marked inconsistent: the image was modified" in log
    c = env.start()  # it stays inconsistent until removed
    assert _bitmaps(c)[0]["inconsistent"] is True
    _ok(c, "block-dirty-bitmap-remove", node="d0", name="b0")
    _ok(c, "quit")
    env.proc.proc.wait(10)
    c = env.start()
    assert _bitmaps(c) == []


def test_libvirt_checkpoint_transaction_on_raw(env: Env) -> None:
    """libvirt's checkpoint: a persistent bitmap added with the full backup."""
    target = env.tmp / "full.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    c = env.start()
    _hmp(c, 'qemu-io d0 "write -P 0x31 0 1M"')
    _ok(c, "blockdev-add", driver="raw", node_name="t0", file={"driver": "file", "filename": str(target)})
    _ok(c, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "chk1", "persistent": True}},
        {"type": "blockdev-backup", "data": {"device": "d0", "target": "t0", "sync": "full", "job-id": "f"}}])
    _wait_event(c, "BLOCK_JOB_COMPLETED")
    _hmp(c, 'qemu-io d0 "write -P 0x32 2M 64k"')
    _ok(c, "quit")
    assert env.proc is not None
    env.proc.proc.wait(10)
    c = env.start()
    assert _bitmaps(c) == [{"name": "chk1", "count": 65536, "granularity": 65536, "recording": True,
                            "busy": False, "persistent": True}]
    _ok(c, "blockdev-add", driver="raw", node_name="t0", file={"driver": "file", "filename": str(target)})
    _ok(c, "blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="chk1", job_id="i")
    _wait_event(c, "BLOCK_JOB_COMPLETED")
    assert target.read_bytes() == env.disk.read_bytes()


def test_query_instance_is_advertised(env: Env) -> None:
    c = env.start(state=False)
    names = {x["name"] for x in _ok(c, "query-commands")}
    assert "__org.qmpd_query-instance" in names
    schema = _ok(c, "query-qmp-schema")
    assert any(e.get("name") == "__org.qmpd_query-instance" for e in schema)


def test_nbd_writes_then_kill9(env: Env) -> None:
    """Writes from a real NBD client (qemu-io with requests in flight
    together) reach the persistent bitmap's journal like any other: after
    kill -9 an incremental backup into the last full one equals the disk."""
    target = env.tmp / "full.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    c = env.start()
    _ok(c, "blockdev-add", driver="raw", node_name="t0", file={"driver": "file", "filename": str(target)})
    _ok(c, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0", "persistent": True}},
        {"type": "blockdev-backup", "data": {"device": "d0", "target": "t0", "sync": "full", "job-id": "f"}}])
    _wait_event(c, "BLOCK_JOB_COMPLETED")
    nbd = str(env.sock_dir / "nbd.sock")
    _ok(c, "nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    _ok(c, "block-export-add", type="nbd", id="e0", node_name="d0", writable=True)
    writes = [f"aio_write -P {0x40 + i} {(i * 7 % 8) * (1 << 20) + i * 4096} 64k" for i in range(16)]
    subprocess.run(["qemu-io", "-f", "raw", *(a for w in writes for a in ("-c", w)), "-c", "aio_flush",
                    f"nbd+unix:///d0?socket={nbd}"], check=True, capture_output=True, timeout=60)
    assert env.proc is not None
    env.proc.proc.send_signal(signal.SIGKILL)
    env.proc.proc.wait(10)
    c = env.start()
    [bm] = _bitmaps(c)
    assert bm["persistent"] and bm["recording"] and "inconsistent" not in bm and bm["count"] >= 8 * 65536
    _ok(c, "blockdev-add", driver="raw", node_name="t0", file={"driver": "file", "filename": str(target)})
    _ok(c, "blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="b0", job_id="i")
    _wait_event(c, "BLOCK_JOB_COMPLETED")
    assert target.read_bytes() == env.disk.read_bytes()


def test_unusable_state_dir_is_one_line_and_exit_1(tmp_path: Path, sock_dir: Path) -> None:
    afile = tmp_path / "not-a-dir"
    afile.write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "qmpd", "--socket", str(sock_dir / "x.sock"),
                          "--state-dir", str(afile)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (1, f"qmpd: --state-dir {afile}: File exists\n")


def test_read_only_node_loads_bitmaps_readonly(env: Env) -> None:
    c = env.start()
    _ok(c, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
    _hmp(c, 'qemu-io d0 "write -P 0x51 1M 64k"')
    _ok(c, "blockdev-del", node_name="d0")
    _ok(c, "blockdev-add", driver="raw", node_name="ro", read_only=True,
        file={"driver": "file", "filename": str(env.disk)})
    assert _bitmaps(c, "ro") == [{"name": "b0", "count": 65536, "granularity": 65536, "recording": True,
                                  "busy": False, "persistent": True}]
    for command, args in (("block-dirty-bitmap-clear", {"name": "b0"}),
                          ("block-dirty-bitmap-remove", {"name": "b0"})):
        assert _cmd(c, command, node="ro", **args)["error"]["desc"] == (
            "Bitmap 'b0' is readonly and cannot be modified")
    _ok(c, "blockdev-del", node_name="ro")
    _ok(c, "blockdev-add", driver="raw", node_name="d0", file={"driver": "file", "filename": str(env.disk)})
    assert _bitmaps(c) == [{"name": "b0", "count": 65536, "granularity": 65536, "recording": True,
                            "busy": False, "persistent": True}]
