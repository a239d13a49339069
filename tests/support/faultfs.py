"""A FUSE file whose reads or writes fail on demand (nbdkit's error filter
behind nbdfuse), for error-attribution tests on real file systems.

    with FaultyFile(tmp_path, 8 << 20) as ff:
        ff.path                 # a regular file on a FUSE mount
        ff.fail_writes(True)    # pwrite/zero/trim now fail with EIO
        ff.fail_reads(True)     # pread now fails with EIO

Skips the test where /dev/fuse, nbdfuse or nbdkit is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

__all__ = ["FaultyFile", "require_fuse"]


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse") or not all(shutil.which(t) for t in ("nbdfuse", "nbdkit", "fusermount3")):
        pytest.skip("needs /dev/fuse, nbdfuse and nbdkit")


class FaultyFile:
    """``size`` bytes of memory behind a FUSE file; see the module docstring."""

    def __init__(self, base: Path, size: int, *, delay_reads: float = 0.0) -> None:
        require_fuse()
        self.dir = base / "faultfs"
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir(parents=True)
        self.write_trigger = self.dir / "fail-writes"
        self.read_trigger = self.dir / "fail-reads"
        self.path = str(self.mnt / "nbd")
        pidfile = self.dir / "nbdfuse.pid"
        filters = ["--filter=error"]
        extra = []
        if delay_reads:
            filters.append("--filter=delay")
            extra.append(f"rdelay={delay_reads:g}")
        errs = [f"error-pwrite-file={self.write_trigger}", f"error-zero-file={self.write_trigger}",
                f"error-trim-file={self.write_trigger}", f"error-pread-file={self.read_trigger}",
                "error-pwrite=EIO", "error-zero=EIO", "error-trim=EIO", "error-pread=EIO",
                "error-pwrite-rate=1", "error-zero-rate=1", "error-trim-rate=1", "error-pread-rate=1"]
        self.proc = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(self.mnt), "--command", "nbdkit", "-s", *filters,
             "memory", str(size), *errs, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.skip("nbdfuse could not mount (FUSE not usable here)")
            time.sleep(0.01)

    def fail_writes(self, on: bool) -> None:
        self._trigger(self.write_trigger, on)

    def fail_reads(self, on: bool) -> None:
        self._trigger(self.read_trigger, on)

    @staticmethod
    def _trigger(path: Path, on: bool) -> None:
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> FaultyFile:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
