"""Start qmpd for tests: in-process (same event loop) or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpd.commands.context import DaemonConfig
from qmpd.server.daemon import Daemon
from qmpd.server.listeners import UnixListener
from qmpd.server.plan import StartupPlan

UNIX_PATH_MAX = 107


@contextlib.contextmanager
def short_socket_dir(base: Path) -> Iterator[Path]:
    """A directory whose socket paths fit the 108-byte UNIX limit."""
    if len(str(base / "qmpd.sock")) <= UNIX_PATH_MAX:
        yield base
        return
    with tempfile.TemporaryDirectory(prefix="qmpd-") as tmp:
        yield Path(tmp)


@dataclass
class RunningDaemon:
    daemon: Daemon
    path: str
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running_daemon(sock_dir: Path, *, plan: StartupPlan | None = None,
                         **config: Any) -> AsyncIterator[RunningDaemon]:
    """A Daemon serving ``sock_dir/qmpd.sock`` in the current event loop,
    after building ``plan`` (``-drive``/``-device``... from a command line)."""
    path = str(sock_dir / "qmpd.sock")
    daemon = Daemon(DaemonConfig(qemu_version=(9, 0, 0), package="qmpd-test", **config),
                    [UnixListener(path)])
    daemon.setup()
    if plan is not None:
        await daemon.apply_plan(plan)
    await daemon.start()

    async def serve() -> None:
        await daemon.wait_stopped()

    task = asyncio.get_running_loop().create_task(serve())
    try:
        yield RunningDaemon(daemon, path, task)
    finally:
        if not daemon.stopping:
            await daemon.request_shutdown("host-qmp-quit")
        await task
        await daemon.cleanup()


class DaemonProcess:
    """``python -m qmpd`` in a subprocess, waited for until it listens."""

    def __init__(self, sock_dir: Path, *extra: str, socket_name: str = "qmpd.sock") -> None:
        self.path = str(sock_dir / socket_name)
        # qmpd writes its pidfile once it listens and handles signals, so
        # that (not the socket file, which exists before listen()) is the
        # sign that it is ready.
        ready = str(sock_dir / (socket_name + ".pid"))
        if "--pidfile" in extra:
            ready = extra[extra.index("--pidfile") + 1]
            extra_args = list(extra)
        else:
            extra_args = [*extra, "--pidfile", ready]
        self.argv = [sys.executable, "-m", "qmpd", "--socket", self.path, *extra_args]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"qmpd exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("qmpd did not start")
            time.sleep(0.01)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class RawClient:
    """A blocking byte-level QMP client for exact-wire assertions."""

    def __init__(self, path: str, negotiate: bool = True, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.read_line()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.read_line() == b'{"return": {}}\r\n'

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def read_msg(self) -> dict[str, Any]:
        msg: dict[str, Any] = json.loads(self.read_line())
        return msg

    def cmd(self, name: str, **arguments: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name, "id": "t"}
        if arguments:
            req["arguments"] = arguments
        self.send(json.dumps(req))
        while True:
            msg = self.read_msg()
            if "event" not in msg:
                return msg

    def exchange(self, data: bytes | str, replies: int = 1) -> list[bytes]:
        self.send(data)
        return [self.read_line() for _ in range(replies)]

    def close(self) -> None:
        self.sock.close()


class AsyncRawClient:
    """An asyncio byte-level client (for tests sharing the daemon's loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str) -> AsyncRawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities"}')
        assert await reader.readline() == b'{"return": {}}\r\n'
        return client

    async def execute(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send ``request``; :return: its reply and the events that came first."""
        self.writer.write(json.dumps(request).encode())
        events = []
        while True:
            msg: dict[str, Any] = json.loads(await asyncio.wait_for(self.reader.readline(), 30))
            if "event" in msg:
                events.append(msg)
                continue
            return msg, events

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
