"""Protocol-level tests with libnbd's Python bindings (every option and
command, and bad requests), plus raw-socket tests for what libnbd will not
send (malformed handshakes, unknown options and commands, a client that
vanishes mid-request).  Misbehaving clients must not disturb QMP or the
other NBD clients."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import short_socket_dir
from tests.support.nbd import MiB, NbdDaemon, make_disk

PROBE = Path(__file__).with_name("libnbd_probe.py")
SYSTEM_PYTHON = "/usr/bin/python3"


def _have_libnbd() -> bool:
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0
    except OSError:
        return False


pytestmark = [pytest.mark.timeout(180)]
needs_libnbd = pytest.mark.skipif(not _have_libnbd(), reason="needs python3-libnbd (.ci/run installs it)")

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
DIRTY = [(MiB, 64 * 1024), (5 * MiB, 256 * 1024)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdDaemon]:
    base = tmp_path_factory.mktemp("nbd")
    with short_socket_dir(base) as tmp:
        make_disk(tmp / "disk.img")
        make_disk(tmp / "rw.img", size=4 * MiB, seed=5)
        d = NbdDaemon(tmp)
        d.add_raw("drive0", tmp / "disk.img")
        d.add_raw("rw0", tmp / "rw.img", discard="unmap")
        d.ok("block-dirty-bitmap-add", node="drive0", name="b0")
        for off, n in DIRTY:
            d.hmp(f'qemu-io drive0 "write -P 0x55 {off} {n}"')
        d.ok("block-dirty-bitmap-disable", node="drive0", name="b0")
        d.start_server()
        d.ok("block-export-add", type="nbd", id="ro", **{"node-name": "drive0"}, name="ro",
             description="read-only disk", bitmaps=["b0"], **{"allocation-depth": True})
        d.ok("block-export-add", type="nbd", id="rw", **{"node-name": "rw0"}, name="rw", writable=True)
        try:
            yield d
        finally:
            d.close()


def probe(env: NbdDaemon, scenario: str) -> dict[str, Any]:
    proc = subprocess.run([SYSTEM_PYTHON, str(PROBE), scenario, env.sock, str(env.tmp / "disk.img")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def file_extents(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of a sparse file, via SEEK_DATA/HOLE."""
    import os
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, data - pos, False))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data, True))
            pos = hole
        return out
    finally:
        os.close(fd)


