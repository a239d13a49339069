"""QEMU's tests/qemu-iotests/tests/image-fleecing against qmpd: a qcow2
source, the four fleecing graphs (backup ``sync=none`` into a qcow2 temp
node backed by the source; copy-before-write into that qcow2 node; cbw into
a raw file read through ``snapshot-access``; the same with a persistent
``bitmap`` limiting the snapshot), the point-in-time view read over NBD by
``qemu-io`` while the guest overwrites the source, the writes confirmed in
the source afterwards and the fleecing qcow2 passing ``qemu-img check``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import short_socket_dir
from tests.support.nbd import MiB, NbdDaemon, have, run

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.slow,
    pytest.mark.skipif(not have("qemu-io", "qemu-img", "nbdcopy"), reason="needs qemu-utils, libnbd-bin"),
]

SIZE = 64 * MiB
PATTERNS = [(0x5d, 0, 0x10000), (0xd5, 0x100000, 0x10000), (0xdc, 0x2000000, 0x10000),
            (0xcd, 0x3ff0000, 0x10000)]
OVERWRITE = [(0xab, 0, 0x10000), (0xad, 0x00f8000, 0x10000), (0x1d, 0x2008000, 0x10000),
             (0xea, 0x3fe0000, 0x10000)]
ZEROES = [(0, 0x00f8000, 0x8000), (0, 0x2010000, 0x8000), (0, 0x3fe0000, 0x10000)]
REMAINDER = [(0xd5, 0x108000, 0x8000), (0xdc, 0x2000000, 0x8000), (0xcd, 0x3ff0000, 0x10000)]


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    with short_socket_dir(tmp_path) as t:
        yield t


def image(writes: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(SIZE)
    for pat, off, n in writes:
        buf[off:off + n] = bytes([pat]) * n
    return bytes(buf)


def qemu_io_reads(uri: str, checks: list[tuple[int, int, int]], bitmap: bool) -> None:
    """``qemu-io -r -f raw -c 'read -P...'`` over NBD, as the iotest; with
    the cbw ``bitmap`` the snapshot holds only the clusters written after
    bitmap0 was added, and reads elsewhere fail with EINVAL as in QEMU 7.2's
    image-fleecing.out."""
    for pat, off, n in checks:
        proc = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P{pat:#x} {off:#x} {n:#x}", uri, check=False)
        if bitmap and (pat, off, n) in ZEROES:
            assert (proc.returncode, proc.stdout) == (1, "read failed: Invalid argument\n"), proc
        else:
            assert proc.returncode == 0 and proc.stdout.startswith("read ") and "failed" not in proc.stdout, proc


@pytest.mark.parametrize("use_cbw,use_access,bitmap", [
    (False, False, False), (True, False, False), (True, True, False), (True, True, True)],
    ids=["backup-sync-none", "cbw-qcow2", "snapshot-access", "snapshot-access-bitmap"])
def test_image_fleecing(tmp: Path, use_cbw: bool, use_access: bool, bitmap: bool) -> None:
    base, fleece = tmp / "base.qcow2", tmp / "fleece.img"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    if bitmap:
        run("qemu-img", "bitmap", "--add", str(base), "bitmap0")
    run("qemu-img", "create", "-q", "-f", "raw" if use_access else "qcow2", str(fleece), "64M")
    for pat, off, n in PATTERNS:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P{pat:#x} {off:#x} {n:#x}", str(base))

    env = NbdDaemon(tmp)
    try:
        env.ok("blockdev-add", driver="qcow2", **{"node-name": "source"},
               file={"driver": "file", "filename": str(base)})
        if use_access:
            env.ok("blockdev-add", **{"node-name": "temp"}, driver="file", filename=str(fleece))
        else:
            env.ok("blockdev-add", driver="qcow2", **{"node-name": "temp"},
                   file={"driver": "file", "filename": str(fleece)}, backing="source")
        guest = "source"
        if use_cbw:
            cbw: dict[str, Any] = {"driver": "copy-before-write", "node-name": "fl-cbw", "file": "source", "target": "temp"}
            if bitmap:
                cbw["bitmap"] = {"node": "source", "name": "bitmap0"}
            env.ok("blockdev-add", **cbw)
            guest = "fl-cbw"
            if use_access:
                env.ok("blockdev-add", driver="snapshot-access", **{"node-name": "fl-access"}, file="fl-cbw")
        else:
            env.ok("blockdev-backup", **{"job-id": "fleecing"}, device="source", target="temp", sync="none")
        export = "fl-access" if use_access else "temp"
        env.start_server()
        env.ok("nbd-server-add", device=export)
        uri = env.uri(export)

        before = image(PATTERNS)
        qemu_io_reads(uri, PATTERNS + ZEROES, bitmap)
        for pat, off, n in OVERWRITE:                       # the guest writes (COW)
            env.hmp(f'qemu-io {guest} "write -P{pat:#x} {off:#x} {n:#x}"')
        qemu_io_reads(uri, PATTERNS + ZEROES, bitmap)
        if not bitmap:
            run("nbdcopy", uri, str(tmp / "view.img"))
            assert (tmp / "view.img").read_bytes() == before

        env.ok("nbd-server-stop")
        if use_cbw:
            if use_access:
                env.ok("blockdev-del", **{"node-name": "fl-access"})
            env.ok("blockdev-del", **{"node-name": "fl-cbw"})
        else:
            env.ok("block-job-cancel", device="fleecing")
            while not any(e["event"] == "BLOCK_JOB_CANCELLED" for e in env.events):
                msg = env.qmp.read_msg()
                msg.pop("timestamp", None)
                env.events.append(msg)
            ev = next(e for e in env.events if e["event"] == "BLOCK_JOB_CANCELLED")
            assert ev["data"] == {"device": "fleecing", "len": SIZE, "offset": ev["data"]["offset"],
                                  "speed": 0, "type": "backup"}
        env.ok("blockdev-del", **{"node-name": "temp"})
        env.ok("blockdev-del", **{"node-name": "source"})
    finally:
        env.close()

    assert json.loads(run("qemu-img", "check", "--output=json", str(base)).stdout)["check-errors"] == 0
    if not use_access:
        assert json.loads(run("qemu-img", "check", "--output=json", str(fleece)).stdout)["check-errors"] == 0
    for pat, off, n in OVERWRITE + REMAINDER:
        out = run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -P{pat:#x} {off:#x} {n:#x}", str(base)).stdout
        assert "failed" not in out, out
    run("qemu-img", "convert", "-O", "raw", str(base), str(tmp / "after.raw"))
    assert (tmp / "after.raw").read_bytes() == image(PATTERNS + OVERWRITE)
