#!/usr/bin/env python3
"""A full backup, then an incremental one, then a restore that is checked.

    python examples/full_then_incremental.py ./qmpd.sock /tmp/work

1. ``drive0`` is a 64 MiB raw image in WORKDIR; some "guest" data is
   written through HMP qemu-io.
2. One transaction makes ``bitmap0`` and starts a full backup, so the bitmap
   records exactly the writes made after the full backup's point in time.
3. More guest writes, then an incremental backup (``sync: incremental``)
   copies only the clusters the bitmap marked, and clears it on success.
4. Restore: start from the full backup and apply the incremental's data
   extents onto it; the result must equal the live image byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

from qemu.qmp import QMPClient

SIZE = 64 << 20


async def wait_job(qmp: QMPClient, job: str) -> dict:
    """Wait for the job's BLOCK_JOB_COMPLETED; fail on an error."""
    async for event in qmp.events:
        if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"]["device"] == job:
            if "error" in event["data"]:
                raise RuntimeError(f"{job} failed: {event['data']['error']}")
            return dict(event["data"])
    raise RuntimeError("disconnected")


async def guest_write(qmp: QMPClient, pattern: int, offset: int, length: int) -> None:
    await qmp.execute("human-monitor-command",
                      {"command-line": f'qemu-io drive0 "write -P {pattern:#x} {offset} {length}"'})


async def make_target(qmp: QMPClient, node: str, path: str) -> None:
    job = f"create-{node}"
    with qmp.listener("JOB_STATUS_CHANGE") as listener:
        await qmp.execute("blockdev-create", {"job-id": job, "options": {
            "driver": "file", "filename": path, "size": SIZE}})
        async for ev in listener:
            if ev["data"] == {"id": job, "status": "concluded"}:
                break
    await qmp.execute("job-dismiss", {"id": job})
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": node,
                                       "file": {"driver": "file", "filename": path}})


def data_extents(path: str) -> list[tuple[int, int]]:
    """Allocated (data) extents of a sparse file, from SEEK_DATA/SEEK_HOLE."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop - start))
            pos = stop
    return out


async def main(sock: str, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    qmp = QMPClient("full-then-incremental")
    await qmp.connect(sock)
    try:
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "drive0",
                                           "file": {"driver": "file", "filename": disk}})
        for i in range(8):
            await guest_write(qmp, 0x10 + i, i * (8 << 20), 1 << 20)

        full = os.path.join(workdir, "full.img")
        await make_target(qmp, "full", full)
        await qmp.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "bitmap0"}},
            {"type": "blockdev-backup", "data": {"device": "drive0", "target": "full", "sync": "full",
                                                 "job-id": "full0"}},
        ]})
        done = await wait_job(qmp, "full0")
        print(f"full backup: {done['offset']} of {done['len']} bytes")

        for off in (0x10000, 5 << 20, 33 << 20, SIZE - (128 << 10)):
            await guest_write(qmp, 0xAA, off, 64 << 10)
        info = await qmp.execute("query-named-block-nodes")
        dirty = next(b for n in info if n["node-name"] == "drive0" for b in n["dirty-bitmaps"])
        print(f"bitmap0 before the incremental: {dirty['count']} dirty bytes")

        inc = os.path.join(workdir, "inc.img")
        await make_target(qmp, "inc", inc)
        await qmp.execute("blockdev-backup", {"device": "drive0", "target": "inc", "sync": "incremental",
                                              "bitmap": "bitmap0", "job-id": "inc0"})
        done = await wait_job(qmp, "inc0")
        print(f"incremental backup: {done['offset']} of {done['len']} bytes")
        await qmp.execute("human-monitor-command", {"command-line": 'qemu-io drive0 "flush"'})
    finally:
        await qmp.disconnect()

    restored = os.path.join(workdir, "restored.img")
    shutil.copyfile(full, restored)
    with open(inc, "rb") as src, open(restored, "r+b") as dst:
        for off, length in data_extents(inc):
            src.seek(off)
            chunk = src.read(length)
            if off == 0 and chunk[:4096] == bytes(min(4096, len(chunk))):
                # blockdev-create allocates the first block of a new file (as
                # QEMU's file-posix does): zeros that were never copied.
                off, chunk = 4096, chunk[4096:]
            dst.seek(off)
            dst.write(chunk)
    with open(restored, "rb") as a, open(disk, "rb") as b:
        same = a.read() == b.read()
    print("restored image matches the live disk" if same else "MISMATCH between restore and live disk")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
