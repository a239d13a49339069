"""DirtyBitmap, BitmapList and merge: flags, QEMU's checks and texts,
successors (spec 5.3-5.5), against shadow sets of dirty bit indices."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from qmpd.bitmap import (
    BitmapBusy,
    BitmapError,
    BitmapInconsistent,
    BitmapList,
    BitmapNotFound,
    BitmapReadonly,
    DirtyBitmap,
    merge,
)
from qmpd.errors import GenericError
from qmpd.commands.views import bitmap_info, bitmap_infos

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
BUSY = "Bitmap 'b' is currently in use by another operation and cannot be used"


def bits(bm: DirtyBitmap) -> set[int]:
    """Dirty bit indices of a bitmap (the test's view of its contents)."""
    g = bm.granularity
    return {i for off, n in bm.hbitmap.dirty_extents() for i in range(off // g, -(-(off + n) // g))}


def make_list(**kw: object) -> BitmapList:
    return BitmapList(SIZE, node_label="drive0", **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ add


def test_add_defaults_and_info_order() -> None:
    bl = make_list()
    b = bl.add("b")
    assert (b.granularity, b.size, b.enabled, b.recording) == (64 * KiB, SIZE, True, True)
    bl.mark_dirty(0, 1)
    a = bl.add("a", 512, disabled=True)
    anon = bl.create_anonymous(4096, disabled=True)
    assert [bm.name for bm in bl] == [None, "a", "b"]  # newest first
    assert bitmap_infos(bl) == [
        {"count": 0, "granularity": 4096, "recording": False, "busy": False, "persistent": False},
        {"name": "a", "count": 0, "granularity": 512, "recording": False, "busy": False,
         "persistent": False},
        {"name": "b", "count": 65536, "granularity": 65536, "recording": True, "busy": False,
         "persistent": False},
    ]
    assert list(bitmap_info(b)) == ["name", "count", "granularity", "recording", "busy", "persistent"]
    b.inconsistent = True
    assert list(bitmap_info(b))[-1] == "inconsistent" and bitmap_info(b)["inconsistent"] is True
    assert len(bl) == 3 and a in bl and anon in bl


@pytest.mark.parametrize(
    "name,kw,text",
    [
        ("", {"granularity": 3}, "Bitmap name cannot be empty"),
        ("x", {"granularity": 256}, "Granularity must be power of 2 and at least 512"),
        ("x", {"granularity": 1536, "persistent": True},
         "Granularity must be power of 2 and at least 512"),
        ("x", {"persistent": True}, "Can't store persistent bitmaps to drive0: Operation not supported"),
        ("taken", {"persistent": True},
         "Can't store persistent bitmaps to drive0: Operation not supported"),
        ("taken", {}, "Bitmap already exists: taken"),
        ("n" * 1024, {}, "Bitmap name too long: " + "n" * 1024),
        ("\u00e9" * 512, {}, "Bitmap name too long: " + "\u00e9" * 512),  # 1024 bytes
    ],
)
def test_add_errors_in_qemu_order(name: str, kw: dict[str, object], text: str) -> None:
    bl = make_list()
    bl.add("taken")
    with pytest.raises(BitmapError) as exc:
        bl.add(name, **kw)  # type: ignore[arg-type]
    assert exc.value.desc == text and isinstance(exc.value, GenericError)
    assert exc.value.error_class == "GenericError"
    assert len(bl) == 1


def test_add_accepts_limits_and_persistent_callbacks() -> None:
    label = ["node-a"]
    bl = BitmapList(SIZE, node_label=lambda: label[0], can_store_persistent=lambda: False)
    bl.add("n" * 1023, 2**31)
    label[0] = "node-b"
    with pytest.raises(BitmapError, match="to node-b: Operation"):
        bl.add("p", persistent=True)
    ok = BitmapList(SIZE, can_store_persistent=True).add("p", persistent=True)
    assert ok.persistent and bitmap_info(ok)["persistent"] is True


def test_lookup_find_remove() -> None:
    bl = make_list()
    b = bl.add("b")
    assert bl.find("b") is b and bl.find("c") is None and bl.lookup("b") is b
    with pytest.raises(BitmapNotFound) as exc:
        bl.lookup("c")
    assert exc.value.desc == "Dirty bitmap 'c' not found"
    bl.remove(b)
    assert not bl and bl.find("b") is None
    with pytest.raises(ValueError):
        bl.remove(b)


# --------------------------------------------------------- command checks


def flagged(**flags: bool) -> DirtyBitmap:
    bm = DirtyBitmap(SIZE, 65536, "b")
    for k, v in flags.items():
        setattr(bm, k, v)
    return bm


RO = "Bitmap 'b' is readonly and cannot be modified"
INC = "Bitmap 'b' is inconsistent and cannot be used"


@pytest.mark.parametrize(
    "check,flags,text",
    [
        (BitmapList.check_can_remove, {"busy": True, "readonly": True}, BUSY),
        (BitmapList.check_can_remove, {"readonly": True, "inconsistent": True}, RO),
        (BitmapList.check_can_remove, {"inconsistent": True}, None),
        (BitmapList.check_can_clear, {"busy": True, "readonly": True, "inconsistent": True}, BUSY),
        (BitmapList.check_can_clear, {"readonly": True, "inconsistent": True}, RO),
        (BitmapList.check_can_clear, {"inconsistent": True}, INC),
        (BitmapList.check_can_enable, {"busy": True, "inconsistent": True}, BUSY),
        (BitmapList.check_can_enable, {"readonly": True}, None),
        (BitmapList.check_can_enable, {"inconsistent": True}, INC),
        (BitmapList.check_can_disable, {"inconsistent": True, "readonly": True}, INC),
        (BitmapList.check_can_disable, {}, None),
    ],
)
def test_command_checks(check: object, flags: dict[str, bool], text: str | None) -> None:
    bm = flagged(**flags)
    if text is None:
        check(bm)  # type: ignore[operator]
        return
    with pytest.raises(BitmapError) as exc:
        check(bm)  # type: ignore[operator]
    assert exc.value.desc == text
    assert isinstance(exc.value, {BUSY: BitmapBusy, RO: BitmapReadonly, INC: BitmapInconsistent}[text])


# -------------------------------------------------------------- mark_dirty


def test_mark_dirty_only_enabled_and_clipped() -> None:
    bl = BitmapList(1000)
    bl.mark_dirty(0, 10)  # no bitmaps: nothing to do
    on, off = bl.add("on", 512), bl.add("off", 512, disabled=True)
    bl.mark_dirty(500, 20)
    assert bits(on) == {0, 1} and bits(off) == set()
    bl.size = 5000  # the node grew: new bitmaps are bigger, old ones clip
    big = bl.add("big", 512)
    bl.mark_dirty(900, 2000)
    assert bits(on) == {0, 1} and bits(big) == set(range(1, 6))
    bl.mark_dirty(4000, 10)  # beyond "on" entirely
    assert on.count == 1024 and bits(big) == set(range(1, 6)) | {7}


# --------------------------------------------------------------- merge


def random_bitmap(rng: random.Random, size: int, gran: int, name: str) -> DirtyBitmap:
    bm = DirtyBitmap(size, gran, name)
    for _ in range(rng.randrange(6)):
        off = rng.randrange(size)
        bm.hbitmap.set(off, rng.randint(0, min(size - off, 5 * gran)))
    return bm


def shadow_merge(target: DirtyBitmap, sources: list[DirtyBitmap]) -> set[int]:
    """Bits the target must have: its own plus each source's byte ranges."""
    g, size = target.granularity, target.size
    out = bits(target)
    for src in sources:
        for i in bits(src):
            lo, hi = i * src.granularity, min((i + 1) * src.granularity, size)
            out |= set(range(lo // g, -(-hi // g)))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_merge_random_granularities(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([1000, 4096, 70_001, 3 * MiB + 7])
    grans = [1 << rng.randint(0, 12) for _ in range(rng.randint(1, 4))]
    target = random_bitmap(rng, size, 1 << rng.randint(0, 12), "t")
    sources = [random_bitmap(rng, size, g, f"s{i}") for i, g in enumerate(grans)]
    if rng.random() < 0.3:
        sources.insert(rng.randrange(len(sources) + 1), target)  # aliasing
    expected = shadow_merge(target, sources)
    before = [bm.hbitmap.copy() for bm in sources if bm is not target]
    merge(target, sources)
    assert bits(target) == expected
    assert target.count == len(expected) * target.granularity
    assert [bm.hbitmap for bm in sources if bm is not target] == before


def test_merge_examples_from_spec() -> None:
    coarse = DirtyBitmap(SIZE, 128 * KiB, "c")
    fine = DirtyBitmap(SIZE, 32 * KiB, "f")
    src = DirtyBitmap(SIZE, 64 * KiB, "s")
    src.hbitmap.set(64 * KiB, 64 * KiB)  # bit 1
    merge(coarse, [src])
    merge(fine, [src])
    assert bits(coarse) == {0} and bits(fine) == {2, 3}
    empty = DirtyBitmap(SIZE, 64 * KiB, "e")
    merge(src, [empty])  # empty source: target unchanged
    assert bits(src) == {1}
    merge(empty, [])  # no sources: no-op (QEMU 7.2 crashes here)
    merge(empty, [empty, empty])
    assert bits(empty) == set()


def test_merge_errors_are_all_or_nothing() -> None:
    t = DirtyBitmap(SIZE, 65536, "t")
    t.hbitmap.set(0, 1)
    good = DirtyBitmap(SIZE, 512, "good")
    good.hbitmap.set(SIZE - 1, 1)
    busy = DirtyBitmap(SIZE, 65536, "b")
    busy.busy = True
    inc = DirtyBitmap(SIZE, 65536, "b")
    inc.inconsistent = True
    ro = DirtyBitmap(SIZE, 65536, "b")
    ro.readonly = True  # a readonly *source* is fine
    other = DirtyBitmap(SIZE + 512, 65536, "o")
    cases: list[tuple[DirtyBitmap, str]] = [
        (busy, BUSY), (inc, INC),
        (other, f"Bitmaps are of different sizes (destination size is {SIZE}, "
                f"source size is {SIZE + 512}) and can't be merged"),
    ]
    for bad, text in cases:
        with pytest.raises(BitmapError) as exc:
            merge(t, [good, ro, bad])
        assert exc.value.desc == text
        assert bits(t) == {0}
    merge(t, [good, ro])
    assert bits(t) == {0, 1023}
    for flag, text in (("busy", BUSY), ("readonly", RO), ("inconsistent", INC)):
        tgt = flagged(**{flag: True})
        with pytest.raises(BitmapError) as exc:
            merge(tgt, [])
        assert exc.value.desc == text


def test_merge_lazy_sources_keep_qemu_order() -> None:
    bl = make_list()
    t = bl.add("t")
    s1 = bl.add("s1")
    s1.hbitmap.set(0, 1)
    busy = bl.add("b")
    busy.busy = True

    def lookups(names: list[str]) -> Iterator[DirtyBitmap]:
        for name in names:
            yield bl.lookup(name)

    with pytest.raises(BitmapNotFound):  # not found before a later busy one
        merge(t, lookups(["s1", "nope", "b"]))
    with pytest.raises(BitmapBusy):  # busy before a later missing one
        merge(t, lookups(["s1", "b", "nope"]))
    assert t.count == 0
    snap = t.snapshot()
    merge(t, lookups(["s1", "t"]))
    assert t.count == 65536
    t.restore(snap)  # transaction abort
    assert t.count == 0


def test_merge_checks_target_after_first_source_lookup() -> None:
    """QEMU 7.2 (observed, tools/differential.py seeds 5, 112): the first
    source is looked up, then the busy target is refused before the first
    source's own checks and before later sources are looked up."""
    bl = make_list()
    t = bl.add("b")
    t.busy = True
    s1 = bl.add("s1")
    other = bl.add("o")
    other.busy = True

    def lookups(names: list[str]) -> Iterator[DirtyBitmap]:
        for name in names:
            yield bl.lookup(name)

    with pytest.raises(BitmapNotFound):
        merge(t, lookups(["nope", "s1"]))
    for names in (["s1", "nope"], ["o"], ["s1", "o"], ["s1"]):
        with pytest.raises(BitmapBusy) as exc:
            merge(t, lookups(names))
        assert exc.value.desc == BUSY
    assert s1.count == 0


# ------------------------------------------------------------ successors


@pytest.mark.parametrize("disabled", [False, True])
def test_successor_abdicate(disabled: bool) -> None:
    bl = make_list()
    bm = bl.add("b", 65536, disabled=disabled, persistent=False)
    bm.hbitmap.set(0, 3 * 65536)
    bl.mark_dirty(SIZE - 1, 1)
    old = bits(bm)
    succ = bm.create_successor()
    assert bm.busy and bm.disabled and bm.successor is succ
    assert succ.name is None and succ.disabled == disabled and not succ.busy
    assert bm.recording == (not disabled)
    assert [x.name for x in bl] == [None, "b"]
    assert bitmap_infos(bl)[1]["busy"] is True and bitmap_infos(bl)[1]["recording"] == (not disabled)
    bl.mark_dirty(10 * 65536, 100)  # written while frozen
    assert bits(bm) == old
    assert bits(succ) == (set() if disabled else {10})
    with pytest.raises(BitmapBusy) as exc:
        bl.check_can_clear(bm)
    assert exc.value.desc == BUSY
    with pytest.raises(BitmapBusy):
        bm.create_successor()
    new = bm.abdicate()
    assert new is succ and new.name == "b" and not new.busy and new.successor is None
    assert new.disabled == disabled and bm.name is None and bm not in bl
    assert [x.name for x in bl] == ["b"] and bl.lookup("b") is new
    assert bits(new) == (set() if disabled else {10})


@pytest.mark.parametrize("disabled", [False, True])
def test_successor_reclaim(disabled: bool) -> None:
    bl = make_list()
    bm = bl.add("b", disabled=disabled)
    bm.hbitmap.set(0, 1)
    succ = bm.create_successor()
    bl.mark_dirty(5 * 65536, 1)
    succ.hbitmap.set(7 * 65536, 1)  # e.g. uncopied clusters
    assert bm.reclaim() is bm
    assert not bm.busy and bm.disabled == disabled and bm.successor is None
    assert succ not in bl and list(bl) == [bm]
    assert bits(bm) == ({0, 7} if disabled else {0, 5, 7})
    bl.mark_dirty(9 * 65536, 1)
    assert (9 in bits(bm)) == (not disabled)


def test_successor_errors() -> None:
    bm = DirtyBitmap(SIZE, 65536, "b")  # not in any list: still works
    with pytest.raises(BitmapError, match="no successor present"):
        bm.abdicate()
    with pytest.raises(BitmapError, match="Cannot reclaim a successor when none is present"):
        bm.reclaim()
    bm.create_successor()
    bm.busy = False  # only the successor check is left
    with pytest.raises(BitmapError) as exc:
        bm.create_successor()
    assert exc.value.desc == "Cannot create a successor for a bitmap that already has one"


def test_random_successor_scenarios_against_shadow() -> None:
    rng = random.Random(4.7)
    for _ in range(60):
        gran = 1 << rng.randint(9, 17)
        bl = BitmapList(SIZE)
        disabled = rng.random() < 0.3
        bm = bl.add("b", gran, disabled=disabled)
        shadow_old: set[int] = set()
        shadow_new: set[int] = set()

        def write(frozen: bool) -> None:
            off = rng.randrange(SIZE)
            n = rng.randint(1, min(SIZE - off, 300_000))
            bl.mark_dirty(off, n)
            if not disabled:
                (shadow_new if frozen else shadow_old).update(range(off // gran, (off + n - 1) // gran + 1))

        for _ in range(rng.randrange(5)):
            write(False)
        bm.create_successor()
        for _ in range(rng.randrange(5)):
            write(True)
        assert bits(bm) == shadow_old
        if rng.random() < 0.5:
            result, expect = bm.abdicate(), shadow_new
        else:
            result, expect = bm.reclaim(), shadow_old | shadow_new
        assert bits(result) == expect and result.name == "b" and list(bl) == [result]
        assert result.disabled == disabled and not result.busy
