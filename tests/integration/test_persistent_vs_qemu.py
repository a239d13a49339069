"""Persistent raw bitmaps in qmpd behave as persistent qcow2 bitmaps in QEMU.

The same commands go to ``qemu-system-x86_64 -machine none`` over a qcow2
image and to qmpd ``--state-dir`` over a raw image: adds (persistent or
not, enabled or not), qemu-io writes, merge, a transaction with clear and
add, an incremental backup, remove; after each step and after ``quit`` and
a restart of both, the ``dirty-bitmaps`` lists must be equal.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.daemon import DaemonProcess, short_socket_dir

SIZE = 8 << 20


class Peer:
    """One server (QEMU or qmpd) with the disk node ``d0``, restartable.

    QEMU speaks QMP on its stdio (``-qmp stdio``), so its greeting is the
    sign that it is ready; qmpd is a :class:`DaemonProcess` (ready once its
    pidfile exists) reached over its socket.
    """

    def __init__(self, name: str, argv: list[str], sock_dir: Path | None = None) -> None:
        self.name, self.argv, self.sock_dir = name, argv, sock_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon: DaemonProcess | None = None
        self.rfile: IO[bytes] | None = None
        self.wfile: IO[bytes] | None = None
        self.conn: socket.socket | None = None
        self.events: list[dict[str, Any]] = []

    def start(self) -> None:
        if self.sock_dir is None:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
            self.rfile, self.wfile = self.proc.stdout, self.proc.stdin
        else:
            self.daemon = DaemonProcess(self.sock_dir, *self.argv)
            self.proc = self.daemon.proc
            self.conn = socket.socket(socket.AF_UNIX)
            self.conn.settimeout(20)
            self.conn.connect(self.daemon.path)
            self.rfile, self.wfile = self.conn.makefile("rb"), self.conn.makefile("wb")
        assert "QMP" in self._line()
        assert self.cmd("qmp_capabilities") == {}

    def _line(self) -> dict[str, Any]:
        assert self.rfile is not None
        while True:
            line = self.rfile.readline()
            assert line, f"{self.name} closed the connection"
            # QEMU's HMP qemu-io prints its report on stdout, our QMP channel
            if line.startswith(b"{"):
                msg: dict[str, Any] = json.loads(line)
                return msg

    def cmd(self, command: str, /, **args: Any) -> Any:
        assert self.wfile is not None
        req: dict[str, Any] = {"execute": command}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        self.wfile.write(json.dumps(req).encode() + b"\n")
        self.wfile.flush()
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg.get("return", msg)

    def event(self, name: str) -> None:
        while not any(e["event"] == name for e in self.events):
            self.events.append(self._line())
        self.events = [e for e in self.events if e["event"] != name]

    def quit(self) -> None:
        assert self.proc is not None
        self.cmd("quit")
        assert self.proc.wait(20) == 0
        for f in (self.rfile, self.wfile, self.conn):
            if f is not None:
                f.close()

    def bitmaps(self) -> list[dict[str, Any]]:
        for n in self.cmd("query-named-block-nodes"):
            if n["node-name"] == "d0":
                return list(n.get("dirty-bitmaps", []))
        raise AssertionError("no d0")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[Peer]]:
    qcow2, raw = tmp_path / "disk.qcow2", tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(SIZE)], check=True)
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    for t in ("tq.raw", "tm.raw"):
        with open(tmp_path / t, "wb") as f:
            f.truncate(SIZE)
    with short_socket_dir(tmp_path) as d:
        qemu = Peer("qemu", [
            "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
            "-blockdev", json.dumps({"driver": "qcow2", "node-name": "d0",
                                     "file": {"driver": "file", "filename": str(qcow2)}}),
            "-blockdev", json.dumps({"driver": "raw", "node-name": "t0",
                                     "file": {"driver": "file", "filename": str(tmp_path / "tq.raw")}})])
        qmpd = Peer("qmpd", [
            "--state-dir", str(tmp_path / "st"),
            "--blockdev", json.dumps({"driver": "raw", "node-name": "d0",
                                      "file": {"driver": "file", "filename": str(raw)}}),
            "--blockdev", json.dumps({"driver": "raw", "node-name": "t0",
                                      "file": {"driver": "file", "filename": str(tmp_path / "tm.raw")}})], d)
        both = [qemu, qmpd]
        try:
            for p in both:
                p.start()
            yield both
        finally:
            for p in both:
                p.stop()


def _same(peers: list[Peer], step: str) -> list[dict[str, Any]]:
    q, m = (p.bitmaps() for p in peers)
    assert m == q, f"{step}: qemu {[b['name'] for b in q]} qmpd {[b['name'] for b in m]}"
    return q


def _all(peers: list[Peer], command: str, /, **args: Any) -> None:
    replies = [p.cmd(command, **args) for p in peers]
    assert replies[1] == replies[0], command


@pytest.mark.slow
def test_same_bitmaps_as_qemu_qcow2(peers: list[Peer]) -> None:
    hmp = "human-monitor-command"
    _all(peers, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
    _all(peers, "block-dirty-bitmap-add", node="d0", name="b1", persistent=True, disabled=True,
         granularity=131072)
    _all(peers, "block-dirty-bitmap-add", node="d0", name="tmp")
    _all(peers, hmp, command_line='qemu-io d0 "write -P 0x41 0 64k"')
    _all(peers, hmp, command_line='qemu-io d0 "write -P 0x42 1M 4k"')
    _same(peers, "after writes")
    _all(peers, "block-dirty-bitmap-merge", node="d0", target="b1", bitmaps=["b0"])
    _all(peers, "transaction", actions=[
        {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "tmp"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b2", "persistent": True,
                                                     "granularity": 4096}}])
    _all(peers, hmp, command_line='qemu-io d0 "write -P 0x43 2M 128k"')
    before = _same(peers, "after merge and transaction")
    assert [(b["name"], b["persistent"]) for b in before] == [
        ("b2", True), ("tmp", False), ("b1", True), ("b0", True)]
    for p in peers:
        p.quit()
        p.start()
    after = _same(peers, "after quit and restart")
    assert [b["name"] for b in after] == ["b0", "b1", "b2"]  # QEMU's reload order
    assert {b["name"]: b["count"] for b in after} == {b["name"]: b["count"] for b in before if b["persistent"]}
    for p in peers:
        p.cmd("blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="b0", job_id="j")
        p.event("BLOCK_JOB_COMPLETED")
    _same(peers, "after incremental backup")
    _all(peers, "block-dirty-bitmap-remove", node="d0", name="b1")
    _all(peers, "block-dirty-bitmap-disable", node="d0", name="b2")
    for p in peers:
        p.quit()
        p.start()
    _same(peers, "after remove, disable, quit and restart")
    _all(peers, "block-dirty-bitmap-add", node="d0", name="b3", persistent=True)
    for p in peers:
        p.quit()
        p.start()
    assert [b["name"] for b in _same(peers, "a new bitmap among reloaded ones")] == ["b3", "b0", "b2"]
