"""The persistent-bitmap journal: format round trips, corruption, and a
random replay against a shadow that crashes at every step (qmpd.bitmap.journal)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from bitarray import bitarray

from qmpd.bitmap.hbitmap import HBitmap
from qmpd.bitmap.journal import (
    INTENT_BITS_OFFSET,
    LEASE_OFFSET,
    BitmapRecord,
    ImageIdentity,
    JournalFormatError,
    Lease,
    Snapshot,
    WriteIntent,
    WriteLease,
    decode_intent,
    decode_lease,
    decode_snapshot,
    encode_intent,
    encode_snapshot,
    judge_lease,
    recover,
    state_file_stem,
)

IDENT = ImageIdentity(size=8 << 20, mtime_ns=11, ctime_ns=12, dev=13, ino=14)


def _snapshot() -> Snapshot:
    hb = HBitmap(8 << 20, 65536)
    hb.set(3 << 20, 4096)
    hb.set(7 << 20, 1 << 20)
    other = HBitmap(8 << 20, 512)
    other.set(1000, 1)
    return Snapshot("/srv/disk.img", IDENT, True, 5, 20, [
        BitmapRecord("b0", 65536, 8 << 20, True, False, hb.to_bytes_le()),
        BitmapRecord("é-lat", 512, 8 << 20, False, True, other.to_bytes_le()),
    ])


def test_snapshot_round_trip() -> None:
    snap = _snapshot()
    back = decode_snapshot(encode_snapshot(snap))
    assert back == snap
    assert back.records[0].to_hbitmap().count() == 1 + 16


def test_snapshot_every_corrupt_byte_is_detected() -> None:
    data = encode_snapshot(_snapshot())
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(JournalFormatError):
            decode_snapshot(bytes(bad))
    with pytest.raises(JournalFormatError):
        decode_snapshot(data[:-1])
    with pytest.raises(JournalFormatError):
        decode_snapshot(b"")


def test_snapshot_unknown_version_refused() -> None:
    import struct
    import zlib

    body = bytearray(encode_snapshot(_snapshot())[:-4])
    body[8:10] = (2).to_bytes(2, "little")
    with pytest.raises(JournalFormatError, match="version 2"):
        decode_snapshot(bytes(body) + struct.pack("<I", zlib.crc32(body)))


def test_intent_round_trip_and_header_check() -> None:
    bits = bitarray("1010000011", endian="little")
    data = encode_intent(10 << 20, 20, bits)
    assert len(data) == INTENT_BITS_OFFSET + 2
    assert decode_intent(data) == (10 << 20, 20, bits)
    bad = bytearray(data)
    bad[16] ^= 1
    with pytest.raises(JournalFormatError):
        decode_intent(bytes(bad))
    with pytest.raises(JournalFormatError):
        decode_intent(data[:INTENT_BITS_OFFSET])


def test_state_file_stem_is_stable_and_safe() -> None:
    a = state_file_stem("/srv/vm disk/../x.img")
    assert a == state_file_stem("/srv/vm disk/../x.img")
    assert a.startswith("x.img-") and "/" not in a and " " not in a
    assert state_file_stem("/a/x.img") != state_file_stem("/b/x.img")
    assert state_file_stem("/a/..").startswith("image-") or "/" not in state_file_stem("/a/..")


def test_write_intent_group_commit_shape() -> None:
    wi = WriteIntent(8 << 20, 20)
    assert wi.begin(3 << 20, 4096) == [3]
    assert wi.begin((3 << 20) + 4096, 1 << 20) == [3, 4]
    wi.request([3])
    wi.request([3, 4])
    batch = wi.take_pending()
    assert batch == [3, 4]  # one sync for both writers
    off, data = wi.byte_span(batch)
    assert off == INTENT_BITS_OFFSET and data == bytes([0b00011000])
    wi.mark_durable(batch)
    assert wi.begin(3 << 20, 8192) == []  # durable: no sync
    assert not wi.has_pending


def test_sequential_stream_syncs_log_n_times() -> None:
    wi = WriteIntent(1 << 30, 20)
    syncs = 0
    for mib in range(512):
        need = wi.begin(mib << 20, 1 << 20)
        if need:
            wi.request(need)
            wi.mark_durable(wi.take_pending())
            syncs += 1
        wi.end(mib << 20, 1 << 20)
    assert syncs == 9  # bits 0, 1-2, 3-6, 7-14, ...: the window doubles
    assert wi.durable.count() == 766  # less than twice what the stream wrote
    wi.begin(900 << 20, 4096)  # a random write does not read ahead
    assert wi.begin(1000 << 20, 4096) == [1000]


def test_recover_ors_coarse_bits_into_recording_bitmaps_only() -> None:
    snap = _snapshot()
    intent = bitarray("01000000", endian="little")
    hb0, hb1 = recover(snap, intent, 20)
    assert hb0.get(1 << 20) and hb0.get((2 << 20) - 1) and not hb0.get(2 << 20)
    assert not hb1.get(1 << 20)  # not recording: untouched
    clean0, _ = recover(snap, None, 20)
    assert not clean0.get(1 << 20)


# --------------------------------------------------------------- shadow replay


@dataclass
class _Write:
    offset: int
    length: int
    need: list[int]
    landed: bool = False


class _Model:
    """The rules of persist.NodeJournal, one atomic step at a time, with
    what is on disk kept apart from what is in memory."""

    def __init__(self, rng: random.Random, size: int, gran: int, shift: int) -> None:
        self.rng = rng
        self.size, self.gran, self.shift = size, gran, shift
        self.bm = HBitmap(size, gran)
        self.wi = WriteIntent(size, shift)
        self.writes: list[_Write] = []
        self.disk_snap = self._bits_now()
        self.disk_intent = bitarray(self.wi.nbits, endian="little")
        self.disk_intent.setall(0)
        self.captured: bytes | None = None

    def _bits_now(self) -> bytes:
        return self.bm.to_bytes_le()

    # one step each -------------------------------------------------------
    def begin(self) -> None:
        off = self.rng.randrange(0, self.size - 1)
        length = self.rng.randint(1, min(self.size - off, 3 << self.shift))
        need = self.wi.begin(off, length)
        self.wi.request(need)
        self.writes.append(_Write(off, length, need))

    def sync(self) -> None:
        batch = self.wi.take_pending()
        if batch:
            off, data = self.wi.byte_span(batch)
            raw = bytearray(self.disk_intent.tobytes())
            raw[off - INTENT_BITS_OFFSET:off - INTENT_BITS_OFFSET + len(data)] = data
            self.disk_intent = bitarray(endian="little")
            self.disk_intent.frombytes(bytes(raw))
            del self.disk_intent[self.wi.nbits:]
            self.wi.mark_durable(batch)

    def land(self) -> None:
        ready = [w for w in self.writes if not w.landed and self.wi.all_durable(w.need)]
        if ready:
            self.rng.choice(ready).landed = True

    def finish(self) -> None:
        done = [w for w in self.writes if w.landed]
        if done:
            w = self.rng.choice(done)
            self.writes.remove(w)
            self.bm.set(w.offset, w.length)
            self.wi.end(w.offset, w.length)

    def clear(self) -> None:
        self.bm.clear()

    def capture(self) -> None:
        if self.captured is None:
            self.captured = self._bits_now()
            self.wi.capture()

    def snapshot_durable_then_reset(self, torn: bool) -> None:
        if self.captured is None:
            return
        self.disk_snap, self.captured = self.captured, None
        old = self.disk_intent.tobytes()
        new = self.wi.reset_mask().tobytes()
        if torn:  # a crash in the middle of the rewrite: any mix of sectors
            mixed = bytes(self.rng.choice((a, b)) for a, b in zip(old, new))
            return self._crash_check(mixed)
        self.disk_intent = bitarray(endian="little")
        self.disk_intent.frombytes(new)
        del self.disk_intent[self.wi.nbits:]

    # the property ----------------------------------------------------------
    def expected(self) -> HBitmap:
        """What a clean stop now would have stored: the in-memory bits plus
        every write that reached the image but has not set them yet."""
        exp = self.bm.copy()
        for w in self.writes:
            if w.landed:
                exp.set(w.offset, w.length)
        return exp

    def _crash_check(self, intent_bytes: bytes | None = None) -> None:
        intent = self.disk_intent
        if intent_bytes is not None:
            intent = bitarray(endian="little")
            intent.frombytes(intent_bytes)
            del intent[self.wi.nbits:]
        snap = Snapshot("/x", IDENT, False, 1, self.shift,
                        [BitmapRecord("b", self.gran, self.size, True, False, self.disk_snap)])
        got = recover(decode_snapshot(encode_snapshot(snap)), intent, self.shift)[0]
        exp = self.expected()
        missing = exp.copy()
        both = got.copy()
        both.merge_from(exp)
        assert both == got, f"recovered bitmap lacks dirty bits ({missing.count()} expected)"

    def crash_check(self) -> None:
        self._crash_check()

    def crash_and_restart(self) -> None:
        """kill -9 now, then open again: the recovered bits become the
        bitmap and the layer on disk is where the new run starts from."""
        snap = Snapshot("/x", IDENT, False, 1, self.shift,
                        [BitmapRecord("b", self.gran, self.size, True, False, self.disk_snap)])
        self.bm = recover(snap, self.disk_intent, self.shift)[0]
        self.wi = WriteIntent(self.size, self.shift)
        self.wi.load_durable(self.disk_intent)
        self.writes = []
        self.captured = None


@pytest.mark.parametrize("seed", range(12))
def test_replay_against_shadow_crash_anywhere(seed: int) -> None:
    rng = random.Random(seed)
    shift = rng.choice((16, 17, 20))
    m = _Model(rng, size=rng.choice((1 << 20, 3 << 20, (5 << 20) + 4096)), gran=rng.choice((512, 4096, 65536)),
               shift=shift)
    steps = [m.begin, m.begin, m.sync, m.land, m.land, m.finish, m.finish, m.clear, m.capture]
    for _ in range(1500):
        r = rng.random()
        if r < 0.06:
            m.snapshot_durable_then_reset(torn=False)
        elif r < 0.08:
            m.snapshot_durable_then_reset(torn=True)
            m.captured = None
        elif r < 0.10:
            m.crash_and_restart()
        else:
            rng.choice(steps)()
        m.crash_check()


# ------------------------------------------------------------ write lease

_IMG = ImageIdentity(1 << 30, 5_000, 6_000, 7, 8)


def test_lease_round_trip_inside_the_intent_header() -> None:
    for lease in (Lease(True, 123_456_789), Lease(False, 42, _IMG)):
        data = encode_intent(8 << 20, 20, lease=lease)
        assert decode_lease(data) == lease
        assert decode_intent(data)[:2] == (8 << 20, 20)  # readers of the bits are unaffected
    assert decode_lease(encode_intent(8 << 20, 20)) is None  # written by an older qmpd
    torn = bytearray(encode_intent(8 << 20, 20, lease=Lease(True, 1)))
    torn[LEASE_OFFSET + 20] ^= 1
    assert decode_lease(bytes(torn)) is None


def test_write_lease_due_and_never_shortened() -> None:
    wl = WriteLease(4_000)
    assert wl.due(0)
    wl.current = wl.renewed(1_000)
    assert wl.current == Lease(True, 5_000)
    assert not wl.due(1_999) and wl.due(2_001)  # renewed once a quarter is used
    wl.current = Lease(True, 9_000)
    assert wl.renewed(1_000).until == 9_000
    wl.current = wl.released(2_000, _IMG)
    assert wl.due(2_000)  # the next write takes a new lease first


def test_judge_lease() -> None:
    later = ImageIdentity(_IMG.size, 9_000, 9_000, 7, 8)
    # Released: the image must be exactly as recorded.
    assert judge_lease(Lease(False, 6_000, _IMG), _IMG, later) is None
    assert "stopped writing it" in str(judge_lease(Lease(False, 6_000, _IMG), later, _IMG))
    # Held: stamps up to the lease's end are qmpd's own.
    assert judge_lease(Lease(True, 9_000), later, _IMG) is None
    why = judge_lease(Lease(True, 8_000), later, _IMG)
    assert why is not None and "past qmpd's write lease" in why
    # ctime counts too (mtime can be set back by anyone, ctime cannot).
    assert judge_lease(Lease(True, 8_000), ImageIdentity(_IMG.size, 1, 9_000, 7, 8), _IMG) is not None
    # No lease (older file): only an image unchanged since the snapshot.
    assert judge_lease(None, _IMG, _IMG) is None
    assert judge_lease(None, later, _IMG) is not None
