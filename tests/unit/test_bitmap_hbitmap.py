"""HBitmap against a naive shadow (one bytearray entry per bit).

Random operations are replayed on both, seeded, across granularities from
1 byte to 2 MiB and sizes that are not multiples of the granularity; after
every operation the bits, the count and a few searches must agree.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import pytest

from qmpd.bitmap import hbitmap as hbitmap_mod
from qmpd.bitmap.hbitmap import HBitmap

KiB = 1024
MiB = 1024 * KiB


class Shadow:
    """The obvious implementation: a list of bits and loops over them."""

    def __init__(self, size: int, gran: int) -> None:
        self.size, self.gran = size, gran
        self.bits = bytearray(-(-size // gran))

    def span(self, i: int) -> tuple[int, int]:
        return i * self.gran, min((i + 1) * self.gran, self.size)

    def set(self, off: int, length: int) -> None:
        if length == 0:
            return
        for i in range(off // self.gran, min(len(self.bits), (off + length) // self.gran + 1)):
            lo, hi = self.span(i)
            if lo < off + length and off < hi:
                self.bits[i] = 1

    def reset(self, off: int, length: int) -> None:
        for i in range(off // self.gran, min(len(self.bits), (off + length) // self.gran + 1)):
            lo, hi = self.span(i)
            if off <= lo and hi <= off + length:
                self.bits[i] = 0

    def count(self) -> int:
        return sum(self.bits)

    def search(self, value: int, off: int, end: int | None) -> int:
        stop = self.size if end is None else min(end, self.size)
        for i in range(len(self.bits)):
            lo, hi = self.span(i)
            if self.bits[i] == value and hi > off and lo < stop:
                return max(lo, off) if max(lo, off) < stop else -1
        return -1

    def extents(self, start: int, end: int | None) -> list[tuple[int, int]]:
        stop = self.size if end is None else min(end, self.size)
        out: list[tuple[int, int]] = []
        for i, bit in enumerate(self.bits):
            lo, hi = self.span(i)
            lo, hi = max(lo, start), min(hi, stop)
            if not bit or lo >= hi:
                continue
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
        return out

    def merge(self, other: Shadow) -> None:
        for i, bit in enumerate(other.bits):
            if bit:
                lo, hi = other.span(i)
                self.set(lo, hi - lo)

    def packed(self) -> bytes:
        value = sum(1 << i for i, b in enumerate(self.bits) if b)
        return value.to_bytes(-(-len(self.bits) // 8), "little")


def assert_same(hb: HBitmap, sh: Shadow) -> None:
    assert hb.to_bytes_le() == sh.packed()
    assert hb.count() == sh.count()
    assert hb.dirty_bytes() == sh.count() * sh.gran
    assert hb.is_empty() == (sh.count() == 0)


def random_range(rng: random.Random, size: int, gran: int) -> tuple[int, int]:
    if rng.random() < 0.5:  # aligned
        nb = -(-size // gran)
        b0 = rng.randrange(nb)
        b1 = rng.randint(b0, min(nb, b0 + rng.choice([1, 2, 5, 40])))
        return b0 * gran, min(b1 * gran, size) - b0 * gran
    off = rng.randrange(size)
    return off, rng.randint(0, min(size - off, rng.choice([1, gran, 3 * gran, size])))


@pytest.fixture(params=[None, 8, 64], ids=["window-default", "window-8", "window-64"])
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with the real run-finder window and with tiny ones (edge cases)."""
    if request.param is not None:
        monkeypatch.setattr(hbitmap_mod, "_WINDOW", request.param)
    yield


SHAPES = [
    (1, 1), (7, 1), (100, 1), (333, 2), (1000, 4), (4097, 8), (5000, 16),
    (65536 + 77, 512), (300 * KiB + 1, 4 * KiB), (10 * MiB + 3, 64 * KiB),
    (33 * MiB, 2 * MiB), (17 * MiB + 5, 2 * MiB), (1000, 1024),
]


