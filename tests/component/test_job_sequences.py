"""Event sequences (a)-(l) of spec 3.5, asserted exactly."""

from __future__ import annotations

import errno

import pytest

from qmpd.errors import GenericError
from qmpd.events import names as ev
from qmpd.jobs import JobStatus, JobTxn, OnError
from qmpd.commands.views import query_block_jobs, query_jobs
from tests.component.test_job_helpers import MiB, Env, Failure, FakeCreateJob, jsc, settle

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


def done(job_id: str, length: int, offset: int, **extra: object) -> tuple[str, dict[str, object]]:
    return (ev.BLOCK_JOB_COMPLETED,
            {"type": "backup", "device": job_id, "len": length, "offset": offset, "speed": 0, **extra})


def cancelled(job_id: str, length: int, offset: int) -> tuple[str, dict[str, object]]:
    return (ev.BLOCK_JOB_CANCELLED,
            {"type": "backup", "device": job_id, "len": length, "offset": offset, "speed": 0})


async def test_a_start_with_drain_pair() -> None:
    env = Env()
    job = env.manager.create(env.job(gated=True))
    env.manager.start(job, drain=True)
    assert env.events.take() == jsc("job0", "created", "running", "paused", "running")
    assert job.status is JobStatus.RUNNING and not job.paused and job.pause_count == 0
    await env.manager.shutdown()


async def test_a_start_without_drain() -> None:
    env = Env()
    env.manager.start(env.manager.create(env.job(gated=True)))
    assert env.events.take() == jsc("job0", "created", "running")
    await env.manager.shutdown()


async def test_b_success_auto_finalize_auto_dismiss() -> None:
    env = Env()
    job = env.manager.create(env.job())
    env.manager.start(job)
    env.events.take()
    await settle()
    assert env.events.take() == [
        *jsc("job0", "waiting", "pending"),
        done("job0", 4 * MiB, 4 * MiB),
        *jsc("job0", "concluded", "null"),
    ]
    assert job.calls == ["prepare", "commit", "clean"]
    assert env.manager.jobs == [] and query_jobs(env.manager) == []


async def test_c_manual_finalize_runs_before_return() -> None:
    env = Env()
    job = env.manager.create(env.job(auto_finalize=False))
    env.manager.start(job)
    env.events.take()
    await settle()
    assert env.events.take() == [
        *jsc("job0", "waiting", "pending"),
        (ev.BLOCK_JOB_PENDING, {"type": "backup", "id": "job0"}),
    ]
    assert job.status is JobStatus.PENDING and job.calls == []
    await env.manager.finalize(job)
    assert env.events.take() == [done("job0", 4 * MiB, 4 * MiB), *jsc("job0", "concluded", "null")]
    assert job.calls == ["prepare", "commit", "clean"]


@pytest.mark.parametrize("auto_finalize", [True, False])
async def test_d_no_auto_dismiss(auto_finalize: bool) -> None:
    env = Env()
    job = env.manager.create(env.job(auto_finalize=auto_finalize, auto_dismiss=False))
    env.manager.start(job)
    await settle()
    if not auto_finalize:
        await env.manager.finalize(job)
    assert env.events.statuses()[-1] == "concluded"
    assert query_jobs(env.manager) == [{
        "id": "job0", "type": "backup", "status": "concluded",
        "current-progress": 4 * MiB, "total-progress": 4 * MiB,
    }]
    env.events.take()
    env.manager.dismiss(job)
    assert env.events.take() == jsc("job0", "null")
    assert env.manager.jobs == []


async def test_d_failed_job_stays_with_error() -> None:
    env = Env()
    job = env.manager.create(env.job(auto_dismiss=False, failures={1: Failure()}))
    env.manager.start(job)
    await settle()
    assert job.status is JobStatus.CONCLUDED
    [info] = query_block_jobs(env.manager)
    assert info["status"] == "concluded" and info["error"] == "Input/output error"
    assert query_jobs(env.manager)[0]["error"] == "Input/output error"
    env.manager.dismiss(job)
    assert env.manager.jobs == []


