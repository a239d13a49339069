"""qcow2 pure layer: header, L1/L2 entries, refcount blocks and the
allocator, replayed against plain-dict shadows (seeded)."""

from __future__ import annotations

import random
import struct

import pytest

from qmpd.block.drivers.qcow2.alloc import RefcountState
from qmpd.block.drivers.qcow2.compress import encode_descriptor
from qmpd.block.drivers.qcow2.header import (
    INCOMPAT_DIRTY, Header, HeaderError, encode_header, parse_header,
)
from qmpd.block.drivers.qcow2.l2cache import L2Cache
from qmpd.block.drivers.qcow2.layout import new_image
from qmpd.block.drivers.qcow2.refcount import RefcountBlock, RefcountOverflow
from qmpd.block.drivers.qcow2.tables import (
    ZERO_FLAG, Geometry, Kind, decode, standard_entry,
)


def _first_cluster(img_writes: list[tuple[int, bytes]], cs: int) -> bytes:
    buf = bytearray(cs)
    for off, data in img_writes:
        if off < cs:
            buf[off:off + len(data)] = data[:cs - off]
    return bytes(buf)


def test_header_worked_example() -> None:
    img = new_image(1 << 30)
    h = parse_header(_first_cluster(img.writes, 65536))
    assert (h.version, h.cluster_bits, h.size) == (3, 16, 1 << 30)
    assert (h.refcount_table_offset, h.refcount_table_clusters) == (65536, 1)
    assert (h.l1_table_offset, h.l1_size) == (196608, 2)
    assert (h.refcount_bits, h.header_length) == (16, 112)
    assert img.length == 196624
    assert h.feature_table[(0, 0)] == "dirty bit"


def test_header_round_trip_with_backing() -> None:
    h = Header(version=3, size=5 << 20, cluster_bits=12, l1_size=1, l1_table_offset=3 << 12,
               refcount_table_offset=4096, refcount_table_clusters=1,
               backing_file="base.raw", backing_format="raw", refcount_order=6)
    data = encode_header(h) + bytes(4096)
    back = parse_header(data[:4096])
    assert back.backing_file == "base.raw" and back.backing_format == "raw"
    assert back.refcount_bits == 64 and back.size == 5 << 20
    v2 = Header(version=2, size=1 << 20, l1_size=1)
    assert parse_header(encode_header(v2) + bytes(512)).header_length == 72


