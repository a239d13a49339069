#!/usr/bin/env python3
"""A full backup, then an incremental one, then a restore that is checked.

    python examples/full_then_incremental.py ./qmpd.sock [WORKDIR]

Self-contained: its nodes are named ``fti-*`` and its images
``fti-*.img`` (in WORKDIR, else in a temporary directory removed at the
end), and it deletes its nodes before it exits, even on failure, so it
can run again, or next to the other examples, on the same daemon.
Expected output::

    full backup: 67108864 of 67108864 bytes
    bitmap0 before the incremental: 262144 dirty bytes
    incremental backup: 262144 of 262144 bytes
    restored image matches the live disk

1. ``fti-drive0`` is a 64 MiB raw image; some "guest" data is written
   through HMP qemu-io.
2. One transaction makes ``bitmap0`` and starts a full backup, so the bitmap
   records exactly the writes made after the full backup's point in time.
3. More guest writes, then an incremental backup (``sync: incremental``)
   copies only the clusters the bitmap marked, and clears it on success.
4. Restore: start from the full backup and apply the incremental's data
   extents onto it; the result must equal the live image byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile

from qemu.qmp import ExecuteError, QMPClient

SIZE = 64 << 20
DRIVE, FULL, INC = "fti-drive0", "fti-full", "fti-inc"


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
                      {"command-line": f'qemu-io {DRIVE} "write -P {pattern:#x} {offset} {length}"'})


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


async def cleanup(qmp: QMPClient) -> None:
    """Cancel this example's jobs and delete its nodes (best effort)."""
    for job in await qmp.execute("query-jobs"):
        if job["id"] in ("full0", "inc0", f"create-{FULL}", f"create-{INC}"):
            with contextlib.suppress(ExecuteError):
                await qmp.execute("job-cancel", {"id": job["id"]})
    for node in (INC, FULL, DRIVE):
        with contextlib.suppress(ExecuteError):
            await qmp.execute("blockdev-del", {"node-name": node})


async def main(sock: str, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    disk = os.path.join(workdir, "fti-disk.img")
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    qmp = QMPClient("full-then-incremental")
    await qmp.connect(sock)
    try:
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": DRIVE,
                                           "file": {"driver": "file", "filename": disk}})
        for i in range(8):
            await guest_write(qmp, 0x10 + i, i * (8 << 20), 1 << 20)

        full = os.path.join(workdir, "fti-full.img")
        await make_target(qmp, FULL, full)
        await qmp.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": DRIVE, "name": "bitmap0"}},
            {"type": "blockdev-backup", "data": {"device": DRIVE, "target": FULL, "sync": "full",
                                                 "job-id": "full0"}},
        ]})
        done = await wait_job(qmp, "full0")
        print(f"full backup: {done['offset']} of {done['len']} bytes")

        for off in (0x10000, 5 << 20, 33 << 20, SIZE - (128 << 10)):
            await guest_write(qmp, 0xAA, off, 64 << 10)
        info = await qmp.execute("query-named-block-nodes")
        dirty = next(b for n in info if n["node-name"] == DRIVE for b in n["dirty-bitmaps"])
        print(f"bitmap0 before the incremental: {dirty['count']} dirty bytes")

        inc = os.path.join(workdir, "fti-inc.img")
        await make_target(qmp, INC, inc)
        await qmp.execute("blockdev-backup", {"device": DRIVE, "target": INC, "sync": "incremental",
                                              "bitmap": "bitmap0", "job-id": "inc0"})
        done = await wait_job(qmp, "inc0")
        print(f"incremental backup: {done['offset']} of {done['len']} bytes")
        await qmp.execute("human-monitor-command", {"command-line": f'qemu-io {DRIVE} "flush"'})
    finally:
        await cleanup(qmp)
        await qmp.disconnect()

    restored = os.path.join(workdir, "fti-restored.img")
    shutil.copyfile(full, restored)
    with open(inc, "rb") as src, open(restored, "r+b") as dst:
        for off, length in data_extents(inc):
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(length))
    with open(restored, "rb") as a, open(disk, "rb") as b:
        same = a.read() == b.read()
    print("restored image matches the live disk" if same else "MISMATCH between restore and live disk")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    else:
        with tempfile.TemporaryDirectory(prefix="qmpd-example-") as tmp:
            asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "./qmpd.sock", tmp))
