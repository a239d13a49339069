"""qmpd removes only files it created (issue 7, item 4)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import DaemonProcess, RawClient


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpd", *argv], capture_output=True, text=True,
                          timeout=30)


def test_refused_start_leaves_the_live_socket_alone(sock_dir: Path) -> None:
    first = DaemonProcess(sock_dir)
    try:
        before = os.stat(first.path)
        out = _run("--socket", first.path)
        assert out.returncode == 1
        assert out.stderr == (f"qmpd: Failed to bind socket to {first.path}: "
                              "another server is listening there\n")
        after = os.stat(first.path)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        client = RawClient(first.path)  # the first daemon is still reachable
        assert client.cmd("query-name") == {"return": {}, "id": "t"}
        client.close()
    finally:
        assert first.stop() == 0


def test_regular_file_is_never_removed(sock_dir: Path) -> None:
    path = sock_dir / "f"
    path.write_text("x\n")
    out = _run("--socket", str(path))
    assert out.returncode == 1
    assert out.stderr == f"qmpd: Failed to bind socket to {path}: the file exists and is not a socket\n"
    assert path.read_text() == "x\n"


def test_socket_error_names_the_path(sock_dir: Path) -> None:
    out = _run("--socket", "/nonexistent-dir/q.sock")
    assert out.returncode == 1
    assert out.stderr == "qmpd: Failed to bind socket to /nonexistent-dir/q.sock: No such file or directory\n"


def test_pidfile_error_is_one_line_and_leaves_nothing(sock_dir: Path) -> None:
    path = sock_dir / "qmpd.sock"
    out = _run("--socket", str(path), "--pidfile", "/nonexistent-dir/p")
    assert out.returncode == 1
    assert out.stderr == ("qmpd: cannot create PID file: Could not create '/nonexistent-dir/p': "
                          "No such file or directory\n")
    assert not path.exists()
    assert os.listdir(sock_dir) == []


def test_old_daemon_does_not_remove_a_newer_daemons_socket(sock_dir: Path) -> None:
    old = DaemonProcess(sock_dir)
    # Someone moves the old daemon's socket away and a new daemon binds the path.
    os.rename(old.path, str(sock_dir / "moved.sock"))
    new = DaemonProcess(sock_dir, "--pidfile", str(sock_dir / "new.pid"))
    try:
        assert old.stop() == 0
        assert stat.S_ISSOCK(os.lstat(new.path).st_mode)
        client = RawClient(new.path)
        assert client.cmd("query-name") == {"return": {}, "id": "t"}
        client.close()
    finally:
        assert new.stop() == 0
    assert not os.path.exists(new.path)


def test_pidfile_of_a_newer_daemon_survives_the_older_ones_exit(sock_dir: Path) -> None:
    pidfile = sock_dir / "shared.pid"
    old = DaemonProcess(sock_dir, "--pidfile", str(pidfile), socket_name="old.sock")
    pidfile.unlink()
    new = DaemonProcess(sock_dir, "--pidfile", str(pidfile), socket_name="new.sock")
    try:
        assert old.stop() == 0
        assert pidfile.read_text() == f"{new.proc.pid}\n"
    finally:
        assert new.stop() == 0
    assert not pidfile.exists()


def test_stale_socket_is_replaced_and_mode_is_0600(sock_dir: Path) -> None:
    path = str(sock_dir / "qmpd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    old_umask = os.umask(0)
    try:
        proc = DaemonProcess(sock_dir)
    finally:
        os.umask(old_umask)
    try:
        client = RawClient(path)  # DaemonProcess waited for the pidfile
        client.close()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        assert proc.stop() == 0
