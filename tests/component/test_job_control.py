"""Verbs, pause points, the speed limiter on a fake clock, queries and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from qmpd.errors import DeviceNotActive, GenericError
from qmpd.events import names as ev
from qmpd.jobs import IllegalTransition, JobStatus, JobVerbError, LoopClock, OnError
from qmpd.commands.views import query_block_jobs, query_jobs
from tests.component.test_job_helpers import MiB, Env, Failure, FakeCreateJob, FakeJob, jsc, settle

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]

SLICE = 100_000_000


async def throttled(speed: int, chunks: int = 4) -> tuple[Env, FakeJob]:
    env = Env()
    job = env.manager.create(env.job(chunks=chunks, speed=speed))
    env.manager.start(job)
    await settle()
    return env, job


async def test_limiter_paces_chunks_on_the_fake_clock() -> None:
    env, job = await throttled(speed=10 * MiB)  # quota 1 MiB per 100 ms slice
    assert job.copy_times == [0]
    for step in range(1, 4):
        assert env.clock.next_deadline() == step * SLICE
        assert not job.busy and job.status is JobStatus.RUNNING
        env.clock.advance(SLICE - 1)
        await settle()
        assert len(job.copy_times) == step
        env.clock.advance(1)
        await settle()
    assert job.copy_times == [0, SLICE, 2 * SLICE, 3 * SLICE]
    assert env.events.statuses()[-1] == "null"


async def test_speed_one_copies_exactly_one_chunk_first() -> None:
    env, job = await throttled(speed=1)
    assert job.progress.current == MiB
    assert env.clock.next_deadline() == MiB * SLICE
    assert query_block_jobs(env.manager)[0]["speed"] == 1
    await env.manager.shutdown()


async def test_non_integral_quota_delay() -> None:
    env, job = await throttled(speed=MiB)  # quota 104857 bytes
    assert env.clock.next_deadline() == int(MiB / 104857 * SLICE)
    await env.manager.shutdown()


async def test_set_speed_wakes_a_sleeping_job_and_applies_at_once() -> None:
    env, job = await throttled(speed=10 * MiB)
    env.clock.advance(10)
    env.manager.set_speed(job, 20 * MiB)  # 1 MiB charged < 2 MiB quota: go now
    await settle()
    assert job.copy_times == [0, 10]
    assert env.clock.next_deadline() == SLICE  # 2 MiB / 2 MiB quota = 1 slice
    env.manager.set_speed(job, 1)  # slower: sleep is recomputed, much longer
    await settle()
    assert len(job.copy_times) == 2
    assert env.clock.next_deadline() == 2 * MiB * SLICE
    env.manager.set_speed(job, 0)  # unlimited: the rest goes at once
    await settle()
    assert job.copy_times == [0, 10, 10, 10]
    assert env.clock.next_deadline() is None
    assert env.events.statuses()[-1] == "null"


async def test_pause_and_resume_a_throttled_job() -> None:
    env, job = await throttled(speed=10 * MiB)
    env.events.take()
    env.manager.pause(job)
    assert query_block_jobs(env.manager)[0]["paused"] is True  # before it parks
    await settle()
    assert env.events.take() == jsc("job0", "paused")
    assert env.clock.next_deadline() is None  # the sleep was cut short
    info = query_block_jobs(env.manager)[0]
    assert (info["status"], info["paused"], info["busy"], info["io-status"]) == (
        "paused", True, False, "ok")
    with pytest.raises(GenericError) as exc:
        env.manager.pause(job)
    assert exc.value.desc == "Job is already paused"
    env.clock.advance(5 * SLICE)  # time passes while paused; nothing moves
    await settle()
    assert len(job.copy_times) == 1
    env.manager.resume(job)
    await settle()
    assert env.events.take()[:1] == jsc("job0", "running")
    assert job.copy_times == [0, 5 * SLICE]  # old slice is over: goes at once
    with pytest.raises(GenericError) as exc:
        env.manager.resume(job)
    assert exc.value.desc == "Can't resume a job that was not paused"
    await env.manager.shutdown()


async def test_pause_while_created_parks_after_start() -> None:
    env = Env()
    job = env.manager.create(env.job())
    env.manager.pause(job)
    assert job.pause_count == 2
    env.manager.start(job, drain=True)
    assert env.events.take() == jsc("job0", "created", "running", "paused")
    await settle()
    assert job.status is JobStatus.PAUSED and job.progress.current == 0
    env.manager.resume(job)
    await settle()
    assert env.events.statuses()[:1] == ["running"]
    assert env.events.statuses()[-1] == "null"


async def test_resume_before_the_task_ran_after_drain() -> None:
    env = Env()
    job = env.manager.create(env.job())
    env.manager.pause(job)
    env.manager.start(job, drain=True)
    env.manager.resume(job)
    await settle()
    assert env.events.statuses() == [
        "created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]


async def test_stop_error_then_cancel_while_stopped() -> None:
    env = Env()
    job = env.manager.create(env.job(failures={0: Failure(policy=OnError.STOP)}))
    env.manager.start(job)
    await settle()
    assert job.status is JobStatus.PAUSED and job.user_paused
    await env.manager.cancel(job, force=True)
    assert job.iostatus.value == "ok"
    await settle()
    assert env.events.statuses()[-5:] == ["paused", "running", "aborting", "concluded", "null"]
    assert env.events.events[-3][0] == ev.BLOCK_JOB_CANCELLED


async def test_verb_refusals_and_texts() -> None:
    env = Env()
    job = env.manager.create(env.job(auto_finalize=False, auto_dismiss=False))
    with pytest.raises(JobVerbError) as exc:
        await env.manager.finalize(job)
    assert exc.value.desc == "Job 'job0' in state 'created' cannot accept command verb 'finalize'"
    env.manager.start(job)
    calls: list[tuple[Callable[[], None], str]] = [
        (lambda: env.manager.dismiss(job), "dismiss"),
        (lambda: env.manager.complete(job), "complete"),
    ]
    for call, verb in calls:
        with pytest.raises(JobVerbError) as exc:
            call()
        assert exc.value.desc == f"Job 'job0' in state 'running' cannot accept command verb '{verb}'"
    with pytest.raises(GenericError) as gexc:
        env.manager.set_speed(job, -1)
    assert gexc.value.desc == "Parameter 'speed' expects a non-negative value"
    await settle()
    assert job.status is JobStatus.PENDING
    calls = [
        (lambda: env.manager.pause(job), "pause"),
        (lambda: env.manager.set_speed(job, 1), "set-speed"),
        (lambda: env.manager.dismiss(job), "dismiss"),
    ]
    for call, verb in calls:
        with pytest.raises(JobVerbError, match=f"'pending' cannot accept command verb '{verb}'"):
            call()
    with pytest.raises(GenericError, match="Can't resume a job that was not paused"):
        env.manager.resume(job)  # checked before the verb
    await env.manager.finalize(job)
    assert job.status.value == "concluded"
    with pytest.raises(JobVerbError, match="'concluded' cannot accept command verb 'cancel'"):
        await env.manager.cancel(job, force=True)
    env.manager.dismiss(job)


async def test_complete_is_refused_without_handler() -> None:
    env = Env()
    job = env.manager.create(env.job())
    job.status = JobStatus.READY  # unreachable for backup; check the text anyway
    with pytest.raises(GenericError) as exc:
        env.manager.complete(job)
    assert exc.value.desc == "The active block job 'job0' cannot be completed"


async def test_ids_and_lookups() -> None:
    env = Env()
    with pytest.raises(GenericError, match="^Invalid job ID '0bad'$"):
        env.manager.create(env.job("0bad"))
    with pytest.raises(GenericError, match="^Invalid job ID ''$"):
        env.manager.create(env.job(""))
    env.manager.create(env.job("job0"))
    with pytest.raises(GenericError, match="^Job ID 'job0' already in use$"):
        env.manager.create(env.job("job0"))
    env.manager.create(env.job("c", cls=FakeCreateJob))
    assert env.manager.find_job("c").id == "c"
    with pytest.raises(GenericError) as gexc:
        env.manager.find_job("nope")
    assert gexc.value.desc == "Job not found"
    with pytest.raises(DeviceNotActive) as dexc:
        env.manager.find_block_job("c")
    assert dexc.value.desc == "Block job 'c' not found" and dexc.value.error_class == "DeviceNotActive"
    assert env.manager.find_block_job("job0").id == "job0"
    assert [j.id for j in env.manager.jobs] == ["c", "job0"]  # newest first


async def test_query_shapes() -> None:
    env = Env()
    job = env.manager.create(env.job(gated=True, auto_dismiss=False))
    env.manager.create(env.job("c", cls=FakeCreateJob))
    env.manager.start(job)
    job.allow(1)
    await settle()
    assert list(query_block_jobs(env.manager)[0].items()) == [
        ("type", "backup"), ("device", "job0"), ("len", 4 * MiB), ("offset", MiB),
        ("busy", False), ("paused", False), ("speed", 0), ("io-status", "ok"),
        ("ready", False), ("status", "running"), ("auto-finalize", True),
        ("auto-dismiss", False),
    ]
    assert query_jobs(env.manager) == [
        {"id": "c", "type": "create", "status": "created",
         "current-progress": 0, "total-progress": 4 * MiB},
        {"id": "job0", "type": "backup", "status": "running",
         "current-progress": MiB, "total-progress": 4 * MiB},
    ]
    await env.manager.cancel(job, force=True)
    await settle()
    info = query_block_jobs(env.manager)[0]
    assert list(info)[-1] == "error" and info["error"] == "Operation canceled"
    assert info["status"] == "concluded"
    await env.manager.shutdown()


async def test_illegal_transition_is_a_bug() -> None:
    env = Env()
    job = env.manager.create(env.job())
    with pytest.raises(IllegalTransition):
        job.make_pending()  # only a waiting job may go pending


async def test_shutdown_cancels_everything_with_events() -> None:
    env = Env()
    created = env.manager.create(env.job("created"))
    running = env.manager.create(env.job("running", gated=True))
    paused = env.manager.create(env.job("paused", gated=True))
    pending = env.manager.create(env.job("pending", auto_finalize=False))
    concluded = env.manager.create(env.job("concluded", auto_dismiss=False))
    for job in (running, paused, pending, concluded):
        env.manager.start(job)
    env.manager.pause(paused)
    await settle()
    assert [j.status.value for j in (created, running, paused, pending, concluded)] == [
        "created", "running", "paused", "pending", "concluded"]
    env.events.take()
    await env.manager.shutdown()
    assert env.manager.jobs == [] and env.manager.task_count == 0
    assert env.events.statuses("concluded") == ["null"]
    assert env.events.statuses("pending") == ["aborting", "concluded", "null"]
    assert env.events.statuses("paused") == ["running", "aborting", "concluded", "null"]
    assert env.events.statuses("running") == ["aborting", "concluded", "null"]
    assert env.events.statuses("created") == ["aborting", "concluded", "null"]
    assert [d["device"] for n, d in env.events.events if n == ev.BLOCK_JOB_CANCELLED] == [
        "pending", "paused", "running"]


async def test_shutdown_with_nothing_to_do() -> None:
    env = Env()
    await env.manager.shutdown()
    assert env.events.events == []


async def test_loop_clock_really_sleeps_briefly() -> None:
    env = Env()
    env.manager.clock = LoopClock()
    job = env.manager.create(FakeJob("job0", chunks=2, chunk=1000, speed=100_000))  # 10 ms/chunk
    env.manager.start(job)
    await asyncio.wait_for(job.wait_concluded(), 2)
    assert env.events.statuses()[-1] == "null"


class Sleeper(FakeJob):
    async def run(self) -> None:
        for _ in range(self.chunks):
            await self.sleep_ns(1000)
            self.progress.work_done(self.chunk)


async def test_sleep_ns_is_cut_short_by_pause_and_cancel() -> None:
    env = Env()
    job = env.manager.create(env.job(cls=Sleeper, chunks=3))
    env.manager.start(job)
    await settle()
    assert env.clock.next_deadline() == 1000 and not job.busy
    env.clock.advance(1000)
    await settle()
    assert job.progress.current == MiB
    env.manager.pause(job)  # wakes the sleep; parks at the pause point
    await settle()
    assert job.status is JobStatus.PAUSED and env.clock.next_deadline() is None
    assert job.progress.current == MiB
    env.manager.resume(job)
    await settle()
    assert job.progress.current == 2 * MiB and env.clock.next_deadline() == 2000
    await env.manager.cancel(job, force=True)
    await settle()
    assert env.events.statuses()[-3:] == ["aborting", "concluded", "null"]
    assert job.progress.current == 2 * MiB
