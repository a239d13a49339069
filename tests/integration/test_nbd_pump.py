"""Connections of plain file exports served by their data-pump thread
(qmpd/nbd/pump.py): READs on the thread, everything else on the event
loop, replies in one stream.  Pipelines mixing writes, reads, holes,
flushes and errors; a cold image (read-ahead of the queued READs); more
clients than pump threads; a client that never reads its replies is cut
off by a hard ``block-export-del`` and by SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpd.nbd.server import MAX_PUMPS
from tests.integration.test_nbd_libnbd import connect, go, option, read_reply, recv_exactly
from tests.support.daemon import short_socket_dir
from tests.support.nbd import MiB, NbdDaemon

pytestmark = [pytest.mark.timeout(180)]

REQ = 0x25609513
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF
READ, WRITE, FLUSH, TRIM, WRITE_ZEROES = 0, 1, 3, 4, 6
CHUNK_DATA, CHUNK_HOLE, CHUNK_ERROR = 1, 2, 32769
SIZE = 32 * MiB
HOLE_AT = 16 * MiB   # 4 MiB hole in the "rw" image


def _sparse_image(path: Path) -> bytes:
    data = bytearray(random.Random(3).randbytes(SIZE))
    data[HOLE_AT:HOLE_AT + 4 * MiB] = bytes(4 * MiB)
    with open(path, "wb") as f:
        f.write(data[:HOLE_AT])
        f.seek(HOLE_AT + 4 * MiB)
        f.write(data[HOLE_AT + 4 * MiB:])
    return bytes(data)


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[tuple[NbdDaemon, bytes]]:
    with short_socket_dir(tmp_path) as tmp:
        data = _sparse_image(tmp / "rw.img")
        d = NbdDaemon(tmp)
        try:
            d.add_raw("rw0", tmp / "rw.img")
            d.start_server()
            d.ok("block-export-add", type="nbd", id="rw", **{"node-name": "rw0"}, name="rw", writable=True)
            yield d, data
        finally:
            d.close()


def open_export(d: NbdDaemon, name: bytes = b"rw") -> socket.socket:
    s = connect(d)
    s.sendall(struct.pack(">I", 3))
    s.sendall(option(8))                      # STRUCTURED_REPLY
    assert read_reply(s)[:2] == (8, 1)
    go(s, name)
    return s


def request(cmd: int, cookie: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, offset, length) + payload


def read_answers(s: socket.socket, count: int) -> dict[int, list[tuple[int, bytes]]]:
    """``count`` complete replies: cookie -> [(chunk type or -errno, payload)]
    (a simple reply is one chunk of type 0, or -error)."""
    got: dict[int, list[tuple[int, bytes]]] = {}
    done = 0
    while done < count:
        (magic,) = struct.unpack(">I", recv_exactly(s, 4))
        if magic == SIMPLE:
            err, cookie = struct.unpack(">IQ", recv_exactly(s, 12))
            got.setdefault(cookie, []).append((-err if err else 0, b""))
            done += 1
            continue
        assert magic == STRUCTURED
        flags, typ, cookie, n = struct.unpack(">HHQI", recv_exactly(s, 16))
        got.setdefault(cookie, []).append((typ, recv_exactly(s, n)))
        done += flags & 1
    return got


def read_back(chunks: list[tuple[int, bytes]], offset: int, length: int) -> bytes:
    """The bytes a structured READ reply describes (holes as zeroes)."""
    out = bytearray(length)
    for typ, payload in chunks:
        (at,) = struct.unpack(">Q", payload[:8])
        if typ == CHUNK_DATA:
            out[at - offset:at - offset + len(payload) - 8] = payload[8:]
        else:
            assert typ == CHUNK_HOLE, typ
            (n,) = struct.unpack(">I", payload[8:12])
            out[at - offset:at - offset + n] = bytes(n)
    return bytes(out)


def test_mixed_pipeline(env: tuple[NbdDaemon, bytes]) -> None:
    """Writes, write-zeroes, trims and a flush (served on the loop) and
    reads (served on the thread) in one pipeline: every reply right, and
    reads sent after a write's reply see it."""
    d, data = env
    image = bytearray(data)
    rng = random.Random(9)
    s = open_export(d)
    batch = bytearray()
    expect: dict[int, str] = {}
    clusters = [c * 65536 for c in range(SIZE // 65536) if not HOLE_AT <= c * 65536 < HOLE_AT + 4 * MiB]
    for i in range(200):
        off = rng.choice(clusters)
        if i % 4 == 0:
            payload = rng.randbytes(65536)
            image[off:off + 65536] = payload
            batch += request(WRITE, i, off, 65536, payload)
            expect[i] = "ok"
        elif i % 4 == 1:
            batch += request(READ, i, off, 8192)   # may race the writes: only the shape is checked
            expect[i] = "read"
        elif i % 4 == 2:
            image[off:off + 4096] = bytes(4096)
            batch += request(WRITE_ZEROES, i, off, 4096)
            expect[i] = "ok"
        else:
            batch += request(READ, i, SIZE - 4096, 8192)   # past the end: EINVAL
            expect[i] = "einval"
    batch += request(FLUSH, 999, 0, 0)
    expect[999] = "ok"
    sender = threading.Thread(target=s.sendall, args=(bytes(batch),))
    sender.start()
    got = read_answers(s, len(expect))
    sender.join()
    assert set(got) == set(expect)
    for cookie, kind in expect.items():
        chunks = got[cookie]
        if kind == "ok":
            assert chunks == [(0, b"")], cookie
        elif kind == "einval":
            assert [typ for typ, _ in chunks] == [CHUNK_ERROR]
            assert struct.unpack(">I", chunks[0][1][:4]) == (22,)
        else:
            assert all(typ in (CHUNK_DATA, CHUNK_HOLE) for typ, _ in chunks)
    # Now that every write is answered, reads see them all (and the hole).
    reads = [(i, i * MiB, MiB) for i in range(SIZE // MiB)]
    s.sendall(b"".join(request(READ, i, off, n) for i, off, n in reads))
    got = read_answers(s, len(reads))
    for i, off, n in reads:
        assert read_back(got[i], off, n) == bytes(image[off:off + n]), i
    hole = got[(HOLE_AT + MiB) // MiB]
    assert [typ for typ, _ in hole] == [CHUNK_HOLE]
    s.close()
    assert (d.tmp / "rw.img").read_bytes() == bytes(image)


def test_cold_image_reads_exact(env: tuple[NbdDaemon, bytes]) -> None:
    d, data = env
    fd = os.open(d.tmp / "rw.img", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    rng = random.Random(4)
    reads = [(i, rng.randrange(0, SIZE - MiB) // 512 * 512, rng.choice([512, 65536, 256 * 1024, MiB]))
             for i in range(256)]
    s = open_export(d)
    s.sendall(b"".join(request(READ, i, off, n) for i, off, n in reads))
    got = read_answers(s, len(reads))
    for i, off, n in reads:
        assert read_back(got[i], off, n) == data[off:off + n], i
    s.close()


def test_more_clients_than_pumps(env: tuple[NbdDaemon, bytes]) -> None:
    d, data = env
    clients = [open_export(d) for _ in range(MAX_PUMPS + 3)]
    for i, s in enumerate(clients):
        s.sendall(request(READ, i, i * 65536, 65536))
    for i, s in enumerate(clients):
        got = read_answers(s, 1)
        assert read_back(got[i], i * 65536, 65536) == data[i * 65536:(i + 1) * 65536]
    for s in clients:
        s.close()


def _stuck_client(d: NbdDaemon) -> socket.socket:
    """A client with READs queued that never reads a reply: its pump
    thread ends up blocked on the full socket."""
    hog = open_export(d)
    hog.settimeout(1.0)
    batch = b"".join(request(READ, i, (i % 8) * 2 * MiB, 2 * MiB) for i in range(64))
    try:
        for _ in range(200):
            hog.sendall(batch)
    except TimeoutError:
        pass
    return hog


def _until_eof(s: socket.socket) -> None:
    """Read until the server's end (a reset: it dropped unread requests)."""
    s.settimeout(30)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass


def test_hard_delete_cuts_a_stuck_client(env: tuple[NbdDaemon, bytes]) -> None:
    d, data = env
    hog = _stuck_client(d)
    other = open_export(d)
    other.sendall(request(READ, 1, 0, 4096))
    assert read_back(read_answers(other, 1)[1], 0, 4096) == data[:4096]
    other.close()
    assert d.q("block-export-del", id="rw") == {
        "error": {"class": "GenericError", "desc": "export 'rw' still in use"}}
    assert d.q("block-export-del", id="rw", mode="hard") == {"return": {}}
    _until_eof(hog)
    assert d.ok("query-block-exports") == []
    assert {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "rw"}} in d.events
    hog.close()


@pytest.mark.slow
def test_sigterm_with_a_stuck_client(tmp_path: Path) -> None:
    with short_socket_dir(tmp_path) as tmp:
        _sparse_image(tmp / "rw.img")
        d = NbdDaemon(tmp)
        d.add_raw("rw0", tmp / "rw.img")
        d.start_server()
        d.ok("block-export-add", type="nbd", id="rw", **{"node-name": "rw0"}, name="rw")
        hog = _stuck_client(d)
        d.proc.proc.send_signal(signal.SIGTERM)
        assert d.proc.proc.wait(15) == 0
        _until_eof(hog)
        hog.close()
        d.qmp.close()
        d.proc.stop()
