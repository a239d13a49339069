"""qemu-storage-daemon 7.2 with its monitor on stdio, for tests that send
the same commands to QEMU and to qmpd."""

from __future__ import annotations

import json
import subprocess
from typing import Any


class Qsd:
    """qemu-storage-daemon with ``--blockdev`` options and a QMP monitor on stdio."""

    def __init__(self, *blockdevs: str) -> None:
        argv = ["qemu-storage-daemon", "--chardev", "stdio,id=m", "--monitor", "chardev=m"]
        for b in blockdevs:
            argv += ["--blockdev", b]
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        json.loads(self.p.stdout.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, command: str, **args: Any) -> dict[str, Any]:
        """:return: the reply (events before it are skipped)."""
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.p.stdin.flush()
        while True:
            r: dict[str, Any] = json.loads(self.p.stdout.readline())
            if "event" not in r:
                return r

    def until(self, event: str) -> None:
        """Read until ``event`` arrives."""
        assert self.p.stdout is not None
        while json.loads(self.p.stdout.readline()).get("event") != event:
            pass

    def quit(self) -> None:
        self.cmd("quit")
        assert self.p.wait(timeout=30) == 0
