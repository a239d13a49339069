"""Creating a backup job: spec 4.1 steps 4 to 12, in QEMU's order.

:func:`check_bitmap_sync` is ``do_backup_common``'s bitmap/sync checks
(step 4); :func:`create_backup` is ``backup_job_create`` (step 5): every
check and text in order, then freeze the sync bitmap, insert the
copy-before-write filter and register the job (status ``created``, not
started).  When a step fails nothing is left changed: the successor is
reclaimed and the filter removed (a negative speed also shows ``created``
then ``null``, spec 3.5 j).

The caller (the command layer) looks up source and target (step 3) and
translates QMP arguments into a :class:`BackupOptions`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qmpd.bitmap import DirtyBitmap
from qmpd.block import BlockGraph, BlockNode, locking
from qmpd.block.locking import PermLocks
from qmpd.block.copy import DEFAULT_CLUSTER, BlockCopy
from qmpd.block.drivers.cbw import CopyBeforeWrite, insert_filter, remove_filter
from qmpd.errors import GenericError
from qmpd.jobs.backup import BackupJob
from qmpd.jobs.manager import JobManager, JobTxn
from qmpd.jobs.status import OnError

__all__ = ["BackupOptions", "check_bitmap_sync", "create_backup"]

_INT_MAX = 2**31 - 1


@dataclass
class BackupOptions:
    """BackupCommon with QEMU's defaults applied (plain values, no QMP types)."""

    #: None when omitted: then the source's device name ("" for nodes).
    job_id: str | None
    #: ``full``, ``top``, ``none``, ``incremental`` or ``bitmap``.
    sync: str
    speed: int = 0
    bitmap: str | None = None
    bitmap_mode: str | None = None
    compress: bool = False
    on_source_error: OnError = OnError.REPORT
    on_target_error: OnError = OnError.REPORT
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    max_workers: int = 64
    max_chunk: int = 0
    min_cluster_size: int = 0


def check_bitmap_sync(source: BlockNode, opts: BackupOptions) -> DirtyBitmap | None:
    """Step 4: bitmap/sync consistency.  Desugars ``incremental`` in ``opts``
    into ``bitmap`` + ``on-success``.

    :return: the sync bitmap, or None.
    :raise GenericError: the first failed check's text.
    """
    if opts.sync in ("bitmap", "incremental") and opts.bitmap is None:
        raise GenericError(f"must provide a valid bitmap name for '{opts.sync}' sync mode")
    if opts.sync == "incremental":
        if opts.bitmap_mode is not None and opts.bitmap_mode != "on-success":
            raise GenericError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        opts.sync, opts.bitmap_mode = "bitmap", "on-success"
    bitmap: DirtyBitmap | None = None
    if opts.bitmap is not None:
        bitmap = source.bitmaps.find(opts.bitmap)
        if bitmap is None:
            raise GenericError(f"Bitmap '{opts.bitmap}' could not be found")
        if opts.bitmap_mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check(readonly=False)
        if opts.sync == "none":
            raise GenericError("sync mode 'none' does not produce meaningful bitmap outputs")
        if opts.bitmap_mode == "never" and opts.sync != "bitmap":
            raise GenericError(
                "Bitmap sync mode 'never' has no meaningful effect when combined "
                f"with sync mode '{opts.sync}'"
            )
    elif opts.bitmap_mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    return bitmap


async def create_backup(
    graph: BlockGraph,
    jobs: JobManager,
    source: BlockNode,
    target: BlockNode,
    opts: BackupOptions,
    txn: JobTxn | None = None,
) -> BackupJob:
    """Steps 4 and 5 of spec 4.1; on success the job is ``created``.

    :raise GenericError: (or a subclass) with QEMU's text; nothing changed.
    """
    bitmap = check_bitmap_sync(source, opts)
    if source is target:
        raise GenericError("Source and target cannot be the same")
    if opts.compress and getattr(target.driver, "pwrite_compressed", None) is None:
        raise GenericError(f"Compression is not supported for this drive {target.backend or ''}")
    source.check_not_busy()
    target.check_not_busy()
    if not 1 <= opts.max_workers <= _INT_MAX:
        raise GenericError(f"max-workers must be between 1 and {_INT_MAX}")
    if opts.max_chunk < 0:
        raise GenericError("max-chunk must be zero (which means no limit) or positive")
    if bitmap is not None and opts.bitmap_mode != "never":
        bitmap.check()

    job = BackupJob(
        opts.job_id if opts.job_id is not None else (source.backend or ""),
        graph=graph,
        source=source,
        target=target,
        sync="full" if opts.sync == "top" else opts.sync,
        bitmap=bitmap,
        bitmap_mode=opts.bitmap_mode,
        max_workers=opts.max_workers,
        on_source_error=opts.on_source_error,
        on_target_error=opts.on_target_error,
        auto_finalize=opts.auto_finalize,
        auto_dismiss=opts.auto_dismiss,
        speed=opts.speed,
    )
    if bitmap is not None:
        bitmap.create_successor()
    try:
        if source.length != target.length:
            raise GenericError("Source and target image have different sizes")
        _insert_filter(graph, job, opts, bitmap)
        assert job.copy is not None
        if opts.max_chunk and opts.max_chunk < job.copy.cluster_size:
            raise GenericError(
                f"Required max-chunk ({opts.max_chunk}) is less than backup cluster size "
                f"({job.copy.cluster_size})"
            )
        if opts.sync == "top":  # also without a backing child: QEMU skips
            await _skip_unallocated(job)  # what the layer does not hold
        release = _claim_perms(source, target)
        try:
            jobs.create(job, txn)
        except BaseException:
            release()
            raise
        job.cleanups.append(release)
    except BaseException:
        _undo(graph, job, bitmap)
        raise
    assert job.filter is not None
    job.block(target, job.filter)
    return job


