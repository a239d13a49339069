"""qcow2 bitmaps extension (bitmaps_ext.py, bitmaps_io.py) against QEMU 7.2: images whose
bitmaps qemu-img/qemu-io wrote parse to the exact bits; bitmaps we store
are listed by ``qemu-img info``, pass ``qemu-img check`` and are loaded by
QEMU bit for bit; limits and refusals in QEMU's words (recorded live)."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from qmpd.block.drivers.qcow2 import bitmaps_ext as bx
from qmpd.block.drivers.qcow2 import bitmaps_io as bio
from tests.support.qsd import Qsd as _Qsd
from tests.support.qcow2file import Qcow2File

GiB = 1 << 30
MiB = 1 << 20


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _ok(*argv: str) -> str:
    r = _run(*argv)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _expected(size: int, gbits: int, writes: list[tuple[int, int]]) -> bytes:
    """The little-endian bitmap of ``writes`` (offset, length)."""
    nbits = -(-size >> gbits)
    out = bytearray(-(-nbits // 8))
    for off, length in writes:
        for bit in range(off >> gbits, (off + length - 1 >> gbits) + 1):
            out[bit // 8] |= 1 << (bit % 8)
    return bytes(out)


def _load(path: Path) -> tuple[list[bx.DirEntry], dict[str, bytes | None]]:
    async def go() -> tuple[list[bx.DirEntry], dict[str, bytes | None]]:
        f = Qcow2File(str(path))
        try:
            ext = f.bitmaps_ext()
            assert ext is not None
            entries = await bio.load_bitmaps(f, ext, f.size)
            return entries, {e.name: await bio.load_bitmap(f, e, f.size) for e in entries}
        finally:
            f.close()
    return asyncio.run(go())


def _info_bitmaps(path: Path) -> list[dict[str, object]]:
    info = json.loads(_ok("qemu-img", "info", "--output=json", "-U", str(path)))
    return list(info["format-specific"]["data"].get("bitmaps", []))


def test_reads_bitmaps_qemu_wrote(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G")
    _ok("qemu-img", "bitmap", "--add", "-g", "512", str(img), "b1")
    _ok("qemu-img", "bitmap", "--add", str(img), "b0")
    w1 = [(0, 1024), (700 * MiB, 65536), (300 * MiB + 512, 4096)]
    _ok("qemu-io", "-f", "qcow2", *sum((["-c", f"write {o} {n}"] for o, n in w1), []), str(img))
    _ok("qemu-img", "bitmap", "--disable", str(img), "b1")
    w2 = [(900 * MiB, 65536), (GiB - 512, 512)]
    _ok("qemu-io", "-f", "qcow2", *sum((["-c", f"write {o} {n}"] for o, n in w2), []), str(img))
    _ok("qemu-img", "bitmap", "--add", "--merge", "b0", "-g", "1M", str(img), "b2")

    entries, data = _load(img)
    got = [(e.name, e.granularity_bits, e.info_flags(), e.type, e.extra_data) for e in entries]
    assert got == [("b1", 9, [], 1, b""), ("b0", 16, ["auto"], 1, b""), ("b2", 20, ["auto"], 1, b"")]
    assert [(e.name, e.info_flags(), e.granularity) for e in entries] == [
        (b["name"], b["flags"], b["granularity"]) for b in _info_bitmaps(img)]
    # b1: 2 Mi bits = 256 KiB = 4 data clusters of 256 MiB each; nothing
    # written past 768 MiB while it was enabled: entry 3 is 0
    assert entries[0].table_size == 4
    assert data["b1"] == _expected(GiB, 9, w1)
    assert data["b0"] == _expected(GiB, 16, w1 + w2)
    assert data["b2"] == _expected(GiB, 20, w1 + w2)
    f = Qcow2File(str(img))
    try:
        table = bx.parse_table(f.pread(entries[0].table_offset, 32), f.cluster_size)
    finally:
        f.close()
    assert [t == 0 for t in table] == [False, False, False, True]

    # Killed while open: QEMU left the bitmaps in_use; their data is not loaded.
    r = _run("qemu-io", "-f", "qcow2", "-c", "write 10M 4k", "-c", "sigraise 9", str(img))
    assert r.returncode == -9
    entries, data = _load(img)
    assert [(e.name, e.info_flags()) for e in entries] == [
        ("b1", ["in-use"]), ("b0", ["in-use", "auto"]), ("b2", ["in-use", "auto"])]
    assert data == {"b1": None, "b0": None, "b2": None}
    assert [b["flags"] for b in _info_bitmaps(img)] == [e.info_flags() for e in entries]


def _store(path: Path, bitmaps: list[tuple[str, int, int, bytes]]) -> list[bx.DirEntry]:
    async def go() -> list[bx.DirEntry]:
        f = Qcow2File(str(path))
        try:
            entries = [await bio.store_bitmap(f, name, data, f.size, gbits, flags)
                       for name, gbits, flags, data in bitmaps]
            f.set_bitmaps_ext(await bio.store_directory(f, entries))
            return entries
        finally:
            f.close()
    return asyncio.run(go())


def test_qemu_loads_bitmaps_we_store(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G")
    rnd = random.Random(10)
    n9 = bx.bitmap_bytes(GiB, 9)
    sparse = bytearray(n9)          # data clusters 0 and 2 only
    for _ in range(300):
        i = rnd.randrange(0, n9 // 4) + rnd.choice([0, n9 // 2])
        sparse[i] = rnd.randrange(1, 256)
    dense = rnd.randbytes(bx.bitmap_bytes(GiB, 16))
    empty = bytes(bx.bitmap_bytes(GiB, 31))
    name_max = "n" * 1023
    stored = _store(img, [("sparse", 9, 0, bytes(sparse)), ("dense", 16, bx.FLAG_AUTO, dense),
                          (name_max, 31, bx.FLAG_AUTO, empty)])
    assert [e.table_size for e in stored] == [4, 1, 1]

    chk = _run("qemu-img", "check", str(img))
    assert chk.returncode == 0 and "No errors were found on the image." in chk.stdout, chk.stdout
    assert [(b["name"], b["flags"], b["granularity"]) for b in _info_bitmaps(img)] == [
        ("sparse", [], 512), ("dense", ["auto"], 65536), (name_max, ["auto"], 1 << 31)]
    entries, data = _load(img)
    assert entries == stored
    assert data == {"sparse": bytes(sparse), "dense": dense, name_max: empty}

    # QEMU loads our bits, tracks a write in the enabled ones and stores
    # them again: what it stored is ours plus that write.
    _ok("qemu-io", "-f", "qcow2", "-c", f"write {512 * MiB} 4k", str(img))
    entries, data = _load(img)
    assert [(e.name, e.flags) for e in entries] == [
        ("sparse", 0), ("dense", bx.FLAG_AUTO), (name_max, bx.FLAG_AUTO)]
    assert data["sparse"] == bytes(sparse)
    bit = (512 * MiB) >> 16
    want = bytearray(dense)
    want[bit // 8] |= 1 << bit % 8
    assert data["dense"] == bytes(want)
    assert data[name_max] == b"\x01"
    chk = _run("qemu-img", "check", str(img))
    assert chk.returncode == 0 and "No errors were found on the image." in chk.stdout, chk.stdout


def test_all_ones_table_entry(tmp_path: Path) -> None:
    """A table entry 1 reads as all ones (QEMU never writes one; the spec
    allows it), and QEMU loads it so."""
    img = tmp_path / "c.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", str(img), "256M")

    async def go() -> None:
        f = Qcow2File(str(img))
        try:
            toff = await f.allocate(8)
            await f.write(toff, bx.encode_table([bx.TABLE_ALL_ONES]))
            e = bx.DirEntry("ones", toff, 1, 0, 16)
            f.set_bitmaps_ext(await bio.store_directory(f, [e]))
            assert await bio.load_bitmap(f, e, f.size) == b"\xff" * 512
            assert await bio.bitmap_clusters(f, e) == [(toff, 8)]
        finally:
            f.close()
    asyncio.run(go())
    chk = _run("qemu-img", "check", str(img))
    assert chk.returncode == 0, chk.stdout
    # QEMU loads it as all ones and stores it back as a data cluster.
    _ok("qemu-img", "bitmap", "--enable", str(img), "ones")
    entries, data = _load(img)
    assert entries[0].table_size == 1 and entries[0].flags == bx.FLAG_AUTO
    assert data == {"ones": b"\xff" * 512}


def _patch_first_entry(path: Path, at: int, fmt: str, value: int) -> None:
    f = Qcow2File(str(path))
    try:
        ext = f.bitmaps_ext()
        assert ext is not None
        raw = bytearray(f.pread(ext.directory_offset, ext.directory_size))
        struct.pack_into(fmt, raw, at, value)
        asyncio.run(f.write(ext.directory_offset, bytes(raw)))
    finally:
        f.close()


@pytest.mark.parametrize("at,fmt,value", [
    (17, ">B", 8),          # granularity_bits below 9
    (17, ">B", 32),         # above 31
    (16, ">B", 2),          # type
    (12, ">I", 4),          # a flag QEMU 7.2 does not know
    (8, ">I", 0),           # table size 0
    (0, ">Q", 0x10200),     # unaligned table offset
])
def test_broken_entries_refused_with_qemus_text(tmp_path: Path, at: int, fmt: str, value: int) -> None:
    img = tmp_path / "d.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    _ok("qemu-img", "bitmap", "--add", str(img), "bm")
    _patch_first_entry(img, at, fmt, value)
    r = _run("qemu-img", "info", str(img))
    with pytest.raises(bx.BitmapError) as exc:
        _load(img)
    assert exc.value.text == "Bitmap 'bm' doesn't satisfy the constraints"
    assert r.returncode == 1 and exc.value.text in r.stderr


def test_directory_count_mismatch_and_extra_data(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    _ok("qemu-img", "bitmap", "--add", str(img), "a")
    _ok("qemu-img", "bitmap", "--add", str(img), "b")
    f = Qcow2File(str(img))
    try:
        ext = f.bitmaps_ext()
        assert ext is not None
        f.set_bitmaps_ext(bx.BitmapsExt(1, ext.directory_size, ext.directory_offset))
        raw = f.pread(ext.directory_offset, ext.directory_size)
    finally:
        f.close()
    r = _run("qemu-img", "info", str(img))
    assert r.returncode == 1 and "More bitmaps found than specified in header extension" in r.stderr
    with pytest.raises(bx.BitmapError, match="^More bitmaps found than specified in header extension$"):
        bx.parse_directory(raw, 1, 65536, 64 * MiB)
    with pytest.raises(bx.BitmapError, match="^Less bitmaps found than specified in header extension$"):
        bx.parse_directory(raw, 3, 65536, 64 * MiB)
    with pytest.raises(bx.BitmapError, match="^Broken bitmap directory$"):
        bx.parse_directory(raw[:-8], 2, 65536, 64 * MiB)
    extra = bx.DirEntry("x", 65536, 1, bx.FLAG_EXTRA_DATA_COMPATIBLE, 16, extra_data=b"abc")
    d = bx.encode_directory([extra])
    assert len(d) == bx.dir_entry_size(1, 3) == 32
    with pytest.raises(bx.BitmapError, match="^Bitmap extra data is not supported$"):
        bx.parse_directory(d, 1, 65536, 64 * MiB)
    assert bx.parse_directory(d, 1, 65536, 64 * MiB, strict=False) == [extra]


def test_ext_checks() -> None:
    good = bx.encode_ext(bx.BitmapsExt(2, 64, 0x30000))
    assert bx.parse_ext(good, 65536) == bx.BitmapsExt(2, 64, 0x30000)
    cases = [
        (good[:20], "bitmaps_ext: Invalid extension length"),
        (struct.pack(">IIQQ", 1, 1, 8, 65536), "bitmaps_ext: Reserved field is not zero"),
        (struct.pack(">IIQQ", 65536, 0, 8, 65536),
         "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"),
        (struct.pack(">IIQQ", 0, 0, 8, 65536), "found bitmaps extension with zero bitmaps"),
        (struct.pack(">IIQQ", 1, 0, 8, 65536 + 512), "bitmaps_ext: invalid bitmap directory offset"),
        (struct.pack(">IIQQ", 1, 0, 1024 * 65535 + 1, 65536),
         "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size "
         "(67107840)"),
    ]
    for data, text in cases:
        with pytest.raises(bx.BitmapError) as exc:
            bx.parse_ext(data, 65536)
        assert exc.value.text == text


def test_can_store_new_matches_qemu(tmp_path: Path) -> None:
    """block-dirty-bitmap-add persistent=true on qcow2: QEMU 7.2's texts,
    recorded live, equal can_store_new's."""
    for name, size, opts in (("v3", "64M", []), ("v2", "64M", ["-o", "compat=0.10"]),
                             ("big", "8T", [])):
        _ok("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(tmp_path / f"{name}.qcow2"), size)
    qsd = _Qsd(*(f"driver=qcow2,node-name={n},file.driver=file,file.filename={tmp_path}/{n}.qcow2"
                 for n in ("v3", "v2", "big")))
    sizes = {"v3": 64 * MiB, "v2": 64 * MiB, "big": 8 << 40}
    names: dict[str, list[str]] = {"v3": [], "v2": [], "big": []}
    cases = [("v2", "a", 65536), ("v3", "a", 65536), ("v3", "x" * 1023, 65536),
             ("v3", "y" * 1024, 65536), ("v3", "g31", 1 << 31), ("big", "small", 512),
             ("big", "ok", 65536)]
    try:
        for node, name, gran in cases:
            r = qsd.cmd("block-dirty-bitmap-add", node=node, name=name, granularity=gran,
                        persistent=True)
            try:
                bx.can_store_new(name, gran, node=node, version=2 if node == "v2" else 3,
                                 disk_size=sizes[node], cluster_size=65536,
                                 persistent_names=names[node])
            except bx.BitmapError as e:
                assert r == {"error": {"class": "GenericError", "desc": e.text}}
            else:
                assert r == {"return": {}}, r
                names[node].append(name)
    finally:
        qsd.quit()
    assert names == {"v3": ["a", "x" * 1023, "g31"], "v2": [], "big": ["ok"]}
    # QEMU stored them at quit; they come back with the flags it writes.
    assert [(b["name"], b["flags"], b["granularity"]) for b in _info_bitmaps(tmp_path / "v3.qcow2")] == [
        ("g31", ["auto"], 1 << 31), ("x" * 1023, ["auto"], 65536), ("a", ["auto"], 65536)]


def test_limits_without_qemu() -> None:
    """The count and directory limits (65535 bitmaps, 64 MiB - 1 KiB of
    directory) are too slow to reach through QEMU; QEMU's texts."""
    kw: dict[str, object] = dict(node="n", version=3, disk_size=GiB, cluster_size=65536)
    with pytest.raises(bx.BitmapError) as exc:
        bx.can_store_new("z", 65536, persistent_names=[str(i) for i in range(65535)], **kw)
    assert exc.value.text == ("Can't make bitmap 'z' persistent in 'n': Maximum number of "
                              "persistent bitmaps is already reached")
    long_names = ["%05d" % i + "n" * 1018 for i in range(64040)]
    with pytest.raises(bx.BitmapError) as exc:
        bx.can_store_new("z" * 1023, 65536, persistent_names=long_names, **kw)
    assert exc.value.text == ("Can't make bitmap '" + "z" * 1023 + "' persistent in 'n': Not enough "
                              "space in the bitmap directory")
    bx.can_store_new("z" * 1023, 65536, persistent_names=long_names[:64000], **kw)
    with pytest.raises(bx.BitmapError, match="^Granularity is under minimum \\(512 bytes\\)$"):
        bx.check_constraints("a", 256, GiB, 65536)
    with pytest.raises(bx.BitmapError, match="^Granularity exceeds maximum \\(2147483648 bytes\\)$"):
        bx.check_constraints("a", 1 << 32, GiB, 65536)
    with pytest.raises(bx.BitmapError, match="^Bitmap directory is too large$"):
        bx.encode_directory([bx.DirEntry("n" * 1023, 65536, 1, 0, 16)] * 64040)
    assert bx.table_entries(GiB, 9, 65536) == 4
    assert bx.table_entries(GiB + 1, 9, 512) == 512 + 1
    assert bx.cluster_coverage(65536, 16) == 32 * GiB


def _free(f: Qcow2File, spans: list[tuple[int, int]]) -> None:
    for off, n in spans:
        for c in range(off // f.cluster_size, -(-(off + n) // f.cluster_size)):
            f.set_refcount(c, f.refcount(c) - 1)


def test_open_store_remove_cycle_as_qemu(tmp_path: Path) -> None:
    """The driver's cycle over a QEMU image: set in_use at open (in place),
    store at close (replacing in_use entries, appending new ones, keeping
    an inconsistent one), remove; QEMU agrees at every step."""
    img = tmp_path / "f.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", str(img), "128M")
    _ok("qemu-img", "bitmap", "--add", str(img), "keep")
    _ok("qemu-img", "bitmap", "--add", "-g", "4k", str(img), "dead")
    _ok("qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(img))
    _ok("qemu-img", "bitmap", "--add", "--disable", str(img), "clean")
    # "dead" only: in_use as after a crash
    entries, _ = _load(img)

    async def crash_dead() -> None:
        f = Qcow2File(str(img))
        try:
            ext = f.bitmaps_ext()
            assert ext is not None
            marked = [replace(e, flags=e.flags | bx.FLAG_IN_USE) if e.name == "dead" else e
                      for e in entries]
            await bio.rewrite_directory(f, ext, marked)
        finally:
            f.close()
    asyncio.run(crash_dead())
    assert [b["flags"] for b in _info_bitmaps(img)] == [["auto"], ["in-use", "auto"], []]

    async def cycle() -> tuple[bytes | None, bio.StoreResult]:
        f = Qcow2File(str(img))
        try:
            ext = f.bitmaps_ext()
            assert ext is not None
            on_disk = await bio.load_bitmaps(f, ext, f.size)
            loaded = {e.name: await bio.load_bitmap(f, e, f.size) for e in on_disk}
            # open: in_use on all (autoclear bit off while rewriting)
            f.set_bitmaps_ext(None)
            await bio.rewrite_directory(f, ext, bx.with_flags(on_disk, bx.FLAG_IN_USE))
            f.set_bitmaps_ext(ext)
            assert [b["flags"] for b in _info_bitmaps(img)] == [
                ["in-use", "auto"], ["in-use", "auto"], ["in-use"]]
            # QEMU refuses to replace a bitmap that is not in use:
            with pytest.raises(bx.BitmapError, match="^Bitmap 'clean' already exists in the image$"):
                await bio.store_all(f, ext, on_disk, [bio.MemBitmap("clean", 65536, False, b"")],
                                   f.size)
            with pytest.raises(bx.BitmapError) as exc:
                await bio.store_all(f, ext, on_disk, [bio.MemBitmap("g", 256, True, b"")], f.size)
            assert exc.value.text == ("Bitmap 'g' doesn't satisfy the constraints: Granularity "
                                      "is under minimum (512 bytes)")
            # close: "dead" stays inconsistent (not stored), the others are
            # stored, a new one is appended.
            keep = loaded["keep"]
            assert keep is not None
            new = bytearray(bx.bitmap_bytes(f.size, 20))
            new[-1] = 0x80
            mem = [bio.MemBitmap("keep", 65536, True, keep),
                   bio.MemBitmap("clean", 65536, False, bytes(bx.bitmap_bytes(f.size, 16))),
                   bio.MemBitmap("new", 1 << 20, False, bytes(new))]
            on_disk = bx.with_flags(on_disk, bx.FLAG_IN_USE)
            res = await bio.store_all(f, ext, on_disk, mem, f.size)
            f.set_bitmaps_ext(res.ext)
            _free(f, res.free)
            return keep, res
        finally:
            f.close()
    keep, res = asyncio.run(cycle())
    chk = _run("qemu-img", "check", str(img))
    assert chk.returncode == 0 and "No errors were found on the image." in chk.stdout, chk.stdout
    assert [(b["name"], b["flags"], b["granularity"]) for b in _info_bitmaps(img)] == [
        ("keep", ["auto"], 65536), ("dead", ["in-use", "auto"], 4096), ("clean", [], 65536),
        ("new", [], 1 << 20)]
    entries, data = _load(img)
    assert data["keep"] == keep == _expected(128 * MiB, 16, [(0, 65536)])
    assert data["dead"] is None and data["clean"] == bytes(256)
    assert data["new"] == _expected(128 * MiB, 20, [(128 * MiB - 1, 1)])
    # QEMU opens it and can only remove the inconsistent one.
    _ok("qemu-img", "bitmap", "--remove", str(img), "dead")

    async def remove_all() -> None:
        f = Qcow2File(str(img))
        try:
            for name in ("nothere", "clean", "keep", "new"):
                ext = f.bitmaps_ext()
                assert ext is not None
                on_disk = await bio.load_bitmaps(f, ext, f.size)
                res = await bio.remove(f, ext, on_disk, name)
                if name == "nothere":
                    assert res is None
                    continue
                assert res is not None
                f.set_bitmaps_ext(res.ext)
                _free(f, res.free)
                chk = _run("qemu-img", "check", str(img))
                assert chk.returncode == 0 and "No errors" in chk.stdout, chk.stdout
                assert [b["name"] for b in _info_bitmaps(img)] == [e.name for e in res.entries]
        finally:
            f.close()
    asyncio.run(remove_all())
    assert _info_bitmaps(img) == []
    f = Qcow2File(str(img))
    try:
        assert f.bitmaps_ext() is None and f.autoclear & 1 == 0
    finally:
        f.close()
