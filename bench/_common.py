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


MIB = 1 << 20


def qmp_cmd(c: RawQMP, name: str, args: dict[str, object]) -> dict[str, object]:
    """:return: the reply of one command. :raise RuntimeError: an error reply."""
    import json

    reply: dict[str, object] = json.loads(c.roundtrip(json.dumps({"execute": name, "arguments": args}).encode()))
    if "error" in reply:
        raise RuntimeError(f"{name}: {reply['error']}")
    return reply


def preallocated_image(tmp: str, size: int) -> str:
    """:return: the path of a new ``disk.img`` of ``size`` bytes in ``tmp``,
    allocated (posix_fallocate) so that writes measure the server, not the
    file system's allocation."""
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return image


def hmp_write_rate(sock: str, image: str, size: int, bitmaps: Sequence[bool]) -> float:
    """Add a raw node over ``image`` with one enabled dirty bitmap per entry
    of ``bitmaps`` (the entry: ``persistent``), write ``size`` bytes with
    ``qemu-io NODE "write -P 0xab OFF 1M"`` through HMP, one round trip per
    MiB, then ``flush``; remove the bitmaps and the node.

    :return: MB/s of the writes and the flush."""
    import json

    c = RawQMP(sock)
    node = f"n{time.monotonic_ns()}"
    qmp_cmd(c, "blockdev-add", {"driver": "raw", "node-name": node,
                                "file": {"driver": "file", "filename": image}})
    for i, persistent in enumerate(bitmaps):
        qmp_cmd(c, "block-dirty-bitmap-add", {"node": node, "name": f"b{i}", "persistent": persistent})
    hmp = [json.dumps({"execute": "human-monitor-command", "arguments": {
        "command-line": f'qemu-io {node} "write -P 0xab {off} 1M"'}}).encode() for off in range(0, size, MIB)]
    flush = json.dumps({"execute": "human-monitor-command",
                        "arguments": {"command-line": f'qemu-io {node} "flush"'}}).encode()
    t0 = time.perf_counter()
    for req in hmp:
        c.roundtrip(req)
    c.roundtrip(flush)
    elapsed = time.perf_counter() - t0
    for i in range(len(bitmaps)):
        qmp_cmd(c, "block-dirty-bitmap-remove", {"node": node, "name": f"b{i}"})
    qmp_cmd(c, "blockdev-del", {"node-name": node})
    c.close()
    return size / elapsed / 1e6
