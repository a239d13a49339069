"""Helpers for scenario tests driven through qemu.qmp's QMPClient."""

from __future__ import annotations

import asyncio
from typing import Any

from qemu.qmp import EventListener, QMPClient

TIMEOUT = 30.0


async def hmp(qmp: QMPClient, line: str) -> str:
    out = await qmp.execute("human-monitor-command", {"command-line": line})
    assert isinstance(out, str)
    return out


async def qemu_io(qmp: QMPClient, node: str, cmd: str) -> None:
    """Guest-style I/O through HMP; QEMU answers "" even on I/O errors."""
    assert await hmp(qmp, f'qemu-io {node} "{cmd}"') == ""


async def next_event(listener: EventListener, *names: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next event with one of ``names`` (others are skipped)."""
    async def get() -> dict[str, Any]:
        while True:
            ev = await listener.get()
            if ev["event"] in names:
                return dict(ev)
    return await asyncio.wait_for(get(), timeout)


async def wait_job_status(listener: EventListener, job_id: str, status: str,
                          timeout: float = TIMEOUT) -> None:
    async def get() -> None:
        while True:
            ev = await listener.get()
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"id": job_id, "status": status}:
                return
    await asyncio.wait_for(get(), timeout)


async def bitmaps(qmp: QMPClient, node: str) -> list[dict[str, Any]] | None:
    """``dirty-bitmaps`` of ``node`` in query-named-block-nodes (None if absent)."""
    for info in await qmp.execute("query-named-block-nodes"):
        if info["node-name"] == node:
            return info.get("dirty-bitmaps")
    raise AssertionError(f"node {node} not listed")


async def bitmap_count(qmp: QMPClient, node: str, name: str) -> int:
    for bm in await bitmaps(qmp, node) or []:
        if bm.get("name") == name:
            return int(bm["count"])
    raise AssertionError(f"bitmap {name} not on {node}")


async def create_raw_target(qmp: QMPClient, listener: EventListener, node: str, path: str, size: int) -> None:
    """Create a target as iotest 257 does: blockdev-create (file), dismiss, blockdev-add."""
    job = f"create_{node}"
    await qmp.execute("blockdev-create", {"job-id": job, "options": {"driver": "file", "filename": path,
                                                                      "size": size}})
    await wait_job_status(listener, job, "concluded")
    await qmp.execute("job-dismiss", {"id": job})
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": node,
                                       "file": {"driver": "file", "filename": path}})
