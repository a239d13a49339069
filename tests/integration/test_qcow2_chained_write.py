"""An allocating qcow2 write with nothing else under way goes out as one
worker call (``ImageFile.write_seq``): refcount sectors, then the data,
then the L2 sector, in that order (the crash order: nothing points at a
cluster before its refcount and data are written).  A failure before the
L2 sector gives the new clusters back; a failure in the L2 sector keeps
them mapped.  Either way ``qemu-img check`` finds the image clean."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.graph import BlockGraph
from qmpd.block.io import ImageFile, SeqWriteError
from qmpd.block.qemuio import run_qemu_io

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def check_clean(path: Path) -> None:
    r = sh("qemu-img", "check", str(path))
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr
    assert "leaked" not in r.stdout


async def _open(path: Path) -> tuple[BlockGraph, Any]:
    assert sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M").returncode == 0
    g = BlockGraph()
    node = await g.add({"driver": "qcow2", "node-name": "w",
                        "file": {"driver": "file", "filename": str(path)}})
    return g, node


async def test_allocating_writes_are_one_call_in_crash_order(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[tuple[int, int]]] = []
    real = ImageFile.write_seq

    async def recording(self: ImageFile, writes: Any) -> None:
        calls.append([(off, len(b)) for off, b in writes])
        await real(self, writes)

    monkeypatch.setattr(ImageFile, "write_seq", recording)
    img = tmp_path / "a.qcow2"
    g, node = await _open(img)
    for i in range(4):
        out = await run_qemu_io(node, f"write -P {0x40 + i} {i * MiB} 1M")
        assert out.startswith(f"wrote {MiB}/{MiB} bytes at offset {i * MiB}\n")
    l2off = node.driver.image.l1[0] & 0x00FF_FFFF_FFFF_FE00
    await g.close()
    # The first write allocates the L2 table (the usual three phases); the
    # other three are one call each.
    assert len(calls) == 3
    for call in calls:
        assert [n for _, n in call][-2:] == [MiB, 512]
        assert l2off <= call[-1][0] < l2off + 65536
        assert call[0][1] <= 512 and call[0][0] < l2off   # the refcount block sector first
    check_clean(img)
    for i in range(4):
        r = sh("qemu-io", "-f", "qcow2", "-c", f"read -P {0x40 + i} {i * MiB} 1M", str(img))
        assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout


@pytest.mark.parametrize("fail_at", ["data", "l2"])
async def test_failed_chained_write_keeps_the_image_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fail_at: str) -> None:
    armed = [False]
    real = ImageFile.write_seq

    async def failing(self: ImageFile, writes: Any) -> None:
        if not armed[0]:
            await real(self, writes)
            return
        armed[0] = False
        done = len(writes) - (2 if fail_at == "data" else 1)
        for off, b in writes[:done]:
            os.pwrite(self.fd, b, off)
        raise SeqWriteError(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), done)

    monkeypatch.setattr(ImageFile, "write_seq", failing)
    img = tmp_path / "a.qcow2"
    g, node = await _open(img)
    assert (await run_qemu_io(node, "write -P 0x11 0 1M")).startswith("wrote")
    armed[0] = True
    out = await run_qemu_io(node, f"write -P 0x22 {MiB} 1M")
    assert out == "write failed: No space left on device\n"
    assert not armed[0]
    # The next allocating write takes the same path and succeeds.
    assert (await run_qemu_io(node, f"write -P 0x33 {2 * MiB} 1M")).startswith("wrote")
    await g.close()
    check_clean(img)
    r = sh("qemu-img", "map", "--output=json", str(img))
    assert r.returncode == 0
    mapped = [e for e in json.loads(r.stdout) if e["data"]]
    covered = sum(e["length"] for e in mapped)
    if fail_at == "data":
        # The failed write's clusters were given back and reused.
        assert covered == 2 * MiB
    else:
        # Its L2 entries stay (the write may be partly on disk).
        assert covered == 3 * MiB
