"""Backup event sequences (spec 3.5 a-i) and error policies (4.5)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qmpd.jobs import ManualClock
from qmpd.commands.views import block_job_info
from tests.component.backup_env import CLUSTER, MiB, BackupEnv, rand, read
from tests.component.test_job_helpers import jsc

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SIZE = 2 * MiB
J = "j"


def done_event(name: str, offset: int, length: int = SIZE, **extra: Any) -> tuple[str, dict[str, Any]]:
    return name, {"type": "backup", "device": J, "len": length, "offset": offset, "speed": extra.pop("speed", 0),
                  **extra}


async def world(tmp_path: Path, clock: ManualClock | None = None, src_dbg: dict[str, Any] | None = None,
                tgt_dbg: dict[str, Any] | None = None) -> BackupEnv:
    env = BackupEnv(tmp_path, clock)
    await env.node("drive0", SIZE, {0: rand(SIZE, 9)}, blkdebug=src_dbg)
    await env.node("t", SIZE, blkdebug=tgt_dbg)
    return env


async def backup(env: BackupEnv, **kw: Any) -> None:
    await env.backup(device="drive0", target="t", sync="full", job_id=J, **kw)


async def test_a_b_success(tmp_path: Path) -> None:
    env = await world(tmp_path)
    await backup(env)
    assert env.events.take() == jsc(J, "created", "running", "paused", "running")
    await env.wait_status(J, "null")
    assert env.events.take() == [*jsc(J, "waiting", "pending"), done_event("BLOCK_JOB_COMPLETED", SIZE),
                                 *jsc(J, "concluded", "null")]
    assert read(tmp_path / "t.img") == read(tmp_path / "drive0.img")


async def test_c_d_manual_finalize_and_dismiss(tmp_path: Path) -> None:
    env = await world(tmp_path)
    await backup(env, auto_finalize=False, auto_dismiss=False)
    await env.wait_status(J, "pending")
    env.events.take()
    assert env.jobs.find_job(J).status.value == "pending"
    assert env.graph.get("drive0").parents  # type: ignore[union-attr]  # the filter is still there
    await env.jobs.finalize(env.jobs.find_job(J))
    assert env.events.take() == [done_event("BLOCK_JOB_COMPLETED", SIZE), *jsc(J, "concluded")]
    env.jobs.dismiss(env.jobs.find_job(J))
    assert env.events.take() == jsc(J, "null")


async def test_c_pending_event(tmp_path: Path) -> None:
    env = await world(tmp_path)
    await backup(env, auto_finalize=False)
    await env.wait_status(J, "pending")
    assert env.events.take()[-3:] == [*jsc(J, "waiting", "pending"),
                                      ("BLOCK_JOB_PENDING", {"type": "backup", "id": J})]


async def test_e_cancel_running(tmp_path: Path) -> None:
    clock = ManualClock()
    env = await world(tmp_path, clock)
    # one worker: the first chunk is copied before the limiter puts the job to sleep
    await backup(env, speed=1, x_perf={"max_workers": 1})
    await asyncio.wait_for(clock.wait_timer(), 10)
    assert env.jobs.find_job(J).progress.current == MiB
    env.events.take()
    await env.jobs.cancel(env.jobs.find_job(J), force=True)
    await env.wait_status(J, "null")
    assert env.events.take() == [*jsc(J, "aborting"), done_event("BLOCK_JOB_CANCELLED", MiB, speed=1),
                                 *jsc(J, "concluded", "null")]


async def test_f_cancel_pending(tmp_path: Path) -> None:
    env = await world(tmp_path)
    await backup(env, auto_finalize=False)
    await env.wait_status(J, "pending")
    env.events.take()
    await env.jobs.cancel(env.jobs.find_job(J), force=True)
    assert env.events.take() == [*jsc(J, "aborting"), done_event("BLOCK_JOB_CANCELLED", SIZE),
                                 *jsc(J, "concluded", "null")]


async def test_g_read_error_report(tmp_path: Path) -> None:
    rule = {"inject-error": [{"event": "read_aio", "sector": 2048, "errno": 5}]}
    env = await world(tmp_path, src_dbg=rule)
    await backup(env, auto_finalize=False, x_perf={"max_workers": 1})
    await env.wait_status(J, "null")
    assert env.events.take()[4:] == [
        ("BLOCK_JOB_ERROR", {"device": J, "operation": "read", "action": "report"}), *jsc(J, "aborting"),
        done_event("BLOCK_JOB_COMPLETED", MiB, error="Input/output error"), *jsc(J, "concluded", "null")]


async def test_write_error_report(tmp_path: Path) -> None:
    env = await world(tmp_path, tgt_dbg={"inject-error": [{"event": "write_aio", "errno": 5}]})
    await backup(env, on_source_error="stop", on_target_error="report")
    await env.wait_status(J, "null")
    assert env.named("BLOCK_JOB_ERROR") == [("BLOCK_JOB_ERROR", {"device": J, "operation": "write",
                                                                 "action": "report"})]
    assert env.finished(J)[1]["error"] == "Input/output error"  # type: ignore[index]


@pytest.mark.parametrize("errno,policy,iostatus", [(5, "stop", "failed"), (28, "enospc", "nospace"),
                                                   (28, "stop", "nospace")])
async def test_h_stop_then_resume(tmp_path: Path, errno: int, policy: str, iostatus: str) -> None:
    rule = {"inject-error": [{"event": "write_aio", "errno": errno, "once": True}]}
    env = await world(tmp_path, tgt_dbg=rule)
    await backup(env, on_target_error=policy, x_perf={"max_workers": 1})
    # the second "paused" (the first is the drain pair after the command)
    await asyncio.wait_for(env.events.wait(lambda: env.events.statuses(J).count("paused") == 2), 10)
    job = env.jobs.find_job(J)
    assert not job.busy  # parked in the same step that said "paused"
    info = block_job_info(job)
    assert (info["status"], info["paused"], info["io-status"], info["busy"]) == ("paused", True, iostatus, False)
    assert env.named("BLOCK_JOB_ERROR") == [("BLOCK_JOB_ERROR", {"device": J, "operation": "write",
                                                                 "action": "stop"})]
    with pytest.raises(Exception, match="is currently paused"):
        await env.jobs.cancel(job)
    env.jobs.resume(job)
    assert job.iostatus.value == "ok"
    await env.wait_status(J, "null")
    assert env.finished(J) == done_event("BLOCK_JOB_COMPLETED", SIZE)
    assert read(tmp_path / "t.img") == read(tmp_path / "drive0.img")


async def test_enospc_policy_reports_eio(tmp_path: Path) -> None:
    env = await world(tmp_path, tgt_dbg={"inject-error": [{"event": "write_aio", "errno": 5, "once": True}]})
    await backup(env, on_target_error="enospc")
    await env.wait_status(J, "null")
    assert env.named("BLOCK_JOB_ERROR")[0][1]["action"] == "report"


async def test_i_ignore_retries(tmp_path: Path) -> None:
    rule = {"inject-error": [{"event": "read_aio", "sector": 128, "errno": 5, "once": True}]}
    env = await world(tmp_path, src_dbg=rule)
    await backup(env, on_source_error="ignore", x_perf={"max_workers": 1, "max_chunk": CLUSTER})
    await env.wait_status(J, "null")
    assert env.named("BLOCK_JOB_ERROR") == [("BLOCK_JOB_ERROR", {"device": J, "operation": "read",
                                                                 "action": "ignore"})]
    assert env.finished(J) == done_event("BLOCK_JOB_COMPLETED", SIZE)
    assert read(tmp_path / "t.img") == read(tmp_path / "drive0.img")


async def test_speed_one_copies_one_chunk(tmp_path: Path) -> None:
    clock = ManualClock()
    env = await world(tmp_path, clock)
    await backup(env, speed=1, x_perf={"max_workers": 1})
    job = env.jobs.find_job(J)
    await asyncio.wait_for(clock.wait_timer(), 10)  # asleep in the limiter
    assert job.progress.current == MiB and not job.busy
    assert block_job_info(job)["offset"] == MiB
    env.jobs.set_speed(job, 0)
    await env.wait_status(J, "null")