@pytest.mark.parametrize("size,gran", SHAPES)
def test_random_ops_match_shadow(size: int, gran: int, window: None) -> None:
    rng = random.Random(f"{size}/{gran}")
    hb, sh = HBitmap(size, gran), Shadow(size, gran)
    for _ in range(120):
        op = rng.random()
        off, length = random_range(rng, size, gran)
        if op < 0.45:
            hb.set(off, length)
            sh.set(off, length)
        elif op < 0.8:
            hb.reset(off, length)
            sh.reset(off, length)
        elif op < 0.83:
            hb.fill()
            sh.bits[:] = b"\x01" * len(sh.bits)
        elif op < 0.85:
            hb.clear()
            sh.bits[:] = bytes(len(sh.bits))
        assert_same(hb, sh)
        q = rng.randrange(size)
        assert hb.get(q) == bool(sh.bits[q // gran])
        end = rng.choice([None, q + rng.randrange(size), q + gran])
        assert hb.next_dirty(q, end) == sh.search(1, q, end)
        assert hb.next_clean(q, end) == sh.search(0, q, end)
        start = rng.choice([0, q])
        assert list(hb.dirty_extents(start, end)) == sh.extents(start, end)
        area = hb.next_dirty_area(q, end, rng.choice([None, 1, gran, 5 * gran]))
        exts = sh.extents(q, end)
        if not exts:
            assert area is None
        else:
            assert area is not None and area[0] == exts[0][0]
            assert 0 < area[1] <= exts[0][1]
    assert list(hb.dirty_extents()) == sh.extents(0, None)


@pytest.mark.parametrize(
    "size,g1,g2",
    [
        (1000, 1, 2), (1000, 2, 1), (1001, 1, 4), (999, 4, 1), (5000, 1, 8),
        (5000, 8, 1), (4097, 1, 16), (4097, 16, 2), (70001, 1, 512),
        (70001, 512, 4), (10 * MiB + 3, 64 * KiB, 512), (10 * MiB + 3, 512, 64 * KiB),
        (33 * MiB, 2 * MiB, 64 * KiB), (33 * MiB + 1, 4 * KiB, 2 * MiB),
        (3 * MiB, 128 * KiB, 128 * KiB), (100, 64, 1), (100, 1, 64),
    ],
)
def test_merge_matches_shadow(size: int, g1: int, g2: int) -> None:
    rng = random.Random(f"merge {size} {g1} {g2}")
    for density in (0.0, 0.01, 0.3, 1.0):
        a, sa = HBitmap(size, g1), Shadow(size, g1)
        b, sb = HBitmap(size, g2), Shadow(size, g2)
        for hb, sh, g in ((a, sa, g1), (b, sb, g2)):
            for i in range(len(sh.bits)):
                if rng.random() < density:
                    hb.set(i * g, 1)
                    sh.set(i * g, 1)
        before_b = b.copy()
        a.merge_from(b)
        sa.merge(sb)
        assert_same(a, sa)
        assert b == before_b  # the source is unchanged


def test_merge_aliasing_and_size_mismatch() -> None:
    hb = HBitmap(10_000, 16)
    hb.set(100, 3000)
    before = hb.copy()
    hb.merge_from(hb)
    assert hb == before
    with pytest.raises(ValueError):
        hb.merge_from(HBitmap(10_001, 16))


def test_window_boundaries_of_large_bitmap() -> None:
    n = (1 << 21) + 12345  # three windows of the run finder
    hb = HBitmap(n, 1)
    runs = [(0, 5), (1_048_570, 20), (1_048_576, 1), (2_097_151, 1),
            (2_097_152, 100), (n - 3, 3)]
    for off, length in runs:
        hb.set(off, length)
    expected = [(0, 5), (1_048_570, 20), (2_097_151, 101), (n - 3, 3)]
    assert list(hb.dirty_extents()) == expected
    assert list(hb.dirty_extents(1_048_580, 2_097_160)) == [
        (1_048_580, 10), (2_097_151, 9)]
    hb.fill()
    assert list(hb.dirty_extents()) == [(0, n)]
    assert list(hb.dirty_extents(5, n - 5)) == [(5, n - 10)]


def test_docstring_example() -> None:
    hb = HBitmap(8, 1)
    hb.set(2, 3)
    hb.set(4, 2)
    assert hb.to_bytes_le() == bytes([0b00111100]) and hb.count() == 4
    hb.reset(3, 2)
    assert hb.to_bytes_le() == bytes([0b00100100]) and hb.count() == 2
    assert hb.next_dirty(3) == 5
    assert list(hb.dirty_extents()) == [(2, 1), (5, 1)]
    hb = HBitmap(10, 4)
    hb.set(3, 2)
    assert hb.count() == 2
    hb.reset(2, 4)
    assert hb.count() == 2
    hb.fill()
    hb.reset(8, 2)
    assert list(hb.dirty_extents()) == [(0, 8)]


def test_partial_last_bit() -> None:
    hb = HBitmap(1_000_000, 65536)  # 16 bits, the last covers 16960 bytes
    assert hb.nbits == 16
    hb.set(999_999, 1)
    assert hb.count() == 1 and hb.dirty_bytes() == 65536  # count may exceed size
    assert list(hb.dirty_extents()) == [(983_040, 16_960)]
    hb.reset(983_040, 16_959)  # does not reach the end: inward rounding keeps it
    assert hb.count() == 1
    hb.reset(983_040, 16_960)  # ends at the disk end: resets the partial bit
    assert hb.count() == 0
    hb.fill()
    assert hb.dirty_bytes() == 1_048_576
    assert hb.next_clean(0) == -1


def test_queries_and_errors() -> None:
    hb = HBitmap(4096, 512)
    assert hb.next_dirty(0) == -1 and hb.next_clean(0) == 0
    hb.set(1000, 10)  # bit 1
    assert hb.next_dirty(0) == 512 and hb.next_dirty(700) == 700
    assert hb.next_dirty(0, 512) == -1 and hb.next_dirty(1024) == -1
    assert hb.next_clean(600) == 1024 and hb.next_clean(600, 1024) == -1
    assert hb.next_dirty_area(0) == (512, 512)
    assert hb.next_dirty_area(0, 600) == (512, 88)
    assert hb.next_dirty_area(0, None, 100) == (512, 100)
    assert hb.next_dirty_area(1024) is None
    assert hb.next_dirty(5000) == -1
    for bad in [(-1, 1), (0, 4097), (4096, 1), (10, -1)]:
        with pytest.raises(ValueError):
            hb.set(*bad)
        with pytest.raises(ValueError):
            hb.reset(*bad)
    hb.set(4096, 0)  # empty ranges are fine, even at the end
    with pytest.raises(ValueError):
        hb.get(4096)
    with pytest.raises(ValueError):
        HBitmap(100, 3)
    with pytest.raises(ValueError):
        HBitmap(-1, 512)
    with pytest.raises(ValueError):
        hb.restore_from(HBitmap(4096, 1024))


def test_empty_bitmap() -> None:
    hb = HBitmap(0, 512)
    assert hb.nbits == 0 and hb.count() == 0 and hb.is_empty()
    hb.fill()
    assert hb.count() == 0
    assert list(hb.dirty_extents()) == [] and hb.next_dirty(0) == -1
    assert hb.sha256() == hashlib.sha256(b"").hexdigest()


def test_copy_restore_are_independent() -> None:
    hb = HBitmap(1 << 20, 4096)
    hb.set(0, 10_000)
    snap = hb.copy()
    hb.set(500_000, 1)
    assert hb.count() == 4 and snap.count() == 3
    hb.restore_from(snap)
    assert hb == snap and hb.count() == 3
    hb.clear()
    assert snap.count() == 3 and hb.is_empty()


SHA_NONE = "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
SHA_GROUP1 = "0fe44ee8099aee1ec60ac068ecd0b1f16452fd202ae8c9d96cf640ca6ce1b918"
SHA_ALL = "e9175db65a9789096ca9cb5524d3abc2107df03e3c9ba3af1aca628f9c5d3bd2"


def test_sha256_reference_values() -> None:
    hb = HBitmap(64 * MiB, 64 * KiB)
    assert hb.sha256() == SHA_NONE
    for bit in (0, 15, 16, 512, 513, 1022):
        hb.set(bit * 64 * KiB, 64 * KiB)
    assert hb.sha256() == SHA_GROUP1
    hb.fill()
    assert hb.sha256() == SHA_ALL


@pytest.mark.parametrize("nbits", [1, 63, 64, 65, 1000, 4097])
def test_sha256_matches_definition(nbits: int) -> None:
    rng = random.Random(nbits)
    hb, sh = HBitmap(nbits * 512 - 7, 512), Shadow(nbits * 512 - 7, 512)
    for _ in range(20):
        off, length = random_range(rng, hb.size, 512)
        hb.set(off, length)
        sh.set(off, length)
    words = -(-nbits // 64)
    value = sum(1 << i for i, b in enumerate(sh.bits) if b)
    expected = hashlib.sha256(value.to_bytes(8 * words, "little")).hexdigest()
    assert hb.sha256() == expected
