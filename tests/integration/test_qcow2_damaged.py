"""Damaged qcow2 images that QEMU 7.2 opens: the same requests through
qemu-io and through qmpd give the same results, the same corruption
message, and images that ``qemu-img check`` reports identically (same
errors, same leaks).  Each image is written with data first, then one
metadata field is broken by hand."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.graph import BlockGraph

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

COPIED = 1 << 63
# qemu-img create 16M, then 128 KiB written at 0: header, reftable (0x10000),
# refblock (0x20000), L1 (0x30000), L2 (0x40000), data (0x50000, 0x60000).
CASES = {
    # L1 entry -> an L2 table past the end of the file: reads as zeroes.
    "l2_past_eof": ({0x30000: struct.pack(">Q", COPIED | 0x2000000)}, None),
    # L1 entry -> an unaligned L2 table: corruption at the first access.
    "l2_unaligned": ({0x30000: struct.pack(">Q", COPIED | 0x40200)},
                     "L2 table offset 0x40200 unaligned (L1 index: 0)"),
    "data_unaligned": ({0x40000: struct.pack(">Q", COPIED | 0x50200)},
                       "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, "
                       "L2 index: 0)"),
    "data_past_eof": ({0x40000: struct.pack(">Q", COPIED | 0x3000000)}, None),
    # A referenced cluster whose refcount is 0: freeing it fails, QEMU goes on.
    "refcount_zero": ({0x20000 + 2 * 5: struct.pack(">H", 0)}, None),
    # The active L1 table past the end of the file.
    "l1_past_eof": ({40: struct.pack(">Q", 0x1000000)}, None),
    # An unaligned refcount block: corruption at the first refcount access
    # (the in-place write needs none, the discard does).
    "refblock_unaligned": ({0x10000: struct.pack(">Q", 0x20200)},
                           "Refblock offset 0x20200 unaligned (reftable index: 0)"),
    # A refcount table entry with reserved bits.
    "refblock_reserved_bits": ({0x10000: struct.pack(">Q", 0x20008)}, None),
}
# BLOCK_IMAGE_CORRUPTED as qemu-storage-daemon 7.2 sent it for the first
# write (64 KiB at 0 through an NBD export), recorded by hand.
QSD_EVENTS = {
    # The file cut after the header: no refcount table, no refcount block.
    "truncated_after_header": (104, {
        "device": "", "node-name": "d", "fatal": True, "offset": 65536, "size": 65536,
        "msg": "Preventing invalid write on metadata (overlaps with refcount table)"}),
    # The refcount block past the end of the file (it reads as zeroes).
    "refblock_past_eof": ({0x10000: struct.pack(">Q", 0x1000000)}, {
        "device": "", "node-name": "d", "fatal": True,
        "msg": "Preventing invalid allocation of L2 table at offset 0"}),
}
OPS = [("read", 0, 65536), ("write", 0, 4096), ("discard", 0, 65536), ("write", 65536, 65536),
       ("read", 0, 131072)]


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def make(path: Path, patch: dict[int, bytes]) -> None:
    assert sh("qemu-img", "create", "-f", "qcow2", str(path), "16M").returncode == 0
    assert sh("qemu-io", "-c", "write -P 0x11 0 128k", str(path)).returncode == 0
    data = bytearray(path.read_bytes())
    for off, b in patch.items():
        data[off:off + len(b)] = b
    path.write_bytes(bytes(data))


def check_report(path: Path) -> tuple[int, list[str]]:
    r = sh("qemu-img", "check", str(path))
    lines = [ln.replace(str(path), "IMG") for ln in (r.stdout + r.stderr).splitlines()]
    return r.returncode, sorted(ln for ln in lines if ln and "allocated" not in ln)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_damaged_image_as_qemu(tmp_path: Path, case: str) -> None:
    patch, corrupt_msg = CASES[case]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    make(theirs, patch)
    shutil.copy(theirs, ours)
    args = ["qemu-io", "-f", "qcow2", "-d", "unmap"]
    for op, off, n in OPS:
        args += ["-c", f"{op} {'-P 0x22 ' if op == 'write' else ''}{off} {n}"]
    r = sh(*args, str(theirs))
    qemu_failed = [ln.split(" failed")[0] for ln in r.stdout.splitlines() if " failed:" in ln]
    if corrupt_msg is not None:
        assert f"qcow2: Marking image as corrupt: {corrupt_msg};" in r.stderr

    events: list[tuple[str, dict[str, Any]]] = []
    g = BlockGraph(emit_event=lambda name, data: events.append((name, data)))
    node = await g.add({"driver": "qcow2", "node-name": "d", "discard": "unmap",
                        "file": {"driver": "file", "filename": str(ours)}})
    failed = []
    for op, off, n in OPS:
        try:
            if op == "read":
                await node.read(off, n)
            elif op == "write":
                await node.write(off, b"\x22" * n)
            else:
                await node.discard(off, n)
        except OSError:
            failed.append(op)
    await g.close()
    assert failed == qemu_failed
    if corrupt_msg is None:
        assert events == []
    else:
        assert [(n, d["msg"], d["fatal"]) for n, d in events] == \
            [("BLOCK_IMAGE_CORRUPTED", corrupt_msg, True)]
    assert check_report(ours) == check_report(theirs)
    if corrupt_msg is None:
        r = sh("qemu-img", "compare", str(ours), str(theirs))
        assert r.returncode == 0, r.stdout + r.stderr


REFUSED = {
    "truncated_4": ({}, 4), "truncated_71": ({}, 71), "truncated_80": ({}, 80),
    "truncated_100": ({}, 100),
    "header_length_over_cluster": ({100: struct.pack(">I", 1 << 17)}, None),
    "refcount_order_7": ({96: struct.pack(">I", 7)}, None),
    "data_file_bit": ({72: struct.pack(">Q", 1 << 2)}, None),
    "two_unknown_bits": ({72: struct.pack(">Q", (1 << 5) | (1 << 63))}, None),
    "named_and_unknown": ({72: struct.pack(">Q", (1 << 4) | (1 << 9))}, None),
    "cluster_bits_8": ({20: struct.pack(">I", 8)}, None),
    "cluster_bits_22": ({20: struct.pack(">I", 22)}, None),
    "version_4": ({4: struct.pack(">I", 4)}, None),
    "aes": ({32: struct.pack(">I", 1)}, None),
    "luks_without_header": ({32: struct.pack(">I", 2)}, None),
    "crypt_3": ({32: struct.pack(">I", 3)}, None),
    "l1_too_large": ({36: struct.pack(">I", 1 << 23)}, None),
    "snapshot_offset_unaligned": ({60: struct.pack(">IQ", 1, 0x10001)}, None),
    "no_refcount_table": ({56: struct.pack(">I", 0)}, None),
    "backing_offset_past_cluster": ({8: struct.pack(">QI", 70000, 10)}, None),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_refused_open_as_qemu(tmp_path: Path, case: str) -> None:
    """QEMU's error text (recorded from qemu-io 7.2 in the same run), and
    the file is byte for byte unchanged after qmpd's refusal."""
    import hashlib

    from qmpd.errors import GenericError
    patch, trunc = REFUSED[case]
    img = tmp_path / "img.qcow2"
    assert sh("qemu-img", "create", "-f", "qcow2", str(img), "1G").returncode == 0
    data = bytearray(img.read_bytes())
    for off, b in patch.items():
        data[off:off + len(b)] = b
    if trunc is not None:
        del data[trunc:]
    img.write_bytes(bytes(data))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    r = sh("qemu-io", "-f", "qcow2", "-c", "quit", str(img))
    prefix = f"qemu-io: can't open device {img}: "
    assert r.returncode == 1 and r.stderr.startswith(prefix), r.stderr
    text = r.stderr[len(prefix):].strip()
    for read_only in (False, True):
        g = BlockGraph()
        with pytest.raises(GenericError) as err:
            await g.add({"driver": "qcow2", "node-name": "d", "read-only": read_only,
                         "file": {"driver": "file", "filename": str(img)}})
        assert err.value.desc == text
        assert g.names() == []
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


