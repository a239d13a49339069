"""Our re-creation of QEMU's iotest 257 on raw images (spec §7, adapted per §7.5).

Every variant runs against a fresh daemon over a real UNIX socket, driven
with qemu.qmp.  The expected figures are the table of spec §7.3 (the ``top``
rows equal the ``full`` rows on raw images, §7.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, QMPClient

from tests.support.daemon import running_daemon, short_socket_dir
from tests.support.qmp import bitmap_count, bitmaps, create_raw_target, next_event, qemu_io, wait_job_status

SIZE = 64 << 20
CLUSTER = 64 << 10
NBITS = SIZE // CLUSTER

# (pattern, offset, length) per write group, spec §7.1
GROUPS: list[list[tuple[int, int, int]]] = [
    [(0x49, 0x0000000, 0x10000), (0x6C, 0x0100000, 0x10000), (0x6F, 0x2000000, 0x10000),
     (0x76, 0x3FF0000, 0x10000)],
    [(0x65, 0x0000000, 0x10000), (0x77, 0x00F8000, 0x10000), (0x72, 0x2008000, 0x10000),
     (0x69, 0x3FE0000, 0x10000)],
    [(0x74, 0x0010000, 0x10000), (0x69, 0x00E8000, 0x10000), (0x6E, 0x2018000, 0x10000),
     (0x67, 0x3FE0000, 0x20000)],
    [(0xAA, 0x0010000, 0x30000), (0xBB, 0x00D8000, 0x10000), (0xCC, 0x2028000, 0x10000),
     (0xDD, 0x3FC0000, 0x10000)],
]


def clusters(group: int) -> set[int]:
    out: set[int] = set()
    for _, off, length in GROUPS[group]:
        out.update(range(off // CLUSTER, (off + length - 1) // CLUSTER + 1))
    return out


@dataclass(frozen=True)
class Expect:
    msync: str
    bsync: str
    failure: str
    end_event: str  # CANCELLED | COMPLETED | ERROR
    offset: int
    length: int
    counts: tuple[int, ...]
    job2_len: int
    compare: str  # backup1/backup2/live: I or M


ROWS = [
    Expect("bitmap", "never", "simulated", "CANCELLED", 393216, 393216, (6, 6, 7, 10, 15, 15), 983040, "III"),
    Expect("bitmap", "never", "intermediate", "ERROR", 65536, 393216, (6, 6, 14, 14), 917504, "MII"),
    Expect("bitmap", "never", "none", "COMPLETED", 393216, 393216, (6, 6, 7, 10, 15, 15), 983040, "III"),
    Expect("bitmap", "on-success", "simulated", "CANCELLED", 393216, 393216, (6, 6, 7, 10, 15, 0), 983040, "III"),
    Expect("bitmap", "on-success", "intermediate", "ERROR", 65536, 393216, (6, 6, 14, 0), 917504, "MII"),
    Expect("bitmap", "on-success", "none", "COMPLETED", 393216, 393216, (6, 6, 7, 7, 12, 0), 786432, "III"),
    Expect("bitmap", "always", "simulated", "CANCELLED", 393216, 393216, (6, 6, 7, 7, 12, 0), 786432, "III"),
    Expect("bitmap", "always", "intermediate", "ERROR", 65536, 393216, (6, 5, 13, 0), 851968, "MII"),
    Expect("bitmap", "always", "none", "COMPLETED", 393216, 393216, (6, 6, 7, 7, 12, 0), 786432, "III"),
]
for _msync in ("full", "top"):
    ROWS += [
        Expect(_msync, "on-success", "simulated", "CANCELLED", SIZE, SIZE, (6, 6, 7, 10, 15, 0), 983040, "III"),
        Expect(_msync, "on-success", "intermediate", "ERROR", 983040, SIZE, (6, 6, 14, 0), 917504, "MII"),
        Expect(_msync, "on-success", "none", "COMPLETED", SIZE, SIZE, (6, 6, 7, 7, 12, 0), 786432, "III"),
        Expect(_msync, "always", "simulated", "CANCELLED", SIZE, SIZE, (6, 6, 7, 7, 12, 0), 786432, "III"),
        Expect(_msync, "always", "intermediate", "ERROR", 983040, SIZE, (6, 1009, 1014, 0), 66453504, "MII"),
        Expect(_msync, "always", "none", "COMPLETED", SIZE, SIZE, (6, 6, 7, 7, 12, 0), 786432, "III"),
    ]

BLKDEBUG = {
    "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2},
                  {"event": "read_aio", "state": 2, "new_state": 3}],
    "inject-error": [{"event": "read_aio", "errno": 5, "state": 3, "immediately": False, "once": True}],
}


def read_clusters(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert len(data) == SIZE
    return [data[i * CLUSTER:(i + 1) * CLUSTER] for i in range(NBITS)]


def compose(base: list[bytes], layers: list[tuple[list[bytes], set[int]]]) -> list[bytes]:
    """The image a backup chain restores to: base overlaid with each layer's clusters."""
    out = list(base)
    for image, which in layers:
        for c in which:
            out[c] = image[c]
    return out