@pytest.mark.parametrize("patch,text", [
    ({0: b"QFI\x00"}, "Image is not in qcow2 format"),
    ({4: struct.pack(">I", 4)}, "Unsupported qcow2 version 4"),
    ({20: struct.pack(">I", 8)}, "Unsupported cluster size: 2^8"),
    ({20: struct.pack(">I", 22)}, "Unsupported cluster size: 2^22"),
    ({100: struct.pack(">I", 96)}, "qcow2 header too short"),
    ({96: struct.pack(">I", 7)}, "Reference count entry width too large; may not exceed 64 bits"),
    ({72: struct.pack(">Q", 1 << 5)}, "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
    ({72: struct.pack(">Q", 1 << 4)}, "Unsupported qcow2 feature(s): extended L2 entries"),
    # (an external data file bit is refused by the driver after the table
    # checks, with QEMU's "'data-file' is required for this image")
    ({72: struct.pack(">Q", (1 << 4) | (1 << 9))},
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 200"),
    ({72: struct.pack(">Q", (1 << 5) | (1 << 63))},
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000020"),
])
def test_header_refusals(patch: dict[int, bytes], text: str) -> None:
    buf = bytearray(_first_cluster(new_image(1 << 20).writes, 65536))
    for off, data in patch.items():
        buf[off:off + len(data)] = data
    with pytest.raises(HeaderError) as exc:
        parse_header(bytes(buf))
    assert exc.value.text == text


def test_dirty_bit_is_supported() -> None:
    buf = bytearray(_first_cluster(new_image(1 << 20).writes, 65536))
    buf[72:80] = struct.pack(">Q", INCOMPAT_DIRTY)
    assert parse_header(bytes(buf)).dirty


def test_l2_entries() -> None:
    g = Geometry(16)
    assert g.split(0x2001_0000) == (1, 1)
    e = standard_entry(0x50000, copied=True)
    assert e == 0x8000000000050000
    m = decode(e, g)
    assert (m.kind, m.host, m.copied) == (Kind.NORMAL, 0x50000, True)
    assert decode(ZERO_FLAG, g).kind == Kind.ZERO
    assert decode(0, g).kind == Kind.UNALLOCATED
    c = decode(encode_descriptor(0x70010, 700, g.cluster_bits), g)
    assert (c.kind, c.host) == (Kind.COMPRESSED, 0x70010)
    assert c.host + c.csize >= 0x70010 + 700 and (c.host + c.csize) % 512 == 0
    for cb in (9, 12, 16, 21):
        gg = Geometry(cb)
        rng = random.Random(cb)
        for _ in range(200):
            host = rng.randrange(0, 1 << 40)
            n = rng.randrange(1, 1 << cb)
            d = decode(encode_descriptor(host, n, cb), gg)
            assert d.host == host and d.csize >= n and d.csize - n < 512


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_block_shadow(bits: int) -> None:
    rng = random.Random(bits)
    cs = 512
    b = RefcountBlock.empty(cs, bits)
    shadow: dict[int, int] = {}
    for _ in range(3000):
        i = rng.randrange(b.entries)
        v = rng.randrange(0, 1 << bits) if bits < 64 else rng.choice([0, 1, (1 << 64) - 1, 7])
        b.set(i, v)
        shadow[i] = v
        j = rng.randrange(b.entries)
        assert b.get(j) == shadow.get(j, 0)
    assert all(b.get(i) == shadow.get(i, 0) for i in range(b.entries))
    with pytest.raises(RefcountOverflow):
        b.set(0, 1 << bits)
    copy = RefcountBlock(bytearray(b.data), bits)
    assert [copy.get(i) for i in range(copy.entries)] == [b.get(i) for i in range(b.entries)]
    free = next((i for i in range(b.entries) if not shadow.get(i)), b.entries)
    assert b.first_free(0) == free


def test_refcount_sub_byte_layout() -> None:
    b = RefcountBlock.empty(512, 4)
    b.set(0, 1)
    b.set(1, 15)
    b.set(2, 3)
    assert bytes(b.data[:2]).hex() == "f103"
    assert b.dirty_span() == (0, 512)


def _fresh(cluster_bits: int, bits: int) -> RefcountState:
    cs = 1 << cluster_bits
    rs = RefcountState(cluster_bits, bits, table=[2 * cs],
                       blocks={0: RefcountBlock.empty(cs, bits)}, table_offset=cs)
    for c in range(4):
        rs.update(c, 1)
    return rs


def test_allocator_worked_example() -> None:
    rs = _fresh(16, 16)
    rs.take_writes()
    assert rs.allocate(2) == (4, 2)
    assert (rs.get(4), rs.get(6)) == (1, 0)
    rs.free(4, 1)
    assert rs.allocate(1) == (4, 1)
    w = rs.take_writes()
    assert [(off, len(d)) for off, d in w.blocks] == [(131072, 512)]


@pytest.mark.parametrize("cluster_bits,bits", [(9, 1), (9, 64), (9, 16), (12, 4), (16, 16)])
def test_allocator_shadow(cluster_bits: int, bits: int) -> None:
    """Random allocations and frees against a set of owned clusters: no
    cluster is handed out twice or over metadata, and the refcounts are
    exactly 1 for owned clusters, the header/L1 stand-ins (0, 3), the current
    refcount table and blocks, and 0 elsewhere (a moved table's old
    clusters are freed)."""
    rng = random.Random(cluster_bits * 100 + bits)
    rs = _fresh(cluster_bits, bits)
    cs = 1 << cluster_bits
    owned: set[int] = set()

    def meta() -> set[int]:
        m = {0, 3} | {rs.table_offset // cs + k for k in range(rs.table_clusters)}
        return m | {e >> cluster_bits for e in rs.table if e}

    for step in range(1500):
        if owned and rng.random() < 0.4:
            c = rng.choice(sorted(owned))
            owned.discard(c)
            rs.free(c, 1)
        else:
            start, count = rs.allocate(rng.randrange(1, 40))
            assert count >= 1
            taken = set(range(start, start + count))
            assert not taken & owned and not taken & meta(), step
            owned |= taken
        while rs.pending():
            rs.take_writes()
    used = owned | meta()
    assert not owned & meta()
    for c in range(max(used) + 2):
        assert rs.get(c) == (1 if c in used else 0), c
    # Reuse: the lowest free cluster is handed out next.
    lowest = min(set(range(max(used) + 2)) - used)
    assert rs.allocate(1)[0] == lowest


def test_l2_cache_lru() -> None:
    c = L2Cache(cluster_size=512, max_bytes=1024)
    c.put(0x1000, bytearray(512))
    c.put(0x1200, bytearray(512))
    assert c.get_entry(0x1000, 3) == 0
    c.set_entry(0x1000, 3, 0x8000000000050000)
    c.put(0x1400, bytearray(512))
    assert 0x1200 not in c and 0x1000 in c
    assert c.dirty_span(0x1000) == (0, 512)
    assert c.take_dirty()[0][0] == 0x1000
    assert c.memory == 1024