async def test_encrypted_image_refused_as_qemu(tmp_path: Path) -> None:
    img = tmp_path / "luks.qcow2"
    r = sh("qemu-img", "create", "-q", "--object", "secret,id=s0,data=xyz", "-f", "qcow2", "-o",
           "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200", str(img), "1M")
    assert r.returncode == 0, r.stderr
    r = sh("qemu-io", "-f", "qcow2", "-c", "quit", str(img))
    text = r.stderr.split(": ", 2)[2].strip()
    from qmpd.errors import GenericError
    g = BlockGraph()
    with pytest.raises(GenericError) as err:
        await g.add({"driver": "qcow2", "node-name": "d",
                     "file": {"driver": "file", "filename": str(img)}})
    assert err.value.desc == text == "Parameter 'encrypt.key-secret' is required for cipher"


@pytest.mark.parametrize("case", sorted(QSD_EVENTS))
async def test_corruption_event_as_qemu_storage_daemon(tmp_path: Path, case: str) -> None:
    how, event = QSD_EVENTS[case]
    img = tmp_path / "img.qcow2"
    assert sh("qemu-img", "create", "-f", "qcow2", str(img), "16M").returncode == 0
    data = bytearray(img.read_bytes())
    if isinstance(how, int):
        del data[how:]
    else:
        for off, b in how.items():
            data[off:off + len(b)] = b
    img.write_bytes(bytes(data))
    events: list[tuple[str, dict[str, Any]]] = []
    g = BlockGraph(emit_event=lambda name, d: events.append((name, d)))
    node = await g.add({"driver": "qcow2", "node-name": "d",
                        "file": {"driver": "file", "filename": str(img)}})
    assert bytes(await node.read(0, 65536)) == bytes(65536)
    with pytest.raises(OSError):
        await node.write(0, b"x" * 65536)
    await g.close()
    assert events == [("BLOCK_IMAGE_CORRUPTED", event)]
    r = sh("qemu-img", "info", "--output=json", str(img))
    assert '"corrupt": true' in r.stdout


