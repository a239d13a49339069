"""qmpd.block.io: the file layer."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qmpd.block import io
from qmpd.block.errors import BlockIOError
from qmpd.block.io import ImageFile, copy_range, create_file

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

M = 1 << 20


async def test_create_rw_status_and_close(tmp_path: Path) -> None:
    path = str(tmp_path / "a.img")
    await create_file(path, 8 * M)
    img = await ImageFile.open(path)
    assert await img.size() == 8 * M
    await img.write(M, b"\x07" * M)
    assert await img.read(M, 4) == b"\x07" * 4
    assert await img.read(8 * M - 2, 4) == bytes(4)  # zero-filled past EOF
    buf = bytearray(8)
    await img.readinto(M - 4, memoryview(buf))
    assert bytes(buf) == bytes(4) + b"\x07" * 4
    assert await img.block_status(0, 8 * M) == (False, M)
    assert await img.block_status(M, 8 * M) == (True, M)
    assert await img.block_status(M + 4096, 4096) == (True, 4096)
    assert await img.block_status(3 * M, 8 * M) == (False, 8 * M)  # hole to EOF
    assert img.allocated_size() >= M
    await img.write_zeroes(M, 4096, may_unmap=True)
    assert await img.block_status(M, M) == (False, 4096)
    await img.discard(M + 4096, 4096)
    assert await img.block_status(M, M) == (False, 8192)
    await img.flush()
    await img.truncate(16 * M)
    assert await img.size() == 16 * M
    img.close()
    img.close()


async def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(BlockIOError) as ei:
        await ImageFile.open(str(tmp_path / "missing"))
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(BlockIOError) as ei:
        await ImageFile.open(str(tmp_path))
    assert ei.value.errno == errno.EISDIR


async def test_read_only_write_fails(tmp_path: Path) -> None:
    path = str(tmp_path / "a.img")
    await create_file(path, M)
    img = await ImageFile.open(path, read_only=True)
    with pytest.raises(BlockIOError) as ei:
        await img.write(0, b"x")
    assert ei.value.errno == errno.EBADF
    img.close()


async def test_write_zeroes_fallback_without_fallocate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "a.img")
    await create_file(path, 4 * M)
    img = await ImageFile.open(path)
    await img.write(0, b"\x01" * (3 * M))
    monkeypatch.setattr(io, "_fallocate_fn", None)
    await img.write_zeroes(1000, 2 * M + 5, may_unmap=True)
    await img.discard(0, 4096)  # unsupported punch: advisory no-op
    data = await img.read(0, 3 * M)
    assert data[:1000] == b"\x01" * 1000
    assert data[1000 : 1000 + 2 * M + 5] == bytes(2 * M + 5)
    assert data[1000 + 2 * M + 5 :] == b"\x01" * (M - 1005)
    img.close()


async def test_copy_range(tmp_path: Path) -> None:
    src_path, dst_path = str(tmp_path / "s.img"), str(tmp_path / "d.img")
    await create_file(src_path, 4 * M)
    await create_file(dst_path, 4 * M)
    src, dst = await ImageFile.open(src_path), await ImageFile.open(dst_path)
    payload = os.urandom(M + 123)
    await src.write(4096, payload)
    await copy_range(src, 4096, dst, 2 * M, len(payload))
    assert await dst.read(2 * M, len(payload)) == payload
    src.close()
    dst.close()