@needs_libnbd
def test_options(env: NbdDaemon) -> None:
    out = probe(env, "options")
    assert out["list"] == [["rw", ""], ["ro", "read-only disk"]]
    assert out["info"] == {
        "size": 64 * MiB, "description": "read-only disk", "canonical": "ro",
        "block": [1, 4096, 32 * MiB], "is_read_only": True, "can_flush": True, "can_fua": True,
        "can_trim": False, "can_zero": False, "can_fast_zero": False, "can_df": True,
        "can_multi_conn": True, "can_cache": True}
    assert out["meta (all)"] == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    assert out["meta qemu:"] == ["qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    assert out["meta qemu:dirty-bitmap:"] == ["qemu:dirty-bitmap:b0"]
    assert out["meta base:allocation"] == ["base:allocation"]
    assert out["meta nope:x"] == []
    assert out["info missing"] == {"errno": "ENOENT"}
    assert out["structured"] is True
    assert out["contexts"] == ["base:allocation", "qemu:dirty-bitmap:b0"]
    assert out["abort"] is True
    un = out["unstructured"]
    assert un["structured"] is False and un["data"] is True and un["can_df"] is False
    assert out["unstructured block_status"]["errno"] is not None


@needs_libnbd
def test_reads_with_holes(env: NbdDaemon) -> None:
    out = probe(env, "reads")
    assert out["same"] is True and out["cache"] == "ok" and out["flush"] == "ok"
    assert out["df"] == {"same": True, "chunks": 1}     # DF: one chunk, holes as data
    # Holes arrive as OFFSET_HOLE chunks (status READ_HOLE=2), data as OFFSET_DATA (1).
    want = [[o, min(n, 4 * MiB - o), 1 if data else 2]
            for o, n, data in file_extents(env.tmp / "disk.img") if o < 4 * MiB]
    assert out["chunks"] == want
    assert any(c[2] == 2 for c in want) and any(c[2] == 1 for c in want)


@needs_libnbd
def test_block_status_contexts(env: NbdDaemon) -> None:
    out = probe(env, "block_status")
    dirty: list[int] = []
    pos = 0
    for off, n in DIRTY:
        dirty += [off - pos, 0, n, 1]
        pos = off + n
    dirty += [64 * MiB - pos, 0]
    assert out["all"]["qemu:dirty-bitmap:b0"] == dirty
    assert out["all"]["qemu:allocation-depth"] == [64 * MiB, 1]
    alloc = []
    for _o, n, data in file_extents(env.tmp / "disk.img"):
        alloc += [n, 0 if data else 3]
    assert out["all"]["base:allocation"] == alloc
    assert out["one"]["qemu:dirty-bitmap:b0"] == dirty[:2]
    assert out["one"]["base:allocation"] == alloc[:2]
    assert out["one"]["qemu:allocation-depth"] == [64 * MiB, 1]


@needs_libnbd
def test_writes(env: NbdDaemon) -> None:
    out = probe(env, "writes")
    assert out["flags"] == {"is_read_only": False, "can_flush": True, "can_fua": True, "can_trim": True,
                            "can_zero": True, "can_fast_zero": True, "can_df": True,
                            "can_multi_conn": True, "can_cache": True}
    assert out["after zero"] == "00000000" and out["after zero no hole"] == "00000000"
    assert out["fast zero"] == "ok"
    assert out["fast zero no hole"] == {"errno": "ENOTSUP"}
    assert out["read back"] == ["aaaaaaaa", "00000000", "00000000"]
    data = (env.tmp / "rw.img").read_bytes()
    assert data[:65536] == b"\xaa" * 65536 and data[65536:11 * 65536] == bytes(10 * 65536)


@needs_libnbd
def test_bad_requests(env: NbdDaemon) -> None:
    out = probe(env, "errors")
    assert out["read past end"] == {"errno": "EINVAL"}
    assert out["read across end"] == {"errno": "EINVAL"}
    assert out["read 33 MiB"] == {"errno": "EINVAL"}
    assert out["write ro"] == {"errno": "EPERM"}
    assert out["zero ro"] == {"errno": "EPERM"}
    assert out["trim ro"] == {"errno": "EPERM"}
    assert out["bad flags"] == {"errno": "EINVAL"}
    assert out["fua flush"] == "ok"           # QEMU accepts FUA on any command
    assert out["status not negotiated"] == {"errno": "EINVAL"}
    assert out["still works"] is True
    assert out["write 33 MiB"] == {"errno": "EINVAL"}
    assert out["write past end"] == {"errno": "ENOSPC"}
    assert len(out["rw still works"]) == 8
    assert env.ok("query-block-exports")[0]["id"] == "rw"


# ------------------------------------------------------------ raw sockets

def connect(env: NbdDaemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(env.sock)
    greeting = recv_exactly(s, 18)
    assert greeting == b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 3)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    return buf


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def read_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, typ, n = struct.unpack(">QIII", recv_exactly(s, 20))
    assert magic == OPT_REPLY_MAGIC
    return opt, typ, recv_exactly(s, n)


def go(s: socket.socket, name: bytes) -> None:
    s.sendall(option(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)))
    while read_reply(s)[1] != 1:
        pass


def assert_healthy(env: NbdDaemon) -> None:
    """QMP answers and a fresh NBD client reads correct data."""
    assert [e["id"] for e in env.ok("query-block-exports")] == ["rw", "ro"]
    s = connect(env)
    s.sendall(struct.pack(">I", 3))
    go(s, b"ro")
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 9, MiB, 4096))
    magic, err, cookie = struct.unpack(">IIQ", recv_exactly(s, 16))
    assert (magic, err, cookie) == (0x67446698, 0, 9)
    with open(env.tmp / "disk.img", "rb") as f:
        f.seek(MiB)
        assert recv_exactly(s, 4096) == f.read(4096)
    s.close()


