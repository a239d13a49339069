"""A small world for backup tests: a block graph, a job manager with a
recording event sink, and the command handlers called directly (no
sockets).  Images are real sparse files under ``tmp_path``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from qmpd.block import BlockGraph, BlockNode
from qmpd.commands.backup import blockdev_backup, drive_backup
from qmpd.commands.context import CommandContext, DaemonConfig, DaemonState
from qmpd.events import EventBus
from qmpd.events import names as ev
from qmpd.jobs import Clock, JobManager
from qmpd.qapi.models import BlockdevBackupArgs, DriveBackupArgs
from qmpd.commands.views import bitmap_info, query_jobs
from tests.component.test_job_helpers import Recorder

CLUSTER = 64 * 1024
MiB = 1 << 20


class BackupEnv:
    """Graph + jobs + events; helpers to make images and run backups."""

    def __init__(self, tmp: Path, clock: Clock | None = None) -> None:
        self.tmp = tmp
        self.events = Recorder()
        self.graph = BlockGraph()
        self.jobs = JobManager(self.events, clock)
        state = DaemonState(config=DaemonConfig(), events=EventBus(), block=self.graph, jobs=self.jobs)
        self.ctx = CommandContext(state, None)  # type: ignore[arg-type]

    # ------------------------------------------------------------ images

    def make_file(self, name: str, size: int, data: dict[int, bytes] | None = None) -> Path:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
            for off, buf in (data or {}).items():
                f.seek(off)
                f.write(buf)
        return path

    async def node(self, name: str, size: int, data: dict[int, bytes] | None = None,
                   blkdebug: dict[str, Any] | None = None, **opts: Any) -> BlockNode:
        path = self.make_file(f"{name}.img", size, data)
        file: dict[str, Any] = {"driver": "file", "filename": str(path)}
        if blkdebug is not None:
            file = {"driver": "blkdebug", "image": file, **blkdebug}
        return await self.graph.add({"driver": "raw", "node-name": name, "file": file, **opts})

    # ------------------------------------------------------------ commands

    async def backup(self, **args: Any) -> None:
        await blockdev_backup(self.ctx, BlockdevBackupArgs.model_validate(_dashed(args)))

    async def drive_backup(self, **args: Any) -> None:
        await drive_backup(self.ctx, DriveBackupArgs.model_validate(_dashed(args)))

    # ------------------------------------------------------------ observing

    def named(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        return [(n, d) for n, d in self.events.events if n == name]

    def finished(self, job_id: str) -> tuple[str, dict[str, Any]] | None:
        for n, d in self.events.events:
            if n in (ev.BLOCK_JOB_COMPLETED, ev.BLOCK_JOB_CANCELLED) and d["device"] == job_id:
                return n, d
        return None

    async def wait_status(self, job_id: str, status: str, timeout: float = 10.0) -> None:
        """Wait for the JOB_STATUS_CHANGE of ``job_id`` to ``status``."""
        await asyncio.wait_for(self.events.wait(lambda: status in self.events.statuses(job_id)), timeout)

    def state(self) -> Any:
        """Everything a failed command must leave unchanged."""
        nodes = []
        for node in self.graph:
            bms = [(bitmap_info(bm), bm.hbitmap.to_bytes_le()) for bm in node.bitmaps]
            nodes.append((node.node_name, node.drv, [p.node_name for p in node.parents],
                          list(node.blockers), bms, node.has_hooks))
        return nodes, query_jobs(self.jobs), len(self.events.events)


def _dashed(args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in args.items():
        out[k.replace("_", "-")] = _dashed(v) if isinstance(v, dict) else v
    return out


def read(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pattern(byte: int, n: int = CLUSTER) -> bytes:
    return bytes([byte]) * n


def rand(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def file_of(node: BlockNode) -> str:
    return node.driver.filename


__all__ = ["BackupEnv", "CLUSTER", "MiB", "read", "pattern", "rand", "file_of", "os"]