class Run:
    def __init__(self, qmp: QMPClient, tmp: Path) -> None:
        self.qmp = qmp
        self.tmp = tmp
        self.listener = EventListener()
        qmp.register_listener(self.listener)

    async def write_group(self, group: int, node: str = "drive0") -> None:
        for pattern, off, length in GROUPS[group]:
            await qemu_io(self.qmp, node, f"write -P{pattern:#x} {off:#x} {length:#x}")

    async def count(self) -> int:
        count = await bitmap_count(self.qmp, "drive0", "bitmap0")
        assert count % CLUSTER == 0
        return count // CLUSTER

    async def reference_backup(self, n: int) -> None:
        node = f"ref_target_{n}"
        await create_raw_target(self.qmp, self.listener, node, str(self.tmp / f"ref{n}.img"), SIZE)
        job = f"ref_backup_{n}"
        await self.qmp.execute("blockdev-backup", {
            "device": "drive0", "target": node, "sync": "full", "job-id": job,
            "filter-node-name": "backup-top", "x-perf": {"max-workers": 1}})
        ev = await next_event(self.listener, "BLOCK_JOB_COMPLETED")
        assert ev["data"] == {"type": "backup", "device": job, "len": SIZE, "offset": SIZE, "speed": 0}
        await wait_job_status(self.listener, job, "null")

    async def test_backup(self, n: int, msync: str, bsync: str) -> None:
        node = f"backup_target_{n}"
        await create_raw_target(self.qmp, self.listener, node, str(self.tmp / f"backup{n}.img"), SIZE)
        await self.qmp.execute("blockdev-backup", {
            "device": "drive0", "target": node, "sync": msync, "job-id": f"backup_{n}",
            "bitmap": "bitmap0", "bitmap-mode": bsync, "auto-finalize": False,
            "filter-node-name": "backup-top", "x-perf": {"max-workers": 1}})


async def _variant(tmp: Path, row: Expect) -> None:
    img = tmp / "drive0.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    with short_socket_dir(tmp) as sock_dir:
        await _serve(sock_dir, tmp, img, row)


async def _serve(sock_dir: Path, tmp: Path, img: Path, row: Expect) -> None:
    async with running_daemon(sock_dir) as d:
        qmp = QMPClient("iotest257")
        await qmp.connect(d.path)
        run = Run(qmp, tmp)
        try:
            await _body(run, img, row)
        finally:
            await qmp.disconnect()


