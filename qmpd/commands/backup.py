"""``blockdev-backup``, ``drive-backup`` and ``blockdev-create`` (spec 4.1, 4.8, 2.7).

Both backup commands are literally one-action transactions; their
``transaction`` actions prepare in QEMU's order (lookups, then
:func:`~qmpd.jobs.backup_setup.create_backup`'s checks), leaving nothing
changed on failure.  Prepare creates the job (``created``); commit starts it
with the transient ``paused``/``running`` pair of spec 3.5 (a); abort rolls
the created job back (``aborting``, ``concluded``, ``null``) and with it the
frozen bitmap and the filter.  With ``completion-mode: grouped`` every
backup of the transaction joins the transaction's :class:`JobTxn`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from qmpd.block import BlockGraph, BlockNode
from qmpd.block.detached import close_detached, open_detached
from qmpd.block.errors import BlockIOError
from qmpd.block.io import create_file
from qmpd.commands.actions import BaseAction, TxnContext, action, run_actions
from qmpd.commands.block import graph_of
from qmpd.commands.context import CommandContext
from qmpd.commands.jobs import jobs_of
from qmpd.commands.registry import command
from qmpd.errors import GenericError
from qmpd.jobs import OnError
from qmpd.jobs.backup import BackupJob
from qmpd.jobs.backup_setup import BackupOptions, create_backup, file_locks
from qmpd.jobs.create import CreateFileJob
from qmpd.jobs.create_qcow2 import CreateQcow2Job, check_qcow2_options, create_qcow2_file, probe_format
from qmpd.qapi import models

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate); run-time checks go through
    # ``models.X``, which creates the class on first use.
    from qmpd.qapi.models import (
        BackupCommon,
        BlockdevBackup,
        BlockdevBackupArgs,
        BlockdevCreateArgs,
        BlockdevCreateOptionsQcow2Branch,
        DriveBackup,
        DriveBackupArgs,
    )

__all__ = ["BlockdevBackupAction", "DriveBackupAction", "backup_options"]

logger = logging.getLogger(__name__)


def backup_options(d: BackupCommon) -> BackupOptions:
    """:return: BackupCommon members of a ``BlockdevBackup``/``DriveBackup``
    model, with QEMU's defaults."""
    perf = d.x_perf
    return BackupOptions(
        job_id=d.job_id,
        sync=str(d.sync),
        speed=d.speed if d.speed is not None else 0,
        bitmap=d.bitmap,
        bitmap_mode=None if d.bitmap_mode is None else str(d.bitmap_mode),
        compress=bool(d.compress),
        on_source_error=OnError(str(d.on_source_error or "report")),
        on_target_error=OnError(str(d.on_target_error or "report")),
        auto_finalize=d.auto_finalize is not False,
        auto_dismiss=d.auto_dismiss is not False,
        filter_node_name=d.filter_node_name,
        max_workers=64 if perf is None or perf.max_workers is None else perf.max_workers,
        max_chunk=0 if perf is None or perf.max_chunk is None else perf.max_chunk,
        min_cluster_size=0 if perf is None or perf.min_cluster_size is None else perf.min_cluster_size,
    )


class BlockdevBackupAction(BaseAction):
    """The ``blockdev-backup`` transaction action."""

    def __init__(self, ctx: CommandContext, data: BlockdevBackup | DriveBackup, txn: TxnContext) -> None:
        self.ctx, self.data, self.txn = ctx, data, txn
        self.job: BackupJob | None = None

    async def _target(self, graph: BlockGraph, source: BlockNode, opts: BackupOptions) -> BlockNode:
        return graph.lookup(self.data.target)

    async def prepare(self) -> None:
        graph = graph_of(self.ctx)
        opts = backup_options(self.data)
        source = graph.lookup(self.data.device)
        target = await self._target(graph, source, opts)
        try:
            self.job = await create_backup(graph, jobs_of(self.ctx), source, target, opts,
                                           self.txn.job_txn)
        except BaseException:
            self._drop_target(graph, target)
            raise
        self._own_target(graph, self.job, target)

    def _drop_target(self, graph: BlockGraph, target: BlockNode) -> None:
        """A failed prepare: release a target this action opened."""

    def _own_target(self, graph: BlockGraph, job: BackupJob, target: BlockNode) -> None:
        """The job was created: hand it a target this action opened."""

    def commit(self) -> None:
        if self.job is not None:
            jobs_of(self.ctx).start(self.job, drain=True)

    async def abort(self) -> None:
        if self.job is not None:
            await jobs_of(self.ctx).abort_created(self.job)


