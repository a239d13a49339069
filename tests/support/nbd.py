"""A qmpd subprocess with an NBD server, driven over QMP, for real-client tests."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.daemon import DaemonProcess, RawClient

MiB = 1 << 20


def have(*tools: str) -> bool:
    """All of ``tools`` are on PATH."""
    return all(shutil.which(t) for t in tools)


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a real client; :raise AssertionError: with its output on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_disk(path: Path, size: int = 64 * MiB, seed: int = 3) -> None:
    """A sparse image with ten random 100000-byte extents."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(10):
            f.seek(rng.randrange(0, size - 100000))
            f.write(rng.randbytes(100000))


class NbdDaemon:
    """qmpd in a subprocess; :meth:`q` runs one QMP command."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = DaemonProcess(tmp)
        self.qmp = self._connect()
        self.sock = str(tmp / "nbd.sock")
        #: Events seen while waiting for replies.
        self.events: list[dict[str, Any]] = []

    def _connect(self) -> RawClient:
        # The socket file appears at bind(), a moment before listen().
        deadline = time.monotonic() + 10
        while True:
            try:
                return RawClient(self.proc.path, timeout=60)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def q(self, command: str, **arguments: Any) -> dict[str, Any]:
        """:return: the reply (``return`` or ``error``) of ``command``."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.qmp.send(json.dumps(req))
        while True:
            msg = self.qmp.read_msg()
            if "event" in msg:
                msg.pop("timestamp", None)
                self.events.append(msg)
            else:
                return msg

    def ok(self, command: str, **arguments: Any) -> Any:
        """:meth:`q` that must succeed; :return: its ``return``."""
        reply = self.q(command, **arguments)
        assert "return" in reply, reply
        return reply["return"]

    def hmp(self, line: str) -> str:
        """An HMP command line (``qemu-io ...``)."""
        out: str = self.ok("human-monitor-command", **{"command-line": line})
        return out

    def add_raw(self, name: str, path: Path, **extra: Any) -> None:
        """blockdev-add a raw node over ``path``."""
        self.ok("blockdev-add", driver="raw", **{"node-name": name},
                file={"driver": "file", "filename": str(path)}, **extra)

    def start_server(self, **extra: Any) -> None:
        """nbd-server-start on ``tmp/nbd.sock``."""
        self.ok("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}}, **extra)

    def uri(self, export: str) -> str:
        """The NBD URI of ``export``."""
        return f"nbd+unix:///{export}?socket={self.sock}"

    def close(self) -> None:
        """Stop the daemon (its exit status must be 0)."""
        self.qmp.close()
        assert self.proc.stop() == 0