async def _body(run: Run, img: Path, row: Expect) -> None:
    qmp, listener = run.qmp, run.listener
    file_node: dict[str, Any] = {"driver": "file", "filename": str(img)}
    if row.failure == "intermediate":
        file_node = {"driver": "blkdebug", "image": file_node, **BLKDEBUG}
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "drive0", "file": file_node})

    await run.write_group(0)
    await run.reference_backup(0)
    await qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "bitmap0", "granularity": CLUSTER})
    await run.write_group(1)
    counts = [await run.count()]
    await run.reference_backup(1)
    if row.failure == "intermediate":
        await qemu_io(qmp, "drive0", "flush")

    s1 = clusters(1) if row.msync == "bitmap" else set(range(NBITS))
    await run.test_backup(1, row.msync, row.bsync)
    job = "backup_1"
    if row.failure == "intermediate":
        err = await next_event(listener, "BLOCK_JOB_ERROR")
        assert err["data"] == {"device": job, "operation": "read", "action": "report"}
        ev = await next_event(listener, "BLOCK_JOB_COMPLETED")
        assert ev["data"] == {"type": "backup", "device": job, "len": row.length, "offset": row.offset,
                              "speed": 0, "error": "Input/output error"}
        await wait_job_status(listener, job, "null")
    else:
        ev = await next_event(listener, "BLOCK_JOB_PENDING")
        assert ev["data"] == {"type": "backup", "id": job}
        await run.write_group(2, node="backup-top")
        counts.append(await run.count())
        drive0 = await bitmaps(qmp, "drive0") or []
        named = [b for b in drive0 if b.get("name") == "bitmap0"]
        assert named[0]["busy"] is True and named[0]["recording"] is True
        successor = [b for b in drive0 if "name" not in b and b["recording"]]
        assert [b["count"] // CLUSTER for b in successor] == [len(clusters(2))]
        counts.append(successor[0]["count"] // CLUSTER)
        if row.failure == "simulated":
            await qmp.execute("job-cancel", {"id": job})
            ev = await next_event(listener, "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
            assert ev["event"] == "BLOCK_JOB_CANCELLED"
            assert ev["data"] == {"type": "backup", "device": job, "len": row.length, "offset": row.offset,
                                  "speed": 0}
        else:
            await qmp.execute("job-finalize", {"id": job})
            ev = await next_event(listener, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            assert ev["data"] == {"type": "backup", "device": job, "len": row.length, "offset": row.offset,
                                  "speed": 0}
        await wait_job_status(listener, job, "null")
    counts.append(await run.count())

    await run.write_group(3)
    counts.append(await run.count())
    await run.reference_backup(2)

    s2_count = await run.count()
    await run.test_backup(2, "bitmap", row.bsync)
    ev = await next_event(listener, "BLOCK_JOB_PENDING")
    await qmp.execute("job-finalize", {"id": "backup_2"})
    ev = await next_event(listener, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
    assert ev["data"] == {"type": "backup", "device": "backup_2", "len": row.job2_len, "offset": row.job2_len,
                          "speed": 0}
    assert s2_count * CLUSTER == row.job2_len
    assert s2_count == len(_bitmap_set_for_job2(row))
    await wait_job_status(listener, "backup_2", "null")
    counts.append(await run.count())
    assert tuple(counts) == row.counts

    await qmp.execute("block-dirty-bitmap-remove", {"node": "drive0", "name": "bitmap0"})
    assert await bitmaps(qmp, "drive0") is None

    # --- verification (spec §7.5): restore each chain and compare
    tmp = run.tmp
    ref = [read_clusters(tmp / f"ref{n}.img") for n in range(3)]
    b1 = read_clusters(tmp / "backup1.img")
    b2 = read_clusters(tmp / "backup2.img")
    s2 = _bitmap_set_for_job2(row)
    verdict1 = "I" if compose(ref[0], [(b1, s1)]) == ref[1] else "M"
    if row.failure == "none" or row.bsync == "always":
        chain2 = compose(ref[0], [(b1, s1), (b2, s2)])
    else:
        chain2 = compose(ref[0], [(b2, s2)])
    verdict2 = "I" if chain2 == ref[2] else "M"
    live = "I" if read_clusters(img) == ref[2] else "M"
    assert verdict1 + verdict2 + live == row.compare


def _bitmap_set_for_job2(row: Expect) -> set[int]:
    """Clusters backup #2 was asked to copy (bitmap0 at job-2 start), for the overlay."""
    g1, g2, g3 = clusters(1), clusters(2), clusters(3)
    if row.failure == "intermediate":
        if row.bsync == "always":
            return (set(range(15, NBITS)) | g3) if row.msync != "bitmap" else ((g1 - {0}) | g3)
        return g1 | g3
    if row.bsync == "never" or row.failure == "simulated" and row.bsync == "on-success":
        return g1 | g2 | g3
    return g2 | g3


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("row", ROWS, ids=[f"{r.msync}-{r.bsync}-{r.failure}" for r in ROWS])
async def test_bitmap_sync(tmp_path: Path, row: Expect) -> None:
    await _variant(tmp_path, row)


def test_group_bits_match_spec() -> None:
    assert sorted(clusters(0)) == [0, 16, 512, 1023]
    assert sorted(clusters(1)) == [0, 15, 16, 512, 513, 1022]
    assert sorted(clusters(2)) == [1, 14, 15, 513, 514, 1022, 1023]
    assert sorted(clusters(3)) == [1, 2, 3, 13, 14, 514, 515, 1020]
    assert len(ROWS) == 21