async def test_e_cancel_while_running_returns_first() -> None:
    env = Env()
    job = env.manager.create(env.job(gated=True))
    env.manager.start(job)
    job.allow(1)
    await settle()
    env.events.take()
    await env.manager.cancel(job)
    assert env.events.take() == []  # the return comes first
    await settle()
    assert env.events.take() == [
        *jsc("job0", "aborting"),
        cancelled("job0", 4 * MiB, 1 * MiB),
        *jsc("job0", "concluded", "null"),
    ]
    assert job.calls == ["abort", "clean"]
    assert job.ret == -errno.ECANCELED and job.err == "Operation canceled"


async def test_e_cancel_user_paused_job() -> None:
    env = Env()
    job = env.manager.create(env.job(gated=True))
    env.manager.start(job)
    env.manager.pause(job)
    await settle()
    assert env.events.take()[-1:] == jsc("job0", "paused")
    with pytest.raises(GenericError) as info:
        await env.manager.cancel(job, force=False)
    assert info.value.desc == "The block job for device 'job0' is currently paused"
    await env.manager.cancel(job, force=True)
    assert env.events.take() == []
    await settle()
    assert env.events.take() == [
        *jsc("job0", "running", "aborting"),
        cancelled("job0", 4 * MiB, 0),
        *jsc("job0", "concluded", "null"),
    ]


async def test_f_cancel_while_pending_is_a_failure() -> None:
    env = Env()
    job = env.manager.create(env.job(auto_finalize=False))
    env.manager.start(job)
    await settle()
    env.events.take()
    await env.manager.cancel(job, force=True)
    assert env.events.take() == [
        *jsc("job0", "aborting"),
        cancelled("job0", 4 * MiB, 4 * MiB),
        *jsc("job0", "concluded", "null"),
    ]
    assert job.calls == ["abort", "clean"]


@pytest.mark.parametrize("auto_finalize", [True, False])
@pytest.mark.parametrize("is_read", [True, False])
async def test_g_report(auto_finalize: bool, is_read: bool) -> None:
    env = Env()
    job = env.manager.create(env.job(auto_finalize=auto_finalize,
                                     failures={2: Failure(is_read=is_read)}))
    env.manager.start(job)
    env.events.take()
    await settle()
    assert env.events.take() == [
        (ev.BLOCK_JOB_ERROR,
         {"device": "job0", "operation": "read" if is_read else "write", "action": "report"}),
        *jsc("job0", "aborting"),
        done("job0", 4 * MiB, 2 * MiB, error="Input/output error"),
        *jsc("job0", "concluded", "null"),
    ]
    assert job.calls == ["abort", "clean"]


@pytest.mark.parametrize(("err", "iostatus"), [(errno.EIO, "failed"), (errno.ENOSPC, "nospace")])
async def test_h_stop_then_resume(err: int, iostatus: str) -> None:
    env = Env()
    job = env.manager.create(env.job(failures={1: Failure(err=err, policy=OnError.STOP)}))
    env.manager.start(job)
    env.events.take()
    await settle()
    assert env.events.take() == [
        (ev.BLOCK_JOB_ERROR, {"device": "job0", "operation": "read", "action": "stop"}),
        *jsc("job0", "paused"),
    ]
    [info] = query_block_jobs(env.manager)
    assert (info["paused"], info["status"], info["io-status"], info["busy"]) == (
        True, "paused", iostatus, False)
    assert info["offset"] == 1 * MiB
    with pytest.raises(GenericError, match="currently paused"):
        await env.manager.cancel(job, force=False)
    env.manager.resume(job)
    assert job.iostatus.value == "ok"
    await settle()
    assert env.events.take() == [
        *jsc("job0", "running", "waiting", "pending"),
        done("job0", 4 * MiB, 4 * MiB),
        *jsc("job0", "concluded", "null"),
    ]
    assert job.actions == ["stop"]


