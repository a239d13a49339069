"""Shared helpers for the benchmarks: start servers, a raw QMP client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """A QMP server process (qmpd or QEMU) listening on UNIX sockets."""

    def __init__(self, name: str, argv: Sequence[str], sockets: Sequence[str]) -> None:
        self.name = name
        self.sockets = list(sockets)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        self.greeting_s = self._wait_greeting()

    def _wait_greeting(self) -> float:
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.sockets[0])
            except OSError:
                s.close()
                time.sleep(0.0005)
                continue
            f = s.makefile("rb")
            f.readline()
            elapsed = time.perf_counter() - self.t0
            s.close()
            return elapsed
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def qmpd_server(tmp: str, n_sockets: int = 1, *extra: str) -> Server:
    socks = [os.path.join(tmp, f"qmpd{i}.sock") for i in range(n_sockets)]
    argv = [sys.executable, "-m", "qmpd", *(a for s in socks for a in ("--socket", s)), *extra]
    return Server("qmpd", argv, socks)


def qemu_servers(tmp: str, n_sockets: int = 1) -> list[tuple[str, list[str], list[str]]]:
    """(name, argv, sockets) for every QEMU flavour installed here."""
    out = []
    socks = [os.path.join(tmp, f"qemu{i}.sock") for i in range(n_sockets)]
    if shutil.which("qemu-storage-daemon"):
        argv = ["qemu-storage-daemon"]
        for i, s in enumerate(socks):
            argv += ["--chardev", f"socket,id=m{i},path={s},server=on,wait=off", "--monitor", f"chardev=m{i}"]
        out.append(("qemu-storage-daemon", argv, socks))
    if shutil.which("qemu-system-x86_64"):
        argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
        for s in socks:
            argv += ["-qmp", f"unix:{s},server=on,wait=off"]
        out.append(("qemu-system-x86_64", argv, socks))
    return out


class RawQMP:
    """Minimal blocking QMP client: the same code measures every server."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.line()
        self.sock.sendall(b'{"execute":"qmp_capabilities"}')
        self.line()

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out, self.buf = self.buf[: i + 1], self.buf[i + 1:]
                return out
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def roundtrip(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        while True:
            reply = self.line()
            if not reply.startswith(b'{"timestamp"'):
                return reply

    def close(self) -> None:
        self.sock.close()
