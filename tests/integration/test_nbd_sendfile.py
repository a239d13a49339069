"""READs of a dense, warm image: the server sends them with sendfile(2)
straight from the page cache.  Deep pipelines, simple and structured
replies, a window into the file (raw ``offset``), a client that reads its
replies slowly (partial sends) and one that never reads them (memory stays
bounded, QMP and other clients go on)."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_nbd_libnbd import _rss_mib, connect, go, option, read_reply, recv_exactly
from tests.support.daemon import short_socket_dir
from tests.support.nbd import MiB, NbdDaemon

pytestmark = [pytest.mark.timeout(180)]

REQ = 0x25609513
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF
SIZE = 64 * MiB
WINDOW = 3 * MiB   # raw offset of the "win" export


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdDaemon]:
    base = tmp_path_factory.mktemp("nbdsf")
    with short_socket_dir(base) as tmp:
        with open(tmp / "dense.img", "wb") as f:
            f.write(random.Random(11).randbytes(SIZE))
        d = NbdDaemon(tmp)
        d.add_raw("dense0", tmp / "dense.img")
        d.add_raw("win0", tmp / "dense.img", offset=WINDOW, size=32 * MiB)
        d.start_server()
        d.ok("block-export-add", type="nbd", id="dense", **{"node-name": "dense0"}, name="dense")
        d.ok("block-export-add", type="nbd", id="win", **{"node-name": "win0"}, name="win")
        try:
            yield d
        finally:
            d.close()


def image(env: NbdDaemon) -> bytes:
    return (env.tmp / "dense.img").read_bytes()


def open_export(env: NbdDaemon, name: bytes, *, structured: bool) -> socket.socket:
    s = connect(env)
    s.sendall(struct.pack(">I", 3))
    if structured:
        s.sendall(option(8))
        assert read_reply(s)[:2] == (8, 1)
    go(s, name)
    return s


def read_replies(s: socket.socket, lengths: dict[int, int], *, structured: bool,
                 chunk: int) -> dict[int, bytes]:
    """Read the replies to READs of ``lengths`` (cookie: length), at most
    ``chunk`` bytes per recv."""
    buf = bytearray()

    def take(n: int) -> bytes:
        while len(buf) < n:
            got = s.recv(min(chunk, max(n - len(buf), 1 << 16)))
            if not got:
                raise EOFError
            buf.extend(got)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    got: dict[int, bytes] = {}
    while len(got) < len(lengths):
        if structured:
            magic, flags, typ, cookie, n = struct.unpack(">IHHQI", take(20))
            assert (magic, flags, typ) == (STRUCTURED, 1, 1)   # one final OFFSET_DATA chunk
            payload = take(n)
            got[cookie] = payload    # offset (8 bytes), then the data
        else:
            magic, err, cookie = struct.unpack(">IIQ", take(16))
            assert (magic, err) == (SIMPLE, 0)
            got[cookie] = take(lengths[cookie])
    return got


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_reads_are_exact(env: NbdDaemon, structured: bool) -> None:
    data = image(env)
    rng = random.Random(5)
    reqs = [(i, rng.randrange(0, SIZE - 2 * MiB) // 512 * 512, rng.choice([4096, 65536, MiB, 2 * MiB]))
            for i in range(300)]
    s = open_export(env, b"dense", structured=structured)
    sender = threading.Thread(target=lambda: s.sendall(b"".join(
        struct.pack(">IHHQQI", REQ, 0, 0, i, off, n) for i, off, n in reqs)))
    sender.start()
    # Small recvs keep the socket full: many replies go out in parts.
    got = read_replies(s, {i: n for i, _, n in reqs}, structured=structured, chunk=7000)
    sender.join()
    s.close()
    for i, off, n in reqs:
        if structured:
            assert got[i][:8] == struct.pack(">Q", off)
            assert got[i][8:] == data[off:off + n], i
        else:
            assert got[i] == data[off:off + n], i


def test_window_of_a_file(env: NbdDaemon) -> None:
    data = image(env)
    s = open_export(env, b"win", structured=True)
    offs = [0, MiB - 4096, 31 * MiB]
    for i, off in enumerate(offs):
        s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, i, off, MiB))
    got = read_replies(s, dict.fromkeys(range(len(offs)), MiB), structured=True, chunk=1 << 20)
    for i, off in enumerate(offs):
        assert got[i] == struct.pack(">Q", off) + data[WINDOW + off:WINDOW + off + MiB]
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, 9, 32 * MiB - 512, 1024))   # past the window's end
    magic, flags, typ, cookie, n = struct.unpack(">IHHQI", recv_exactly(s, 20))
    assert (magic, flags, typ, cookie) == (STRUCTURED, 1, 0x8001, 9)   # ERROR chunk
    assert struct.unpack(">I", recv_exactly(s, n)[:4]) == (22,)         # EINVAL
    s.close()


def assert_healthy(env: NbdDaemon, data: bytes) -> None:
    assert [e["id"] for e in env.ok("query-block-exports")] == ["win", "dense"]
    s = open_export(env, b"dense", structured=False)
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, 7, 5 * MiB, 65536))
    assert struct.unpack(">IIQ", recv_exactly(s, 16)) == (SIMPLE, 0, 7)
    assert recv_exactly(s, 65536) == data[5 * MiB:5 * MiB + 65536]
    s.close()


def test_client_that_never_reads_is_bounded(env: NbdDaemon) -> None:
    """Thousands of 2 MiB READs of a warm image, no reply read: the daemon
    stops reading that client's requests once the socket is full."""
    data = image(env)
    before = _rss_mib(env.proc.proc.pid)
    hog = open_export(env, b"dense", structured=True)
    hog.settimeout(1.0)
    sent = 0
    # 64 requests per send: a plain file export's data pump stops reading
    # as soon as its socket is full, and the kernel holds far more
    # requests when they come in few large writes than in many small ones.
    try:
        while sent < 20000:
            hog.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, (i % 30) * 2 * MiB, 2 * MiB)
                                 for i in range(sent, sent + 64)))
            sent += 64
    except TimeoutError:
        pass
    assert sent > 100
    assert_healthy(env, data)
    assert _rss_mib(env.proc.proc.pid) - before < 200
    hog.close()
    assert_healthy(env, data)


def test_image_unchanged(env: NbdDaemon) -> None:
    assert (env.tmp / "dense.img").stat().st_size == SIZE
    assert Path(env.tmp / "dense.img").read_bytes() == random.Random(11).randbytes(SIZE)
