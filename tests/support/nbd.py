"""A qmpd subprocess with an NBD server, driven over QMP, for real-client tests."""

from __future__ import annotations

import json
import random
import socket
import struct
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, RawClient, short_socket_dir

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054


def have(*tools: str) -> bool:
    """All of ``tools`` are on PATH."""
    return all(shutil.which(t) for t in tools)


def needs_nbd_clients() -> pytest.MarkDecorator:
    """Skip unless nbdcopy, qemu-img and python3-libnbd (for the system
    python) are installed: the clients the pull-mode scenarios drive."""
    return pytest.mark.skipif(not have("nbdcopy", "qemu-img") or not Path("/usr/bin/python3").exists(),
                              reason="needs libnbd-bin, qemu-utils and python3-libnbd")


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a real client; :raise AssertionError: with its output on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_listening(path: str | Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until another process accepts connections on the UNIX socket
    ``path`` (its file appears at bind(), a moment before listen()).

    :raise AssertionError: the process exited or 20 s passed.
    """
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, f"{proc.args} exited"
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, f"nothing listens on {path}"
            time.sleep(0.01)
        finally:
            probe.close()


def connect_monitor(path: str | Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> RawClient:
    """Connect to QEMU's one-client QMP chardev socket at ``path`` and read
    its greeting, retrying until it serves us: while QEMU has not yet seen
    an earlier client (or a probe) hang up, it closes a new connection at
    once, which would look like an empty greeting.

    :raise AssertionError: the process exited or 20 s passed.
    """
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, f"{proc.args} exited"
        try:
            return RawClient(str(path), timeout=timeout)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, EOFError):
            assert time.monotonic() < deadline, f"no QMP greeting on {path}"
            time.sleep(0.01)


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
        wait_listening(self.proc.path, self.proc.proc)
        return RawClient(self.proc.path, timeout=60)

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


@contextmanager
def daemon_with_disk(base: Path, size: int) -> Iterator[NbdDaemon]:
    """A daemon in a short socket directory under ``base`` with ``disk.img``
    (``size`` bytes of seeded data) beside it; closed on exit."""
    with short_socket_dir(base) as tmp:
        make_disk(tmp / "disk.img", size=size)
        d = NbdDaemon(tmp)
        try:
            yield d
        finally:
            d.close()


def option_replies(sock: str, options: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """Send each option of a fixed-newstyle handshake and collect the
    server's reply bytes (greeting first, b"" once the server closed)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    replies = [s.recv(18)]
    s.sendall(struct.pack(">I", 3))
    for code, data in options:
        s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)
        head = b""
        while len(head) < 20:
            try:
                chunk = s.recv(20 - len(head))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            head += chunk
        body = b""
        if len(head) == 20:
            (n,) = struct.unpack_from(">I", head, 16)
            while len(body) < n:
                body += s.recv(n - len(body))
        replies.append(head + body)
    s.settimeout(2)
    try:
        replies.append(s.recv(10))
    except TimeoutError:
        replies.append(b"(open)")
    except ConnectionResetError:
        replies.append(b"")
    s.close()
    return replies
