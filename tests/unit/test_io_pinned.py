"""PinnedFile: the blocking calls of an NBD connection's data pump."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

from qmpd.block.io import ImageFile, PinnedFile

MiB = 1 << 20


def _pinned(tmp_path: Path, data: bytes, hole: int = 0) -> tuple[ImageFile, PinnedFile]:
    """An image of ``data`` whose first ``hole`` bytes are a hole."""
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.seek(hole)
        f.write(data[hole:])
    image = asyncio.run(ImageFile.open(str(path), read_only=True))
    return image, PinnedFile(image)


def _collect(sock: socket.socket, n: int, out: list[bytes]) -> None:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    out.append(bytes(got))


def test_send_head_data_and_zeros_past_eof_through_a_full_socket(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    image, pinned = _pinned(tmp_path, data)
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    waits = []

    def wait() -> bool:
        waits.append(1)
        return True

    length = 4 * MiB   # 1 MiB - 123 past the end of the file, then some
    out: list[bytes] = []
    reader = threading.Thread(target=_collect, args=(b, 16 + length, out))
    reader.start()
    try:
        assert pinned.send(a, b"H" * 16, 1000, length, wait)
    finally:
        reader.join()
    assert out[0] == b"H" * 16 + data[1000:] + bytes(length - (len(data) - 1000))
    assert waits   # the small buffer filled at least once
    pinned.close()
    pinned.close()
    image.close()
    a.close()
    b.close()


def test_send_gives_up_when_wait_says_so(tmp_path: Path) -> None:
    image, pinned = _pinned(tmp_path, bytes(4 * MiB))
    a, b = socket.socketpair()
    a.setblocking(False)
    assert not pinned.send(a, b"H" * 16, 0, 4 * MiB, lambda: False)   # nobody reads b
    pinned.close()
    image.close()
    a.close()
    b.close()


def test_pinned_descriptor_outlives_the_image(tmp_path: Path) -> None:
    data = bytes(65536) + os.urandom(65536)
    image, pinned = _pinned(tmp_path, data, hole=65536)
    image.close()
    assert not pinned.all_data(0, 131072) and pinned.all_data(65536, 65536)
    segs = pinned.read_sparse(0, 131072, base=0)
    assert b"".join(bytes(s) if isinstance(s, int) else s for _, s in segs) == data
    pinned.will_need(0, 131072)
    pinned.close()
