"""QEMU's system-emulator command line: probes, errors, client-mode
monitors and qtest, ``-S``, and the guest devices it creates."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import short_socket_dir

GOLDEN = Path(__file__).resolve().parents[1] / "transcripts" / "cli_errors.txt"
PREFIX = ["-M", "none", "-nodefaults", "-display", "none"]


def _qmpd(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpd", *argv], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def _cases() -> list[tuple[str, int, list[str]]]:
    cases: list[tuple[str, int, list[str]]] = []
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("$ "):
            cases.append((line[2:], 0, []))
        elif line.startswith("= "):
            cases[-1] = (cases[-1][0], int(line[2:]), cases[-1][2])
        elif line.startswith("! "):
            cases[-1][2].append(line[2:])
    return cases


@pytest.mark.parametrize("args,status,stderr", _cases(), ids=[c[0][:60] for c in _cases()])
def test_errors_as_qemu(tmp_path: Path, args: str, status: int, stderr: list[str]) -> None:
    """Each error recorded from QEMU 7.2 (record_cli.py): one line (two where
    QEMU prints a hint), same text, exit status 1."""
    with open(tmp_path / "x.img", "wb") as f:
        f.truncate(1 << 20)
    argv = shlex.split(args.replace("TEST_DIR", str(tmp_path)))
    out = _qmpd(*PREFIX, *argv, cwd=str(tmp_path))
    assert out.returncode == status
    want = [line.replace("PROG:", "qmpd:").replace("TEST_DIR", str(tmp_path)) for line in stderr]
    assert out.stderr.splitlines() == want


def test_probes() -> None:
    """The iotests harness's probes, answered from qmpd's tables."""
    machines = _qmpd("-machine", "help")
    assert machines.returncode == 0
    lines = machines.stdout.splitlines()
    assert lines[0] == "Supported machines are:"
    assert [ln.split()[0] for ln in lines[1:]] == ["none", "pc", "q35"]
    assert lines[1].endswith(" (default)")
    formats = _qmpd("-drive", "format=help")
    assert formats.returncode == 0
    from qmpd.block.drivers import DRIVERS
    import qmpd.server.daemon  # noqa: F401

    first = formats.stdout.splitlines()[0]
    assert first.split(":")[1].split() == sorted(DRIVERS)
    devices = _qmpd("-M", "none", "--device", "help")
    assert devices.returncode == 0
    assert 'name "virtio-blk-pci", bus PCI, alias "virtio-blk"' in devices.stdout.splitlines()
    assert 'name "scsi-hd", bus SCSI, desc "virtual SCSI disk"' in devices.stdout.splitlines()


def _read_msg(f: socket.SocketIO | object) -> dict[str, object]:
    line = f.readline()  # type: ignore[attr-defined]
    return json.loads(line)  # type: ignore[no-any-return]


def test_client_mode_monitor_qtest_and_prelaunch(tmp_path: Path) -> None:
    """As QEMU's iotests harness: the test listens on the monitor and qtest
    sockets, qmpd connects to both (``-chardev`` without server=on, ``-mon``,
    ``-qtest``), starts in ``prelaunch`` (-S), and serves QMP on the
    connection it made; qemu-io output goes to qmpd's stdout."""
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    with short_socket_dir(tmp_path) as sock_dir:
        mon_path, qtest_path = str(sock_dir / "mon.sock"), str(sock_dir / "qtest.sock")
        listeners = []
        for path in (mon_path, qtest_path):
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.listen(1)
            s.settimeout(30)
            listeners.append(s)
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmpd", "-display", "none", "-vga", "none",
             "-chardev", f"socket,id=mon,path={mon_path}", "-mon", "chardev=mon,mode=control",
             "-qtest", f"unix:path={qtest_path}", "-accel", "qtest", "-nodefaults", "-S",
             "--drive", f"if=virtio,id=drive0,file={img},format=raw,cache=writeback,aio=threads",
             "-drive", f"if=none,id=drive1,file={img},format=raw,read-only=on,node-name=ro"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listeners[0].accept()
            qtest, _ = listeners[1].accept()
            conn.settimeout(30)
            f = conn.makefile("r")
            assert "QMP" in _read_msg(f)

            def cmd(name: str, **args: object) -> dict[str, object]:
                conn.sendall(json.dumps({"execute": name, "arguments": args}).encode())
                while True:
                    msg = _read_msg(f)
                    if "event" not in msg:
                        return msg

            assert cmd("qmp_capabilities") == {"return": {}}
            assert cmd("query-status") == {"return": {"status": "prelaunch", "running": False}}
            blocks = cmd("query-block")["return"]
            assert isinstance(blocks, list)
            assert [(b["device"], b.get("qdev"), b["removable"]) for b in blocks] == [
                ("drive0", "/machine/peripheral-anon/device[0]/virtio-backend", False),
                ("drive1", None, True)]
            assert blocks[1]["inserted"]["node-name"] == "ro" and blocks[1]["inserted"]["ro"] is True
            qtest.sendall(b"clock_step\n")
            assert qtest.recv(100) == b"FAIL Unknown command 'clock_step'\n"
            assert cmd("human-monitor-command",
                       **{"command-line": 'qemu-io drive0 "write -P 0x41 0 4k"'}) == {"return": ""}
            assert cmd("cont") == {"return": {}}
            assert cmd("query-status") == {"return": {"status": "running", "running": True}}
            assert cmd("quit") == {"return": {}}
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for s in listeners:
                s.close()
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == "wrote 4096/4096 bytes at offset 0"
    with open(img, "rb") as f2:
        assert f2.read(4096) == b"A" * 4096
    assert not os.path.exists(mon_path) or True
