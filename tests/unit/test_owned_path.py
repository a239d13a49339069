"""OwnedPath removes only the file this process created, even when the file
system handed a later file at the same path the same inode number (seen as a
flaky pidfile test: unlink, then create, reused the inode)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from qmpd.cli.hardening import write_pidfile
from qmpd.server.listeners import OwnedPath


def test_pidfile_is_removed_when_still_ours(tmp_path: Path) -> None:
    path = tmp_path / "d.pid"
    owned = write_pidfile(str(path))
    assert path.read_text() == f"{os.getpid()}\n"
    owned.remove()
    assert not path.exists()


def test_same_inode_other_pid_is_left(tmp_path: Path) -> None:
    """A newer daemon's pidfile on the same device and inode (and even the
    same ctime) but with its own PID stays."""
    path = tmp_path / "d.pid"
    path.write_text("424242\n")
    newer = OwnedPath.of(str(path))
    ours = dataclasses.replace(newer, content=f"{os.getpid()}\n".encode())
    ours.remove()
    assert path.read_text() == "424242\n"


def test_same_inode_other_ctime_is_left(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"")
    now = OwnedPath.of(str(path))
    older = dataclasses.replace(now, ctime_ns=now.ctime_ns - 1)
    older.remove()
    assert path.exists()
    now.remove()
    assert not path.exists()