async def test_i_ignore_retries_at_once() -> None:
    env = Env()
    job = env.manager.create(env.job(failures={0: Failure(policy=OnError.IGNORE, times=3)}))
    env.manager.start(job)
    env.events.take()
    await settle()
    error = (ev.BLOCK_JOB_ERROR, {"device": "job0", "operation": "read", "action": "ignore"})
    assert env.events.take() == [
        error, error, error,
        *jsc("job0", "waiting", "pending"),
        done("job0", 4 * MiB, 4 * MiB),
        *jsc("job0", "concluded", "null"),
    ]


@pytest.mark.parametrize("policy", [OnError.ENOSPC, OnError.AUTO])
@pytest.mark.parametrize(("err", "action"), [(errno.ENOSPC, "stop"), (errno.EIO, "report")])
async def test_i_enospc_and_auto(policy: OnError, err: int, action: str) -> None:
    env = Env()
    job = env.manager.create(env.job(failures={0: Failure(err=err, is_read=False, policy=policy)}))
    env.manager.start(job)
    await settle()
    assert (ev.BLOCK_JOB_ERROR, {"device": "job0", "operation": "write", "action": action}) in env.events.events
    if action == "stop":
        assert job.status is JobStatus.PAUSED and job.iostatus.value == "nospace"
        env.manager.resume(job)
        await settle()
    assert env.events.statuses()[-1] == "null"
    assert job.err == (None if action == "stop" else "Input/output error")


async def test_j_negative_speed_at_creation() -> None:
    env = Env()
    with pytest.raises(GenericError) as info:
        env.manager.create(env.job(speed=-1))
    assert info.value.desc == "Parameter 'speed' expects a non-negative value"
    assert env.events.take() == jsc("job0", "created", "null")
    assert env.manager.jobs == []


async def test_k_rollback_of_created_job() -> None:
    env = Env()
    job = env.manager.create(env.job())
    await env.manager.abort_created(job)
    assert env.events.take() == jsc("job0", "created", "aborting", "concluded", "null")
    assert job.calls == ["abort", "clean"]
    await env.manager.abort_created(job)  # idempotent
    assert env.events.take() == [] and env.manager.jobs == []


async def test_k_rollback_of_grouped_created_jobs() -> None:
    env = Env()
    txn = JobTxn()
    a = env.manager.create(env.job("a", auto_dismiss=False), txn)
    b = env.manager.create(env.job("b"), txn)
    env.events.take()
    await env.manager.abort_created(b)
    await env.manager.abort_created(a)
    assert env.events.take() == [
        *jsc("b", "aborting", "concluded", "null"),
        *jsc("a", "aborting", "concluded", "null"),
    ]
    assert env.manager.jobs == []


async def test_l_grouped_failure() -> None:
    env = Env()
    txn = JobTxn()
    a = env.manager.create(env.job("a", gated=True, failures={1: Failure()}), txn)
    b = env.manager.create(env.job("b", gated=True), txn)
    env.manager.start(b)
    env.manager.start(a)
    b.allow(3)
    await settle()
    env.events.take()
    a.allow(2)
    await settle()
    assert env.events.take() == [
        (ev.BLOCK_JOB_ERROR, {"device": "a", "operation": "read", "action": "report"}),
        *jsc("a", "aborting"),
        *jsc("b", "aborting"),
        cancelled("b", 4 * MiB, 3 * MiB),
        *jsc("b", "concluded", "null"),
        done("a", 4 * MiB, 1 * MiB, error="Input/output error"),
        *jsc("a", "concluded", "null"),
    ]
    assert a.calls == b.calls == ["abort", "clean"]


async def test_non_block_job_emits_only_status_changes() -> None:
    env = Env()
    job = env.manager.create(env.job("c", cls=FakeCreateJob, auto_dismiss=False, gated=True))
    env.manager.start(job)
    await env.manager.cancel(job, force=True)
    await settle()
    assert env.events.take() == jsc("c", "created", "running", "aborting", "concluded")
    assert query_block_jobs(env.manager) == []
    assert query_jobs(env.manager)[0]["error"] == "Operation canceled"
    env.manager.dismiss(job)
    assert env.events.take() == jsc("c", "null")
