"""Benchmark of qmpd.bitmap.HBitmap at 1 TiB / 64 KiB (16,777,216 bits).

Run: ``.venv/bin/python bench/bitmap.py [--repeat N]``.  Each figure is the
best of N runs (default 5) of one bulk operation; the target is printed next
to it.  Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitarray.util import urandom  # noqa: E402

from qmpd.bitmap.hbitmap import HBitmap  # noqa: E402

TiB = 1 << 40
KiB = 1 << 10
GRAN = 64 * KiB
NBITS = TiB // GRAN
TARGET_MS = 20.0


def best_ms(fn: Callable[[], object], repeat: int, setup: Callable[[], None] | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def one_percent(rng: random.Random, gran: int, runs: bool) -> HBitmap:
    """A 1 %-dirty bitmap: scattered single bits, or short runs (1..64 bits)."""
    hb = HBitmap(TiB, gran)
    nbits = hb.nbits
    while hb.count() < nbits // 100:
        length = rng.randint(1, 64) if runs else 1
        hb.set(rng.randrange(nbits - length) * gran, length * gran)
    return hb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(257)
    rows: list[tuple[str, str, str, bool]] = []

    def timed(label: str, fn: Callable[[], object], setup: Callable[[], None] | None = None,
              target: float | None = TARGET_MS) -> None:
        ms = best_ms(fn, args.repeat, setup)
        ok = target is None or ms < target
        rows.append((label, f"{ms:9.3f} ms", f"< {target:.0f} ms" if target else "(info)", ok))

    hb = HBitmap(TiB, GRAN)
    ranges = [(o * GRAN, rng.randint(1, 16) * GRAN) for o in
              (rng.randrange(NBITS - 16) for _ in range(10_000))]

    def sets() -> None:
        for off, length in ranges:
            hb.set(off, length)

    timed("10,000 random range sets (1..16 bits)", sets, hb.clear)
    unaligned = [(rng.randrange(TiB - 1_000_000), rng.randint(1, 1_000_000)) for _ in range(10_000)]

    def sets_unaligned() -> None:
        for off, length in unaligned:
            hb.set(off, length)

    timed("10,000 random unaligned byte-range sets", sets_unaligned, hb.clear)
    def resets() -> None:
        for off, length in ranges:
            hb.reset(off, length)

    timed("10,000 random range resets", resets, hb.fill)

    half = HBitmap(TiB, GRAN)
    half.load_bits(urandom(NBITS, "little"))  # 50 % dirty
    timed("full count (popcount of every word)", half.popcount)
    timed("cached count()", half.count)

    sparse = one_percent(rng, GRAN, runs=True)
    scattered = one_percent(rng, GRAN, runs=False)
    def walk(hb: HBitmap) -> int:
        n = 0
        for _off, _len in hb.dirty_extents():
            n += 1
        return n

    timed(f"for-loop over dirty_extents, 1% in 1..64-bit runs ({walk(sparse):,} extents)",
          lambda: walk(sparse))
    timed(f"for-loop over dirty_extents, 1% scattered bits ({walk(scattered):,} extents)",
          lambda: walk(scattered))
    last = HBitmap(TiB, GRAN)
    last.set(TiB - 1, 1)
    timed("next_dirty from 0, only the last bit set", lambda: last.next_dirty(0))
    full = HBitmap(TiB, GRAN)
    full.fill()
    full.reset(TiB - GRAN, GRAN)
    timed("next_clean from 0, all set but the last bit", lambda: full.next_clean(0))

    def randomised(gran: int) -> HBitmap:
        hb = HBitmap(TiB, gran)
        hb.load_bits(urandom(hb.nbits, "little"))  # 50 % dirty
        return hb

    dst = HBitmap(TiB, GRAN)
    timed("merge, same granularity (64K <- 64K, 50% dirty)", lambda: dst.merge_from(half), dst.clear)
    for src_g, dst_g in ((64, 128), (64, 32), (32, 64), (128, 64), (1024, 64)):
        src = randomised(src_g * KiB)
        tgt = HBitmap(TiB, dst_g * KiB)
        timed(f"merge, {src_g}K -> {dst_g}K ({src.nbits:,} -> {tgt.nbits:,} bits, 50%)",
              lambda: tgt.merge_from(src), tgt.clear)
    timed("sha256", half.sha256)

    mem = half.memory()
    ideal = NBITS // 8
    rows.append((f"memory ({NBITS:,} bits)", f"{mem:,} B",
                 f"<= {int(ideal * 1.1):,} B (bits/8 = {ideal:,})", mem <= ideal * 1.1))

    width = max(len(r[0]) for r in rows)
    print(f"HBitmap, {NBITS:,} bits (1 TiB at 64 KiB), best of {args.repeat}")
    print(f"{'operation':<{width}}  {'figure':>14}  target")
    for label, fig, target, ok in rows:
        print(f"{label:<{width}}  {fig:>14}  {target}{'' if ok else '   MISSED'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
