"""Query answers and BLOCK_JOB_* event payloads built from a job's state.

Plain dicts with QAPI member names, in the order of spec 2.4.  Example of a
running full backup (``block_job_info``)::

    {"type": "backup", "device": "job0", "len": 67108864, "offset": 1048576,
     "busy": true, "paused": false, "speed": 0, "io-status": "ok",
     "ready": false, "status": "running", "auto-finalize": true,
     "auto-dismiss": true}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpd.events import names as ev
from qmpd.jobs.status import JobStatus

if TYPE_CHECKING:
    from qmpd.jobs.job import Job

__all__ = ["job_info", "block_job_info", "finished_event", "pending_event"]


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


def finished_event(job: Job) -> tuple[str, dict[str, Any]] | None:
    """:return: BLOCK_JOB_CANCELLED (cancelled) or BLOCK_JOB_COMPLETED (with
    ``error`` on failure), or None for non-block jobs and jobs never started."""
    if not job.block_job or not job.started:
        return None
    data: dict[str, Any] = {
        "type": job.job_type.value,
        "device": job.id,
        "len": job.progress.total,
        "offset": job.progress.current,
        "speed": job.speed,
    }
    if job.is_cancelled:
        return ev.BLOCK_JOB_CANCELLED, data
    if (text := job.error_text()) is not None:
        data["error"] = text
    return ev.BLOCK_JOB_COMPLETED, data


def pending_event(job: Job) -> tuple[str, dict[str, Any]] | None:
    """:return: BLOCK_JOB_PENDING for a block job with auto-finalize off, else None."""
    if not job.block_job or job.auto_finalize:
        return None
    return ev.BLOCK_JOB_PENDING, {"type": job.job_type.value, "id": job.id}
