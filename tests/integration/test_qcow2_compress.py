"""Compressed qcow2 clusters (compress.py) against QEMU 7.2: images
``qemu-img convert -c`` wrote (deflate and zstd, several cluster sizes)
decode cluster by cluster to the source bytes, our compressor makes the
very streams QEMU made, and images holding clusters we compressed and
packed pass ``qemu-img check`` and ``qemu-img compare`` equal to the source."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard

from qmpd.block.drivers.qcow2 import compress as cz
from tests.support.qcow2file import OFFSET_MASK, Qcow2File

MiB = 1 << 20
COPIED = 1 << 63


def _ok(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _source(path: Path, size: int, cs: int, seed: int) -> bytes:
    """Clusters of text (compressible), random bytes (not), zeroes and a
    repeated byte, in a seeded order; the last cluster may be partial."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randrange(2, 9)).hex() for _ in range(300)]
    out = bytearray()
    i = 0
    while len(out) < size:
        kind = [0, 1, 2, 3, 0][i % 5] if i < 5 else rnd.randrange(4)
        if kind == 0:
            chunk = " ".join(rnd.choice(words) for _ in range(cs // 4)).encode()[:cs]
        elif kind == 1:
            chunk = rnd.randbytes(cs)
        elif kind == 2:
            chunk = bytes(cs)
        else:
            chunk = bytes([rnd.randrange(1, 256)]) * cs
        out += chunk
        i += 1
    data = bytes(out[:size])
    path.write_bytes(data)
    return data


CASES = [("zlib", 16), ("zstd", 16), ("zlib", 12), ("zstd", 9), ("zlib", 21)]


@pytest.mark.parametrize("ctype,cbits", CASES)
def test_decode_qemu_compressed_images(tmp_path: Path, ctype: str, cbits: int) -> None:
    cs = 1 << cbits
    size = max(48 * cs, 4 * MiB) if cbits < 21 else 8 * cs + 4096
    src = tmp_path / "src.raw"
    data = _source(src, size, cs, cbits)
    img = tmp_path / "c.qcow2"
    _ok("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
        "-o", f"compression_type={ctype},cluster_size={cs}", str(src), str(img))
    f = Qcow2File(str(img))
    ct = cz.ZSTD if ctype == "zstd" else cz.ZLIB
    assert f.compression_type == ct
    flen = os.path.getsize(img)
    kinds = {"compressed": 0, "normal": 0, "unallocated": 0}
    try:
        for gc in range(-(-size // cs)):
            want = data[gc * cs:(gc + 1) * cs]
            want += bytes(cs - len(want))
            entry = f.l2_entry(gc)
            mine = cz.compress_cluster(want, ct)
            if cz.is_compressed(entry):
                kinds["compressed"] += 1
                d = cz.decode_descriptor(entry, cbits)
                raw = f.pread(d.offset, min(d.nbytes, flen - d.offset))
                assert cz.decompress_cluster(raw, cs, ct) == want, gc
                assert mine is not None
                if ct == cz.ZLIB:
                    # Our deflate makes QEMU's very stream (same zlib).
                    assert raw[:len(mine)] == mine, gc
                    assert cz.encode_descriptor(d.offset, len(mine), cbits) == entry
                else:
                    # zstandard bundles another libzstd than Debian's QEMU:
                    # the same frame header (magic, no checksum, content
                    # size), block contents may differ.
                    n = zstandard.frame_header_size(raw)
                    assert raw[:n] == mine[:n], gc
                    assert cz.decompress_cluster(mine, cs, ct) == want
            elif entry & OFFSET_MASK:
                kinds["normal"] += 1
                assert f.pread(entry & OFFSET_MASK, cs)[:len(want)] == want
                assert mine is None, gc   # QEMU stored it uncompressed: too big
            else:
                kinds["unallocated"] += 1
                assert want == bytes(cs)
    finally:
        f.close()
    assert all(kinds.values()), kinds


def _write_compressed_image(img: Path, data: bytes, cbits: int, ct: int) -> dict[str, int]:
    """Put ``data`` into the empty image ``img``: zero clusters left
    unallocated, the rest compressed by us and packed, or stored plain
    when they do not compress."""
    cs = 1 << cbits
    f = Qcow2File(str(img))
    counts = {"compressed": 0, "normal": 0}
    try:
        clusters = [data[i:i + cs] for i in range(0, len(data), cs)]
        streams: list[tuple[int, bytes]] = []
        plain: list[tuple[int, bytes]] = []
        for gc, chunk in enumerate(clusters):
            chunk += bytes(cs - len(chunk))
            if chunk.count(0) == cs:
                continue
            s = cz.compress_cluster(chunk, ct)
            if s is None:
                plain.append((gc, chunk))
            else:
                streams.append((gc, s))
        # Data first, then L2 entries.
        total = sum(len(s) for _, s in streams)
        start = f.alloc(total)
        descs, refs = cz.pack([s for _, s in streams], start, cbits)
        for i, n in enumerate(refs):
            f.set_refcount((start >> cbits) + i, n)
        pos = start
        for _, s in streams:
            os.pwrite(f.fd, s, pos)
            pos += len(s)
        for (gc, _), entry in zip(streams, descs):
            assert cz.decode_descriptor(entry, cbits).offset >= start
            f.set_l2_entry(gc, entry)
            counts["compressed"] += 1
        for gc, chunk in plain:
            host = f.alloc(cs)
            os.pwrite(f.fd, chunk, host)
            f.set_l2_entry(gc, host | COPIED)
            counts["normal"] += 1
    finally:
        f.close()
    return counts


@pytest.mark.parametrize("ctype,cbits", CASES)
def test_qemu_reads_clusters_we_compress(tmp_path: Path, ctype: str, cbits: int) -> None:
    cs = 1 << cbits
    # 512 B clusters: stay inside what refcount block 0 covers (256 clusters).
    size = 48 * cs if cbits < 12 else 4 * MiB if cbits < 21 else 8 * cs
    src = tmp_path / "src.raw"
    data = _source(src, size, cs, cbits + 100)
    img = tmp_path / "ours.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"compression_type={ctype},cluster_size={cs}", str(img), str(size))
    counts = _write_compressed_image(img, data, cbits, cz.ZSTD if ctype == "zstd" else cz.ZLIB)
    assert counts["compressed"] > 0 and counts["normal"] > 0
    chk = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert chk.returncode == 0 and "No errors were found on the image." in chk.stdout, chk.stdout
    m = re.search(r"([0-9.]+)% compressed clusters", chk.stdout)
    assert m is not None and float(m.group(1)) > 0
    assert _ok("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(img)) == \
        "Images are identical.\n"


def test_descriptor_fields() -> None:
    # x = 62 - (cluster_bits - 8): 512 B clusters give 1 sector bit, 2 MiB 13.
    assert [cz.offset_bits(b) for b in (9, 16, 21)] == [61, 54, 49]
    e = cz.encode_descriptor(0x70010, 700, 16)
    assert e == cz.COMPRESSED | 1 << 54 | 0x70010
    assert cz.decode_descriptor(e, 16) == cz.Descriptor(0x70010, 1, 2 * 512 - 0x10)
    assert list(cz.host_clusters(cz.decode_descriptor(e, 16), 16)) == [7]
    # A stream crossing a cluster boundary references both host clusters.
    e = cz.encode_descriptor(0x7FF00, 1000, 16)
    assert list(cz.host_clusters(cz.decode_descriptor(e, 16), 16)) == [7, 8]
    # Bit 63 does not disturb decoding; the largest offset fits.
    top = (1 << 49) - 512
    assert cz.decode_descriptor(cz.encode_descriptor(top, 1, 21) | 1 << 63, 21).offset == top
    with pytest.raises(ValueError):
        cz.encode_descriptor(1 << 54, 100, 16)
    with pytest.raises(ValueError):
        cz.encode_descriptor(0, 512 * 2 + 1, 9)   # 512 B clusters: at most 1 extra sector
    descs, refs = cz.pack([b"a" * 700, b"b" * 65000, b"c" * 100], 0x70000, 16)
    assert [cz.decode_descriptor(d, 16).offset for d in descs] == [0x70000, 0x70000 + 700,
                                                                   0x70000 + 65700]
    assert refs == [2, 2]


def test_bad_streams_refused() -> None:
    cs = 65536
    data = b"".join(struct.pack(">I", i) for i in range(cs // 4))
    z = cz.compress_cluster(data, cz.ZLIB)
    s = cz.compress_cluster(data, cz.ZSTD)
    assert z is not None and s is not None
    assert cz.decompress_cluster(z + b"trailing", cs, cz.ZLIB) == data
    assert cz.decompress_cluster(s + b"trailing", cs, cz.ZSTD) == data
    # Two zstd frames making one cluster, as QEMU accepts.
    half = cs // 2
    two = cz.compress_cluster(data[:half], cz.ZSTD, cs)
    two2 = cz.compress_cluster(data[half:], cz.ZSTD, cs)
    assert two is not None and two2 is not None
    assert cz.decompress_cluster(two + two2 + b"\0" * 9, cs, cz.ZSTD) == data
    for raw, ct in ((z[:len(z) // 2], cz.ZLIB), (b"\xff" * 100, cz.ZLIB),
                    (s[:len(s) // 2], cz.ZSTD), (b"\xff" * 100, cz.ZSTD), (b"", cz.ZSTD),
                    (two, cz.ZSTD)):
        with pytest.raises(cz.CompressedDataError):
            cz.decompress_cluster(raw, cs, ct)
    # A frame that decompresses past the cluster is refused, not returned.
    big = cz.compress_cluster(data + data, cz.ZSTD)
    assert big is not None
    with pytest.raises(cz.CompressedDataError):
        cz.decompress_cluster(big, cs, cz.ZSTD)
    assert cz.decompress_cluster(cz.compress_cluster(data + data, cz.ZLIB) or b"", cs,
                                 cz.ZLIB) == data
    # Incompressible data: QEMU would store it plain.
    rnd = random.Random(1).randbytes(cs)
    assert cz.compress_cluster(rnd, cz.ZLIB) is None and cz.compress_cluster(rnd, cz.ZSTD) is None