@pytest.mark.parametrize("extra,refused", [(1024, False), (1025, True)])
async def test_snapshot_extra_data_limit_as_qemu(tmp_path: Path, extra: int, refused: bool) -> None:
    """QEMU's qcow2_read_snapshots refuses more than 1024 bytes of extra
    data in a snapshot table entry, read-only or not."""
    import hashlib

    from qmpd.errors import GenericError
    img = tmp_path / "img.qcow2"
    assert sh("qemu-img", "create", "-f", "qcow2", str(img), "16M").returncode == 0
    assert sh("qemu-io", "-c", "write -P 5 0 64k", str(img)).returncode == 0
    assert sh("qemu-img", "snapshot", "-c", "s1", str(img)).returncode == 0
    data = bytearray(img.read_bytes())
    (table,) = struct.unpack_from(">Q", data, 64)
    data[table + 36:table + 40] = struct.pack(">I", extra)
    img.write_bytes(bytes(data))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    r = sh("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 5 0 512", str(img))
    for read_only in (True, False):
        g = BlockGraph()
        args = {"driver": "qcow2", "node-name": "d", "read-only": read_only,
                "file": {"driver": "file", "filename": str(img)}}
        if refused:
            text = r.stderr.splitlines()[0].split(": ", 2)[2]
            assert text == "Too much extra metadata in snapshot table entry 0"
            with pytest.raises(GenericError) as err:
                await g.add(args)
            assert err.value.desc == text
        else:
            assert r.returncode == 0, r.stderr
            node = await g.add(args)
            assert bytes(await node.read(0, 512)) == b"\x05" * 512
            await g.close()
    if refused:
        assert hashlib.sha256(img.read_bytes()).hexdigest() == before
