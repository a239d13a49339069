"""The qcow2 driver against QEMU 7.2's tools: random request sequences
replayed with qemu-io must give images ``qemu-img compare`` calls identical
and ``qemu-img check`` calls clean; images written by qemu-img/qemu-io
(compressed, zero clusters, backing chains) read back identically; refused
opens use QEMU's texts and leave the file untouched."""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.graph import BlockGraph
from qmpd.block.node import BlockNode
from qmpd.errors import GenericError

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

MiB = 1 << 20


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def create(path: Path, size: str, *opts: str) -> None:
    r = sh("qemu-img", "create", "-f", "qcow2", *opts, str(path), size)
    assert r.returncode == 0, r.stderr


def check_clean(path: Path) -> None:
    r = sh("qemu-img", "check", str(path))
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


def qcow2(path: Path, name: str = "d", **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}, **extra}


async def random_ops(node: BlockNode, size: int, seed: int, n: int) -> list[str]:
    """Apply ``n`` random writes, zero writes and discards; :return: the
    same operations as qemu-io commands."""
    rng = random.Random(seed)
    cmds: list[str] = []
    for _ in range(n):
        op = rng.choice("wwwzzd")
        off = rng.randrange(0, size)
        ln = rng.randrange(1, 3 * MiB)
        if rng.random() < 0.5:
            off &= ~0xFFFF
            ln = (ln + 0xFFFF) & ~0xFFFF
        ln = min(ln, size - off)
        pat = rng.randrange(1, 255)
        if op == "w":
            await node.write(off, bytes([pat]) * ln)
            cmds.append(f"write -P {pat} {off} {ln}")
        elif op == "z":
            unmap = rng.random() < 0.5
            await node.write_zeroes(off, ln, may_unmap=unmap)
            cmds.append(f"write -z {'-u ' if unmap else ''}{off} {ln}")
        else:
            await node.discard(off, ln)
            cmds.append(f"discard {off} {ln}")
    return cmds


