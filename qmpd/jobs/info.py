"""BLOCK_JOB_* event payloads built from a job's state (plain dicts with QAPI
member names, as events carry them; the query answers are views in
:mod:`qmpd.commands.views`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpd.events import names as ev

if TYPE_CHECKING:
    from qmpd.jobs.job import Job

__all__ = ["finished_event", "pending_event"]


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