def _insert_filter(
    graph: BlockGraph, job: BackupJob, opts: BackupOptions, bitmap: DirtyBitmap | None
) -> None:
    """Step 9: the copy bitmap (on the source, as QEMU <= 9.0) and the filter."""
    mcs = opts.min_cluster_size
    if mcs and mcs & (mcs - 1):
        raise GenericError("min-cluster-size needs to be a power of 2")
    if opts.filter_node_name is not None:
        try:
            graph.check_node_name(opts.filter_node_name)
        except GenericError as err:  # QEMU 7.2 prefixes the filter's open error
            raise GenericError(f"Could not create node: {err.desc}") from err
    _check_target_writable(graph, job.target, opts.filter_node_name)
    source = job.source
    cluster = max(DEFAULT_CLUSTER, mcs)
    copy_bitmap = source.bitmaps.create_anonymous(cluster, disabled=True)
    if job.sync == "bitmap":
        assert bitmap is not None
        copy_bitmap.hbitmap.merge_from(bitmap.hbitmap)
    else:
        copy_bitmap.hbitmap.fill()
    copy = BlockCopy(
        source, job.target, copy_bitmap, cluster_size=cluster, max_chunk=opts.max_chunk,
        compress=opts.compress, progress=job.progress,
    )
    job.progress.set_remaining(copy.dirty_bytes)
    driver = CopyBeforeWrite(source, copy)
    try:
        job.filter = insert_filter(graph, source, driver, opts.filter_node_name)
    except BaseException:
        source.bitmaps.remove(copy_bitmap)
        raise
    job.copy = copy


async def _skip_unallocated(job: BackupJob) -> None:
    """``sync: top``: copy only what the source's own layer holds (QEMU's
    block_copy_reset_unallocated over the whole disk)."""
    assert job.copy is not None
    source, bits = job.source, job.copy.copy_bitmap.hbitmap
    pos, size = 0, source.length
    cluster = job.copy.cluster_size
    while pos < size:
        allocated, n = await source.is_allocated(pos, size - pos)
        if not allocated:
            start = -(-pos // cluster) * cluster
            end = size if pos + n >= size else (pos + n) // cluster * cluster
            if end > start:
                bits.reset(start, end - start)
        pos += n
    job.progress.set_remaining(job.copy.dirty_bytes)


def _check_target_writable(graph: BlockGraph, target: BlockNode, filter_name: str | None) -> None:
    """QEMU's permission check when the new filter attaches its ``target``
    child: another backup's filter unshares ``write`` on its source."""
    for node in graph:
        if (isinstance(node.driver, CopyBeforeWrite) and not node.owned_by_monitor
                and node.driver.source is target):
            name = filter_name if filter_name is not None else graph.generate_name()
            raise GenericError(
                f"Could not create node: Permission conflict on node '{target.node_name}': permissions "
                f"'write' are both required by node '{name}' (uses node '{target.node_name}' as "
                f"'target' child) and unshared by node '{node.node_name}' (uses node '{target.node_name}' "
                "as 'file' child).")


def file_locks(node: BlockNode) -> list[PermLocks]:
    """The lock holders of the files at the bottom of ``node``'s subtree."""
    found: list[PermLocks] = []
    stack = [node]
    seen: set[int] = set()
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        locks = getattr(cur.driver, "perm_locks", None)
        if isinstance(locks, PermLocks):
            found.append(locks)
        stack.extend(cur.children.values())
    return found


def _claim_perms(source: BlockNode, target: BlockNode) -> Callable[[], None]:
    """QEMU's permissions of a backup: ``write`` on the target, then
    ``consistent read`` on the source unsharing ``write`` and ``resize``
    (so a backup onto its own source, or onto an image another process
    writes, fails as in QEMU).

    :return: the function that releases the claims (at clean-up).
    :raise GenericError: QEMU's lock texts; nothing is left claimed.
    """
    claims: list[tuple[PermLocks, tuple[int, int]]] = []
    wanted = [(locks, locking.WRITE, locking.ALL) for locks in file_locks(target)]
    wanted += [(locks, locking.CONSISTENT_READ, locking.ALL & ~(locking.WRITE | locking.RESIZE))
               for locks in file_locks(source)]
    try:
        for locks, perm, shared in wanted:
            claims.append((locks, locks.claim(perm, shared)))
    except (locking.LockConflict, OSError) as exc:
        for locks, token in claims:
            locks.release(token)
        raise GenericError(str(exc) if isinstance(exc, locking.LockConflict)
                           else f"Failed to lock image: {exc.strerror}") from None

    def release() -> None:
        for locks, token in claims:
            locks.release(token)
        claims.clear()

    return release


def _undo(graph: BlockGraph, job: BackupJob, bitmap: DirtyBitmap | None) -> None:
    if job.filter is not None:
        remove_filter(graph, job.filter)
        job.filter = None
    job.copy = None
    if bitmap is not None and bitmap.successor is not None:
        bitmap.reclaim()
    job.sync_bitmap = None