def _refuse_own_source(source: BlockNode, path: str) -> None:
    """Creating (truncating) the target must not destroy the source itself.

    QEMU 7.2 formats the file first and only then fails to take the lock
    (the source's data is gone); qmpd refuses before touching it, with the
    error QEMU ends up giving.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    for locks in file_locks(source):
        if locks.fd >= 0:
            own = os.fstat(locks.fd)
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
                raise GenericError('Failed to get shared "write" lock')


class DriveBackupAction(BlockdevBackupAction):
    """The ``drive-backup`` transaction action: opens (and with
    ``mode: absolute-paths`` creates or truncates) a raw target file that
    the job closes when it ends (spec 4.8)."""

    async def _target(self, graph: BlockGraph, source: BlockNode, opts: BackupOptions) -> BlockNode:
        d = self.data
        assert isinstance(d, models.DriveBackup)
        mode = str(d.mode or "absolute-paths")
        existing = mode == "existing"
        fmt = d.format if d.format is not None else (None if existing else _format_of(source))
        source.check_not_busy()
        if fmt is None and existing:
            fmt = await probe_format(d.target)
        if fmt == "qcow2":
            return await self._qcow2_target(graph, source, opts, existing)
        if opts.sync == "top":
            opts.sync = "full"  # a raw source has no backing node
        if opts.sync == "none" and not existing:
            raise GenericError(f"Backing file not supported for file format '{fmt}'")
        if fmt not in (None, "raw", "file"):
            raise GenericError(f"Unknown file format '{fmt}'")
        if not existing:
            _refuse_own_source(source, d.target)
            try:
                await create_file(d.target, source.length, pool=graph.pool)
            except BlockIOError as exc:
                raise GenericError(f"Could not create '{d.target}': {exc.strerror}") from exc
            logger.info("Formatting '%s', fmt=%s size=%d", d.target, fmt, source.length)
        file_opts = {"driver": "file", "filename": d.target}
        options: dict[str, Any] = {"discard": "unmap", "detect-zeroes": "unmap"}
        if fmt == "file":
            options.update(file_opts)
        else:
            options.update({"driver": "raw", "file": file_opts})
        target = await open_detached(graph, options)
        if opts.sync == "none":
            close_detached(graph, target)
            raise GenericError(
                f"Driver '{target.drv}' of node '{target.node_name}' does not support backing files"
            )
        return target

    async def _qcow2_target(self, graph: BlockGraph, source: BlockNode, opts: BackupOptions,
                            existing: bool) -> BlockNode:
        """A qcow2 target: for ``sync: top`` its backing file is the source's
        backing file, for ``sync: none`` the source itself (as QEMU's
        drive-backup sets them); created first unless ``mode: existing``."""
        d = self.data
        assert isinstance(d, models.DriveBackup)
        backing: BlockNode | None = None
        if opts.sync == "top":
            backing = source.backing
            if backing is None:
                opts.sync = "full"
        elif opts.sync == "none":
            backing = source
        if not existing:
            bfile = None if backing is None else backing.driver.filename
            bfmt = None if backing is None else backing.drv
            try:
                await create_qcow2_file(d.target, source.length, backing_file=bfile,
                                        backing_format=bfmt)
            except BlockIOError as exc:
                raise GenericError(f"Could not create '{d.target}': {exc.strerror}") from exc
            logger.info("Formatting '%s', fmt=qcow2 cluster_size=65536 extended_l2=off "
                        "compression_type=zlib size=%d%s lazy_refcounts=off refcount_bits=16",
                        d.target, source.length,
                        "" if bfile is None else f" backing_file={bfile} backing_fmt={bfmt}")
        options: dict[str, Any] = {"discard": "unmap", "detect-zeroes": "unmap",
                                   "driver": "qcow2",
                                   "file": {"driver": "file", "filename": d.target}}
        if backing is not None:  # QEMU: BDRV_O_NO_BACKING, then set_backing_hd
            options["backing"] = backing.node_name  # the open node, not its file again
        return await open_detached(graph, options)

    def _drop_target(self, graph: BlockGraph, target: BlockNode) -> None:
        close_detached(graph, target)

    def _own_target(self, graph: BlockGraph, job: BackupJob, target: BlockNode) -> None:
        job.flush_target = True
        job.cleanups.append(lambda: close_detached(graph, target))


def _format_of(node: BlockNode) -> str:
    """The format drive-backup defaults to: the source's driver name."""
    return node.drv


action("blockdev-backup")(BlockdevBackupAction)
action("drive-backup")(DriveBackupAction)


@command("blockdev-backup")
async def blockdev_backup(ctx: CommandContext, args: BlockdevBackupArgs) -> None:
    """Start a backup to an existing node (a one-action transaction)."""
    await run_actions([BlockdevBackupAction(ctx, args, TxnContext())])


@command("drive-backup")
async def drive_backup(ctx: CommandContext, args: DriveBackupArgs) -> None:
    """Start a backup to a file (a one-action transaction; deprecated in QEMU)."""
    await run_actions([DriveBackupAction(ctx, args, TxnContext())])


@command("blockdev-create")
async def blockdev_create(ctx: CommandContext, args: BlockdevCreateArgs) -> None:
    """Start a ``create`` job making a host file of ``size`` bytes.

    :raise GenericError: "Driver does not support blockdev-create" (every
        driver but ``file``, as QEMU 7.2 answers for raw, null-co, blkdebug).
    """
    opts = args.options
    if isinstance(opts, models.BlockdevCreateOptionsQcow2Branch):
        await _create_qcow2(ctx, args.job_id, opts)
        return
    if not isinstance(opts, models.BlockdevCreateOptionsFileBranch):
        raise GenericError("Driver does not support blockdev-create")
    prealloc = "off" if opts.preallocation is None else str(opts.preallocation)
    mgr = jobs_of(ctx)
    job = mgr.create(CreateFileJob(args.job_id, opts.filename, opts.size, prealloc,
                                   pool=graph_of(ctx).pool))
    mgr.start(job)


async def _create_qcow2(ctx: CommandContext, job_id: str,
                        opts: BlockdevCreateOptionsQcow2Branch) -> None:
    """``blockdev-create`` driver ``qcow2`` on the node named by ``file``."""
    if not isinstance(opts.file, str):
        raise GenericError("Driver does not support blockdev-create")
    file = graph_of(ctx).lookup(opts.file)
    spec = check_qcow2_options(
        opts.size, None if opts.version is None else str(opts.version), opts.cluster_size,
        opts.refcount_bits, opts.lazy_refcounts, opts.backing_file,
        None if opts.backing_fmt is None else str(opts.backing_fmt),
        None if opts.preallocation is None else str(opts.preallocation))
    mgr = jobs_of(ctx)
    job = mgr.create(CreateQcow2Job(job_id, file, spec))
    mgr.start(job)
