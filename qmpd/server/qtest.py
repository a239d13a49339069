"""``-qtest``: hold the qtest connection QEMU's test harness expects.

The harness (python/qemu/machine/qtest.py) listens and waits for the binary
to connect; the iotests never send qtest commands to block-only VMs.  qmpd
connects, keeps the connection open until it exits, and answers any line
with ``FAIL Unknown command`` (it emulates no guest to clock or poke).
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["QtestProtocol"]

#: Longest qtest line kept (anything longer is cut off and answered).
MAX_LINE = 4096


class QtestProtocol(asyncio.Protocol):
    """Answers every qtest command with ``FAIL``."""

    def __init__(self) -> None:
        self._buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf or len(self._buf) > MAX_LINE:
            line, _, self._buf = self._buf.partition(b"\n")
            word = line.split(b" ", 1)[0][:64].decode("ascii", "replace").strip()
            if self.transport is not None:
                self.transport.write(f"FAIL Unknown command '{word}'\n".encode())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
