#!/usr/bin/env python3
"""A backup that fails halfway, resumed without copying anything twice.

    python examples/resume_failed_backup.py ./qmpd.sock [WORKDIR]

Self-contained: its nodes are named ``rfb-*`` and its images
``rfb-*.img`` (in WORKDIR, else in a temporary directory removed at the
end), and it deletes its nodes before it exits, even on failure, so it
can run again, or next to the other examples, on the same daemon.
Expected output::

    dirty before the backup: 12 clusters
    first run: Input/output error, copied 393216 of 786432 bytes
    still dirty after the failure: 6 clusters
    second run: ok, copied 393216 of 393216 bytes
    target matches the source on every written cluster

``rfb-drive0`` sits on a blkdebug node that fails one read with EIO.  The
backup uses ``sync: bitmap`` with ``bitmap-mode: always``: on failure the
bitmap is left holding exactly the clusters that were not copied (plus any
new writes), so a second run with the same bitmap and target copies only
what is missing.  The target then equals the source on every cluster the
first run was asked to copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile

from qemu.qmp import ExecuteError, QMPClient

SIZE = 64 << 20
CLUSTER = 64 << 10
#: Clusters the guest writes before the backup (scattered over the disk).
WRITTEN = [0, 3, 17, 64, 65, 200, 511, 700, 701, 702, 900, 1023]
#: The read of this cluster fails once (blkdebug, EIO).
FAILING = 511
DRIVE, TARGET = "rfb-drive0", "rfb-target"
JOBS = ("rfb-backup-1", "rfb-backup-2")


async def count(qmp: QMPClient) -> int:
    info = await qmp.execute("query-named-block-nodes")
    return next(b["count"] for n in info if n["node-name"] == DRIVE
                for b in n.get("dirty-bitmaps", []) if b.get("name") == "bitmap0")


async def run_backup(qmp: QMPClient, job: str) -> dict:
    with qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
        await qmp.execute("blockdev-backup", {
            "device": DRIVE, "target": TARGET, "sync": "bitmap", "bitmap": "bitmap0",
            "bitmap-mode": "always", "job-id": job, "x-perf": {"max-workers": 1}})
        async for event in listener:
            if event["data"]["device"] == job:
                return dict(event["data"])
    raise RuntimeError("disconnected")


async def cleanup(qmp: QMPClient) -> None:
    """Cancel this example's jobs and delete its nodes (best effort)."""
    for job in await qmp.execute("query-jobs"):
        if job["id"] in JOBS:
            with contextlib.suppress(ExecuteError):
                await qmp.execute("job-cancel", {"id": job["id"]})
    for node in (TARGET, DRIVE):
        with contextlib.suppress(ExecuteError):
            await qmp.execute("blockdev-del", {"node-name": node})


async def main(sock: str, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    disk, target = os.path.join(workdir, "rfb-disk.img"), os.path.join(workdir, "rfb-target.img")
    for path in (disk, target):
        with open(path, "wb") as f:
            f.truncate(SIZE)
    qmp = QMPClient("resume-failed-backup")
    await qmp.connect(sock)
    try:
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": DRIVE, "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": disk},
            "inject-error": [{"event": "read_aio", "errno": 5, "once": True,
                              "sector": FAILING * CLUSTER // 512}]}})
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": TARGET,
                                           "file": {"driver": "file", "filename": target}})
        await qmp.execute("block-dirty-bitmap-add", {"node": DRIVE, "name": "bitmap0"})
        for c in WRITTEN:
            await qmp.execute("human-monitor-command", {
                "command-line": f'qemu-io {DRIVE} "write -P {c % 251 + 1} {c * CLUSTER} {CLUSTER}"'})
        print(f"dirty before the backup: {await count(qmp) // CLUSTER} clusters")

        first = await run_backup(qmp, JOBS[0])
        print(f"first run: {first.get('error', 'ok')}, copied {first['offset']} of {first['len']} bytes")
        left = await count(qmp)
        print(f"still dirty after the failure: {left // CLUSTER} clusters")

        second = await run_backup(qmp, JOBS[1])
        print(f"second run: {second.get('error', 'ok')}, copied {second['offset']} of {second['len']} bytes")
        assert "error" in first and "error" not in second
        assert second["len"] == left, "the resumed run must copy exactly what was left"
        assert first["offset"] + second["offset"] == len(WRITTEN) * CLUSTER
    finally:
        await cleanup(qmp)
        await qmp.disconnect()

    with open(disk, "rb") as a, open(target, "rb") as b:
        src, dst = a.read(), b.read()
    bad = [c for c in WRITTEN if src[c * CLUSTER:(c + 1) * CLUSTER] != dst[c * CLUSTER:(c + 1) * CLUSTER]]
    print("target matches the source on every written cluster" if not bad else f"MISMATCH in clusters {bad}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    else:
        with tempfile.TemporaryDirectory(prefix="qmpd-example-") as tmp:
            asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "./qmpd.sock", tmp))
