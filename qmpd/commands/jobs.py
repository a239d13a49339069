"""Job queries and verbs: the ``job-*`` and ``block-job-*`` families.

The two families differ in lookup errors only: ``block-job-*`` answers
DeviceNotActive "Block job '%s' not found", ``job-*`` GenericError "Job not
found" (spec §2.5).  ``job-cancel`` always forces.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from qmpd.commands import views
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.jobs import JobManager

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import (
        BlockJobCancelArgs,
        BlockJobCompleteArgs,
        BlockJobDismissArgs,
        BlockJobFinalizeArgs,
        BlockJobPauseArgs,
        BlockJobResumeArgs,
        BlockJobSetSpeedArgs,
        JobCancelArgs,
        JobCompleteArgs,
        JobDismissArgs,
        JobFinalizeArgs,
        JobPauseArgs,
        JobResumeArgs,
        QueryBlockJobsArgs,
        QueryJobsArgs,
    )

__all__ = ["jobs_of"]


def jobs_of(ctx: CommandContext) -> JobManager:
    """:return: the daemon's job manager."""
    jobs = ctx.state.jobs
    assert jobs is not None
    return jobs


@command("query-jobs")
async def query_jobs(ctx: CommandContext, args: QueryJobsArgs) -> list[dict[str, Any]]:
    return views.query_jobs(jobs_of(ctx))


@command("query-block-jobs")
async def query_block_jobs(ctx: CommandContext, args: QueryBlockJobsArgs) -> list[dict[str, Any]]:
    return views.query_block_jobs(jobs_of(ctx))


@command("job-pause")
async def job_pause(ctx: CommandContext, args: JobPauseArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.pause(mgr.find_job(args.id))


@command("job-resume")
async def job_resume(ctx: CommandContext, args: JobResumeArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.resume(mgr.find_job(args.id))


@command("job-cancel")
async def job_cancel(ctx: CommandContext, args: JobCancelArgs) -> None:
    mgr = jobs_of(ctx)
    await mgr.cancel(mgr.find_job(args.id), force=True)


@command("job-complete")
async def job_complete(ctx: CommandContext, args: JobCompleteArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.complete(mgr.find_job(args.id))


@command("job-finalize")
async def job_finalize(ctx: CommandContext, args: JobFinalizeArgs) -> None:
    mgr = jobs_of(ctx)
    await mgr.finalize(mgr.find_job(args.id))


@command("job-dismiss")
async def job_dismiss(ctx: CommandContext, args: JobDismissArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.dismiss(mgr.find_job(args.id))


@command("block-job-set-speed")
async def block_job_set_speed(ctx: CommandContext, args: BlockJobSetSpeedArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.set_speed(mgr.find_block_job(args.device), args.speed)


@command("block-job-cancel")
async def block_job_cancel(ctx: CommandContext, args: BlockJobCancelArgs) -> None:
    mgr = jobs_of(ctx)
    await mgr.cancel(mgr.find_block_job(args.device), force=bool(args.force))


@command("block-job-pause")
async def block_job_pause(ctx: CommandContext, args: BlockJobPauseArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.pause(mgr.find_block_job(args.device))


@command("block-job-resume")
async def block_job_resume(ctx: CommandContext, args: BlockJobResumeArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.resume(mgr.find_block_job(args.device))


@command("block-job-complete")
async def block_job_complete(ctx: CommandContext, args: BlockJobCompleteArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.complete(mgr.find_block_job(args.device))


@command("block-job-finalize")
async def block_job_finalize(ctx: CommandContext, args: BlockJobFinalizeArgs) -> None:
    mgr = jobs_of(ctx)
    await mgr.finalize(mgr.find_block_job(args.id))


@command("block-job-dismiss")
async def block_job_dismiss(ctx: CommandContext, args: BlockJobDismissArgs) -> None:
    mgr = jobs_of(ctx)
    mgr.dismiss(mgr.find_block_job(args.id))