def qemu_io(path: Path, cmds: list[str], fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = sh(*args, str(path))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("opts,seed", [
    ((), 1),
    (("-o", "compat=0.10"), 2),
    (("-o", "cluster_size=4096,refcount_bits=1"), 3),
    pytest.param(("-o", "cluster_size=512,refcount_bits=64"), 4, marks=pytest.mark.slow),
    (("-o", "cluster_size=2M,lazy_refcounts=on"), 5),
])
async def test_random_ops_match_qemu_io(tmp_path: Path, opts: tuple[str, ...], seed: int) -> None:
    size = 24 * MiB
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create(ours, str(size), *opts)
    create(theirs, str(size), *opts)
    g = BlockGraph()
    node = await g.add(qcow2(ours, discard="unmap"))
    cmds = await random_ops(node, size, seed, 40 if "cluster_size=512" in str(opts) else 100)
    await g.close()
    check_clean(ours)
    qemu_io(theirs, cmds)
    r = sh("qemu-img", "compare", str(ours), str(theirs))
    assert r.returncode == 0, r.stdout + r.stderr


async def test_backing_chain_reads_and_top_layer(tmp_path: Path) -> None:
    base, top, ref = tmp_path / "base.raw", tmp_path / "top.qcow2", tmp_path / "ref.qcow2"
    sh("qemu-img", "create", "-f", "raw", str(base), "8M")
    qemu_io(base, ["write -P 0x11 0 8M"], fmt="raw")
    create(top, "8M", "-b", "base.raw", "-F", "raw")
    create(ref, "8M", "-b", "base.raw", "-F", "raw")
    ops = [("w", 0x22, 65536, 65536), ("w", 0x33, 1000, 3000), ("z", 0, MiB, 131072),
           ("w", 0x44, 5 * MiB, MiB)]
    qemu_io(ref, [f"write -P {p} {o} {n}" if k == "w" else f"write -z {o} {n}"
                  for k, p, o, n in ops])
    g = BlockGraph()
    node = await g.add(qcow2(top))
    assert node.children["backing"].drv == "raw"
    for k, pat, off, ln in ops:
        if k == "z":
            await node.write_zeroes(off, ln)
        else:
            await node.write(off, bytes([pat]) * ln)
    assert await node.read(0, 1000) + await node.read(4000, 61536) == b"\x11" * 62536
    assert await node.read(1000, 3000) == b"\x33" * 3000
    assert await node.read(1 << 20, 128 * 1024) == bytes(128 * 1024)
    drv: Any = node.driver
    assert await drv.is_allocated(0, 4096) == (True, 4096)        # COW'd cluster 0
    assert (await drv.is_allocated(128 * 1024, MiB))[0] is False   # falls through
    assert await node.block_status(128 * 1024, 4096) == (True, 4096)
    await g.close()
    check_clean(top)
    r = sh("qemu-img", "compare", str(top), str(ref))
    assert r.returncode == 0, r.stdout + r.stderr


async def test_backing_options(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, "4M")
    qemu_io(base, ["write -P 0x5a 0 64k"])
    create(top, "4M", "-b", str(base), "-F", "qcow2")
    g = BlockGraph()
    nobacking = await g.add(qcow2(top, "n1", backing=None, **{"read-only": True}))
    assert await nobacking.read(0, 16) == bytes(16)
    b = await g.add(qcow2(base, "b0", **{"read-only": True}))
    named = await g.add(qcow2(top, "n2", backing="b0", **{"read-only": True}))
    assert named.children["backing"] is b
    assert await named.read(0, 16) == b"\x5a" * 16
    inline = await g.add(qcow2(top, "n3", backing=qcow2(base, "b1"), **{"read-only": True}))
    assert await inline.read(0, 16) == b"\x5a" * 16
    await g.close()


async def test_reads_qemu_compressed_and_zero_clusters(tmp_path: Path) -> None:
    for ctype in ("zlib", "zstd"):
        img = tmp_path / f"{ctype}.qcow2"
        create(img, "4M", "-o", f"compression_type={ctype}")
        qemu_io(img, ["write -c -P 0x5a 0 64k", "write -c -P 0x11 128k 128k",
                      "write -P 0x77 1M 64k", "write -z 1M 32k", "write -z -u 2M 64k"])
        g = BlockGraph()
        node = await g.add(qcow2(img, **{"read-only": True}))
        assert await node.read(0, 65536) == b"\x5a" * 65536
        assert await node.read(131072, 131072) == b"\x11" * 131072
        assert await node.read(MiB, 65536) == bytes(32768) + b"\x77" * 32768
        assert await node.block_status(0, 65536) == (True, 65536)
        assert (await node.block_status(2 * MiB, 65536))[0] is False
        await g.close()


async def test_compressed_writes(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    create(img, "4M")
    g = BlockGraph()
    node = await g.add(qcow2(img))
    drv: Any = node.driver
    data = (b"abc" * 50000)[:131072]
    await drv.pwrite_compressed(0, data)
    assert await node.read(0, 131072) == data
    await node.write(1000, b"x" * 10)               # COW out of a compressed cluster
    await g.close()
    check_clean(img)
    r = sh("qemu-io", "-f", "qcow2", "-c", "read -v 0 16", str(img))
    assert "61 62 63 61" in r.stdout
    r = sh("qemu-img", "check", str(img))
    assert "2/64 = 3.12% allocated, 50.00% fragmented, 50.00% compressed clusters" in r.stdout


def patched(tmp_path: Path, name: str, patch: dict[int, bytes], trunc: int | None = None) -> Path:
    p = tmp_path / name
    create(p, "1G")
    data = bytearray(p.read_bytes())
    for off, b in patch.items():
        data[off:off + len(b)] = b
    if trunc is not None:
        del data[trunc:]
    p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("name,patch,trunc,text", [
    ("empty", {}, 0, "Image is not in qcow2 format"),
    ("short", {}, 50, "qcow2 header too short"),
    ("l1unaligned", {40: struct.pack(">Q", 0x30008)}, None, "Active L1 table offset invalid"),
    ("rtunaligned", {48: struct.pack(">Q", 0x10008)}, None, "Reference count table offset invalid"),
    ("l1small", {36: struct.pack(">I", 1)}, None, "L1 table is too small"),
    ("incompat", {72: struct.pack(">Q", 1 << 7)}, None,
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 80"),
    ("corrupt", {72: struct.pack(">Q", 2)}, None,
     "qcow2: Image is corrupt; cannot be opened read/write"),
    ("rtbig", {56: struct.pack(">I", 1000)}, None, "Reference count table too large"),
    ("raw", {0: b"\0\0\0\0"}, None, "Image is not in qcow2 format"),
])
async def test_refused_open(tmp_path: Path, name: str, patch: dict[int, bytes],
                            trunc: int | None, text: str) -> None:
    p = patched(tmp_path, name + ".qcow2", patch, trunc)
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    r = sh("qemu-io", "-f", "qcow2", "-c", "quit", str(p))      # QEMU 7.2, read-write
    assert r.stderr.strip() == f"qemu-io: can't open device {p}: {text}"
    g = BlockGraph()
    with pytest.raises(GenericError) as err:
        await g.add(qcow2(p))
    assert err.value.desc == text
    assert g.names() == []
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before


async def test_refcount_table_past_eof_is_corruption(tmp_path: Path) -> None:
    """QEMU opens it, then refuses the first allocation as corruption."""
    p = patched(tmp_path, "rteof.qcow2", {48: struct.pack(">Q", 0x1000000)})
    events: list[tuple[str, dict[str, Any]]] = []
    g = BlockGraph(emit_event=lambda n, d: events.append((n, d)))
    node = await g.add(qcow2(p))
    with pytest.raises(OSError):
        await node.write(0, b"x" * 65536)
    # As qemu-storage-daemon 7.2 reports it (recorded): no offset or size.
    assert events == [("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": "d",
        "msg": "Preventing invalid allocation of L2 table at offset 0", "fatal": True})]
    with pytest.raises(OSError):
        await node.read(0, 512)
    await g.close()
    r = sh("qemu-img", "info", str(p))
    assert "corrupt: true" in r.stdout


def bitmaps_of(path: Path) -> list[dict[str, Any]]:
    import json
    r = sh("qemu-img", "info", "-U", "--output=json", str(path))
    return list(json.loads(r.stdout)["format-specific"]["data"].get("bitmaps", []))


async def test_persistent_bitmaps_interoperate(tmp_path: Path) -> None:
    p = tmp_path / "bm.qcow2"
    create(p, "64M")
    assert sh("qemu-img", "bitmap", "--add", "-g", "128k", str(p), "qemu0").returncode == 0
    qemu_io(p, ["write 0 1M"])
    assert sh("qemu-img", "bitmap", "--add", str(p), "qemu1").returncode == 0
    assert sh("qemu-img", "bitmap", "--disable", str(p), "qemu1").returncode == 0
    g = BlockGraph()
    node = await g.add(qcow2(p))
    got = [(b.name, b.count, b.granularity, b.disabled, b.inconsistent) for b in node.bitmaps]
    assert got == [("qemu1", 0, 65536, True, False), ("qemu0", MiB, 131072, False, False)]
    # While open read-write, QEMU's tools see them in use.
    assert all(b["flags"][0] == "in-use" for b in bitmaps_of(p))
    node.bitmaps.add("ours", 65536, persistent=True)
    await node.write(2 * MiB, b"x" * (3 * MiB))
    await g.close()
    assert bitmaps_of(p) == [
        {"flags": ["auto"], "name": "qemu0", "granularity": 131072},
        {"flags": [], "name": "qemu1", "granularity": 65536},
        {"flags": ["auto"], "name": "ours", "granularity": 65536}]
    check_clean(p)
    assert sh("qemu-img", "bitmap", "--merge", "ours", str(p), "qemu1").returncode == 0
    g = BlockGraph()
    node = await g.add(qcow2(p))
    got = [(b.name, b.count, b.granularity, b.disabled, b.inconsistent) for b in node.bitmaps]
    assert got == [("ours", 3 * MiB, 65536, False, False), ("qemu1", 3 * MiB, 65536, True, False),
                   ("qemu0", 4 * MiB, 131072, False, False)]
    # The daemon dies without closing: the bitmaps come back inconsistent.
    g2 = BlockGraph()
    again = await g2.add(qcow2(p, "e", **{"read-only": True}))
    assert [(b.name, b.inconsistent) for b in again.bitmaps] == [
        ("ours", True), ("qemu1", True), ("qemu0", True)]
    await g2.close()
    r = sh("qemu-img", "check", str(p))
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout
    await g.close()
    check_clean(p)
    assert [b["flags"] for b in bitmaps_of(p)] == [["auto"], [], ["auto"]]
