"""quit, signals, socket permissions, CLI forms and errors."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, RawClient

SHUTDOWN_QUIT = '"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}'


def test_socket_mode_0600(qmpd_proc: DaemonProcess) -> None:
    assert stat.S_IMODE(os.stat(qmpd_proc.path).st_mode) == 0o600


def test_quit(qmpd_proc: DaemonProcess) -> None:
    other = RawClient(qmpd_proc.path)
    client = RawClient(qmpd_proc.path)
    client.send(b'{"execute": "quit", "id": 1}')
    event = client.read_line().decode()
    assert event.startswith('{"timestamp": {"seconds": ') and event.endswith(SHUTDOWN_QUIT + "\r\n")
    assert client.read_line() == b'{"return": {}, "id": 1}\r\n'
    assert other.read_line().decode().endswith(SHUTDOWN_QUIT + "\r\n")
    assert qmpd_proc.proc.wait(10) == 0
    assert not os.path.exists(qmpd_proc.path)
    client.close()
    other.close()


def test_events_only_after_negotiation(qmpd_proc: DaemonProcess) -> None:
    waiting = RawClient(qmpd_proc.path, negotiate=False)
    client = RawClient(qmpd_proc.path)
    client.send(b'{"execute": "quit"}')
    assert client.read_line().decode().endswith(SHUTDOWN_QUIT + "\r\n")
    # the negotiating client saw no event: its stream just ends
    waiting.sock.settimeout(10)
    with pytest.raises(EOFError):
        waiting.read_line()
    assert waiting.buf == b""
    client.close()
    waiting.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shutdown(qmpd_proc: DaemonProcess, sig: int) -> None:
    client = RawClient(qmpd_proc.path)
    qmpd_proc.proc.send_signal(sig)
    event = client.read_line().decode()
    assert event.endswith('"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-signal"}}\r\n')
    assert qmpd_proc.proc.wait(10) == 0
    assert not os.path.exists(qmpd_proc.path)
    client.close()


def _run(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpd", *argv], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bogus"], "qmpd: unrecognized arguments: --bogus"),
        (["--chardev", "socket,path=/tmp/x"], "qmpd: chardev: Parameter 'id' is missing in 'socket,path=/tmp/x'"),
        (["--monitor", "chardev=nope"], "qmpd: chardev 'nope' not found"),
        (["--chardev", "socket,id=c,path=/tmp/x,server=off"], "qmpd: only server=on sockets are supported"),
        (["--qemu-version", "7"], "qmpd: --qemu-version expects X.Y.Z, not '7'"),
    ],
)
def test_bad_cli_arguments(argv: list[str], message: str) -> None:
    out = _run(*argv)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [message]


def test_version_flag() -> None:
    out = _run("-V")
    assert out.returncode == 0 and out.stdout.strip() == "qmpd 0.1.0"


def test_qsd_style_chardev_and_monitor(sock_dir: Path) -> None:
    path = str(sock_dir / "mon.sock")
    pidfile = sock_dir / "qmpd.pid"
    proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--chardev",
                             f"socket,id=mon0,path={path},server=on,wait=off", "--monitor", "chardev=mon0",
                             "--pidfile", str(pidfile), "--name", "vm1", "--qemu-version", "7.2.0"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert pidfile.read_text() == f"{proc.pid}\n"
        client = RawClient(path)
        assert b'"major": 7' in client.greeting
        assert client.cmd("query-name") == {"return": {"name": "vm1"}, "id": "t"}
        client.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not pidfile.exists()


def test_tcp_listener_and_daemonize(sock_dir: Path) -> None:
    import socket as s

    probe = s.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    pidfile = sock_dir / "d.pid"
    out = _run("--chardev", f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off", "--monitor", "t",
               "--daemonize", "--pidfile", str(pidfile))
    assert out.returncode == 0
    pid = int(pidfile.read_text())
    try:
        conn = s.create_connection(("127.0.0.1", port), timeout=5)
        f = conn.makefile("rb")
        assert f.readline().startswith(b'{"QMP": ')
        conn.sendall(b'{"execute": "qmp_capabilities"}{"execute": "quit"}')
        assert f.readline() == b'{"return": {}}\r\n'
        assert b'"SHUTDOWN"' in f.readline()
        conn.close()
    finally:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("daemonized qmpd did not exit after quit")


def test_live_socket_is_not_stolen(qmpd_proc: DaemonProcess) -> None:
    out = _run("--socket", qmpd_proc.path)
    assert out.returncode == 1
    assert "another server is listening there" in out.stderr


def test_blockdev_option_forms(sock_dir: Path) -> None:
    img = sock_dir / "a.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    proc = DaemonProcess(sock_dir, "--blockdev", f"driver=file,node-name=f0,filename={img},read-only=on",
                         "--blockdev", '{"driver": "raw", "node-name": "d0", "file": "f0", "read-only": true}',
                         "--blockdev", "driver=null-co,node-name=n0,size=2097152,read-zeroes=on")
    try:
        client = RawClient(proc.path)
        nodes = client.cmd("query-named-block-nodes")["return"]
        assert [(n["node-name"], n["drv"], n["ro"], n["image"]["virtual-size"]) for n in nodes] == [
            ("n0", "null-co", False, 2 << 20), ("d0", "raw", True, 1 << 20), ("f0", "file", True, 1 << 20)]
        client.close()
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize(
    "blockdev,message",
    [
        ("driver=file,node-name=f0,filename=/nonexistent/x.img",
         "qmpd: Could not open '/nonexistent/x.img': No such file or directory"),
        ("driver=file,node-name=f0", "qmpd: Parameter 'filename' is missing"),
        ("driver=null-co,node-name=n0,size=2M", "qmpd: Parameter 'size' expects int"),
        ("driver=file,node-name=f0,filename=/x,read-only=maybe", "qmpd: Parameter 'read-only' expects 'on' or 'off'"),
    ],
)
def test_bad_blockdev_option(blockdev: str, message: str) -> None:
    out = _run("--socket", "/tmp/qmpd-never-bound.sock", "--blockdev", blockdev)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [message]
    assert not os.path.exists("/tmp/qmpd-never-bound.sock")


def test_trace_qmp_logs_every_message(sock_dir: Path) -> None:
    proc = DaemonProcess(sock_dir, "--trace-qmp")
    client = RawClient(proc.path)
    assert client.cmd("query-name") == {"return": {}, "id": "t"}
    client.close()
    assert proc.stop() == 0
    assert proc.proc.stderr is not None
    log = proc.proc.stderr.read().decode()
    assert '--> {"execute": "query-name", "id": "t"}' in log
    assert '<-- {"return": {}, "id": "t"}' in log