def test_malformed_handshakes(env: NbdDaemon) -> None:
    s = connect(env)
    s.sendall(struct.pack(">I", 0x80))          # unknown client flags: dropped
    assert s.recv(10) == b""
    s = connect(env)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0))   # bad option magic
    assert s.recv(10) == b""
    s = connect(env)
    s.sendall(struct.pack(">I", 3) + option(0x77, b"abc"))   # unknown option: ERR_UNSUP, go on
    assert read_reply(s)[:2] == (0x77, (1 << 31) + 1)
    s.sendall(option(9, b"\0\0"))                       # LIST_META_CONTEXT before STRUCTURED_REPLY
    assert read_reply(s)[1] == (1 << 31) + 3
    s.sendall(option(3, b"x"))                          # LIST with a payload
    assert read_reply(s)[1] == (1 << 31) + 3
    s.sendall(option(6, b"\0\0\0\xff"))                 # INFO with a truncated name
    assert read_reply(s)[1] == (1 << 31) + 3
    s.sendall(option(8, b"") + option(8, b""))          # STRUCTURED_REPLY twice
    assert read_reply(s)[1] == 1 and read_reply(s)[1] == (1 << 31) + 3
    s.sendall(option(5))                                # STARTTLS without TLS
    assert read_reply(s)[1] == (1 << 31) + 2
    s.sendall(option(7, struct.pack(">I", 1000) + b"x" * 200))  # GO with a bad length, then half sent
    s.close()
    s = connect(env)
    s.sendall(struct.pack(">I", 3) + option(1, b"nosuch"))       # EXPORT_NAME of no export: dropped
    assert s.recv(10) == b""
    s = connect(env)
    s.sendall(struct.pack(">I", 3) + option(2))                  # ABORT: acknowledged, closed
    assert read_reply(s)[:2] == (2, 1)
    assert s.recv(10) == b""
    assert_healthy(env)


def test_transmission_abuse(env: NbdDaemon) -> None:
    s = connect(env)
    s.sendall(struct.pack(">I", 3))
    go(s, b"rw")
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 42, 1, 0, 0))   # unknown command
    assert struct.unpack(">IIQ", recv_exactly(s, 16)) == (0x67446698, 22, 1)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 0, 33 * MiB))   # READ > 32 MiB
    assert struct.unpack(">IIQ", recv_exactly(s, 16)) == (0x67446698, 22, 2)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 3, 0, 65536) + b"x" * 1000)  # WRITE, cut short
    s.close()
    s = connect(env)
    s.sendall(struct.pack(">I", 3))
    go(s, b"ro")
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 4, 0, 512))   # bad request magic: dropped
    assert s.recv(16) == b""
    # A client holding a huge READ's reply unread does not stall the rest.
    hog = connect(env)
    hog.sendall(struct.pack(">I", 3))
    go(hog, b"ro")
    for i in range(8):
        hog.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 32 * MiB))
    assert_healthy(env)
    hog.close()
    assert_healthy(env)


def _rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_is_bounded(env: NbdDaemon) -> None:
    """A client sending thousands of 1 MiB READs without reading a reply
    costs the daemon a bounded amount of memory, and nobody else waits."""
    before = _rss_mib(env.proc.proc.pid)
    hog = connect(env)
    hog.sendall(struct.pack(">I", 3) + option(8))
    read_reply(hog)
    go(hog, b"ro")
    hog.settimeout(1.0)
    sent = 0
    try:
        while sent < 20000:
            hog.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, sent, 0, MiB))
            sent += 1
    except TimeoutError:
        pass
    assert sent > 100
    assert_healthy(env)
    assert _rss_mib(env.proc.proc.pid) - before < 200
    hog.close()
    assert_healthy(env)
