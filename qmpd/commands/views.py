"""Views: QAPI-shaped answers built from domain objects.

The domain (block, bitmap, jobs) keeps plain state; the shapes QEMU puts on
the wire (member names, order, optional members) are built here, once, for
the query commands, HMP and the web layer alike.  Each function returns
plain JSON-able dicts in QEMU 7.2's member order::

    block_device_info(node)   # BlockDeviceInfo (query-named-block-nodes)
    block_info(backend)       # BlockInfo (query-block)
    image_info(node)          # ImageInfo
    bitmap_info(bitmap)       # BlockDirtyInfo
    job_info(job)             # JobInfo (query-jobs)
    block_job_info(job)       # BlockJobInfo (query-block-jobs), e.g.
        {"type": "backup", "device": "job0", "len": 67108864, "offset": 1048576,
         "busy": true, "paused": false, "speed": 0, "io-status": "ok",
         "ready": false, "status": "running", "auto-finalize": true,
         "auto-dismiss": true}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qmpd.bitmap import DirtyBitmap
from qmpd.block import BlockGraph, BlockNode
from qmpd.block.drivers.base import FormatDetails
from qmpd.jobs import Job, JobManager, JobStatus
from qmpd.machine import BlockBackend

__all__ = [
    "block_info",
    "bitmap_info",
    "bitmap_infos",
    "block_device_info",
    "block_job_info",
    "image_info",
    "job_info",
    "named_block_nodes",
    "query_block_jobs",
    "query_jobs",
]


# ---------------------------------------------------------------- bitmaps


def bitmap_info(bitmap: DirtyBitmap) -> dict[str, str | int | bool]:
    """:return: the BlockDirtyInfo members, in QAPI order."""
    out: dict[str, str | int | bool] = {}
    if bitmap.name is not None:
        out["name"] = bitmap.name
    out["count"] = bitmap.count
    out["granularity"] = bitmap.granularity
    out["recording"] = bitmap.recording
    out["busy"] = bitmap.busy
    out["persistent"] = bitmap.persistent
    if bitmap.inconsistent:
        out["inconsistent"] = True
    return out


def bitmap_infos(bitmaps: Iterable[DirtyBitmap]) -> list[dict[str, str | int | bool]]:
    """:return: BlockDirtyInfo of every bitmap of a node, anonymous ones included."""
    return [bitmap_info(bm) for bm in bitmaps]


# ---------------------------------------------------------------- block nodes


def image_info(node: BlockNode) -> dict[str, Any]:
    """:return: ImageInfo (``filename``, ``format``, ``actual-size`` when
    known, ``virtual-size``, ``dirty-flag`` when the driver reports one)."""
    driver = node.driver
    info: dict[str, Any] = {"filename": driver.filename, "format": driver.name}
    actual = driver.actual_size()
    if actual is not None:
        info["actual-size"] = actual
    # QEMU counts whole sectors (bdrv_getlength() rounds the size up).
    info["virtual-size"] = -(-driver.length // 512) * 512
    flag = node.dirty_flag()
    if flag is not None:
        info["dirty-flag"] = flag
    details = driver.format_details()
    if details is not None:
        info["cluster-size"] = details.cluster_size
        if details.backing_filename is not None:
            info["backing-filename"] = details.backing_filename
            backing = node.backing
            info["full-backing-filename"] = (backing.driver.filename if backing is not None
                                             else details.backing_filename)
            if details.backing_format is not None:
                info["backing-filename-format"] = details.backing_format
        info["format-specific"] = {"type": details.format,
                                   "data": _format_specific(details)}
    return info


def _format_specific(d: FormatDetails) -> dict[str, Any]:
    """ImageInfoSpecificQCow2 as QEMU 7.2 fills it (v2 images have no
    feature members)."""
    data: dict[str, Any] = {"compat": d.compat}
    if d.compat != "0.10":
        data["lazy-refcounts"] = d.lazy_refcounts
        data["corrupt"] = d.corrupt
    data["refcount-bits"] = d.refcount_bits
    if d.compat != "0.10":
        data["extended-l2"] = d.extended_l2
    data["compression-type"] = d.compression_type
    return data


def block_device_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    """:return: BlockDeviceInfo in QEMU 7.2's shape and member order (no
    ``children``, no ``active``); ``dirty-bitmaps`` only if the node has
    bitmaps.  Unless ``flat``, ``image`` nests the ImageInfo of the
    filtered child of a filter, or of the backing child of a format, as
    ``backing-image`` (recursively, :attr:`BlockNode.filter_or_cow_child`;
    ``backing_file_depth`` counts the levels), as QEMU reports them."""
    image = image_info(node)
    depth = 0
    if not flat:
        level, below = image, node.filter_or_cow_child
        while below is not None:
            depth += 1
            level["backing-image"] = image_info(below)
            level, below = level["backing-image"], below.filter_or_cow_child
    info: dict[str, Any] = {
        "file": node.driver.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver.name,
        "backing_file_depth": depth,
        "encrypted": False,
        "detect_zeroes": node.detect_zeroes,
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "image": image,
        **({"backing_file": node.backing.driver.filename} if node.backing is not None else {}),
        "cache": {
            "writeback": True,
            "direct": node.cache_direct,
            "no-flush": node.cache_no_flush,
        },
        "write_threshold": 0,
    }
    if node.bitmaps:
        info["dirty-bitmaps"] = bitmap_infos(node.bitmaps)
    return info


def named_block_nodes(graph: BlockGraph, flat: bool = False) -> list[dict[str, Any]]:
    """:return: query-named-block-nodes (the graph's listing order)."""
    return [block_device_info(node, flat) for node in graph]


# ---------------------------------------------------------------- jobs


def job_info(job: Job) -> dict[str, Any]:
    """:return: QAPI ``JobInfo``."""
    data: dict[str, Any] = {
        "id": job.id,
        "type": job.job_type.value,
        "status": job.status.value,
        "current-progress": job.progress.current,
        "total-progress": job.progress.total,
    }
    if (text := job.error_text()) is not None:
        data["error"] = text
    return data


def block_job_info(job: Job) -> dict[str, Any]:
    """:return: QAPI ``BlockJobInfo``; ``paused`` means a pause is requested."""
    data: dict[str, Any] = {
        "type": job.job_type.value,
        "device": job.id,
        "len": job.progress.total,
        "offset": job.progress.current,
        "busy": job.busy,
        "paused": job.pause_count > 0,
        "speed": job.speed,
        "io-status": job.iostatus.value,
        "ready": job.status in (JobStatus.READY, JobStatus.STANDBY),
        "status": job.status.value,
        "auto-finalize": job.auto_finalize,
        "auto-dismiss": job.auto_dismiss,
    }
    if (text := job.error_text()) is not None:
        data["error"] = text
    return data


def query_jobs(manager: JobManager) -> list[dict[str, Any]]:
    """:return: ``JobInfo`` of every job, newest first."""
    return [job_info(job) for job in manager.jobs]


def query_block_jobs(manager: JobManager) -> list[dict[str, Any]]:
    """:return: ``BlockJobInfo`` of every block job, newest first."""
    return [block_job_info(job) for job in manager.jobs if job.block_job]


def block_info(backend: BlockBackend) -> dict[str, Any]:
    """:return: query-block's BlockInfo: ``inserted`` is the root's
    BlockDeviceInfo; a backend without a device counts as removable and,
    like QEMU 7.2, has no ``io-status``; ``tray_open`` only if removable."""
    removable = backend.removable or backend.device is None
    out: dict[str, Any] = {"device": backend.name}
    if backend.device is not None:
        out["qdev"] = backend.device.qdev
    out["type"] = "unknown"
    out["removable"] = removable
    out["locked"] = False
    if backend.root is not None:
        inserted = block_device_info(backend.root)
        if not backend.writeback:
            inserted["cache"] = {**inserted["cache"], "writeback": False}
        out["inserted"] = inserted
    if backend.removable:
        out["tray_open"] = False
    if backend.device is not None:
        out["io-status"] = backend.io_status
    return out
