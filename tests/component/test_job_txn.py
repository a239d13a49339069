"""Job transactions (completion-mode grouped) and the finalisation rules of 3.4."""

from __future__ import annotations

import errno

import pytest

from qmpd.events import names as ev
from qmpd.jobs import JobError, JobStatus, JobTxn
from tests.component.test_job_helpers import MiB, Env, FakeJob, jsc, settle

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


def completed(job_id: str) -> tuple[str, dict[str, object]]:
    return (ev.BLOCK_JOB_COMPLETED,
            {"type": "backup", "device": job_id, "len": 4 * MiB, "offset": 4 * MiB, "speed": 0})


async def pair(**kw_a: object) -> tuple[Env, FakeJob, FakeJob]:
    """a (older) and b (newer) in one transaction, started b first, both gated."""
    env = Env()
    txn = JobTxn()
    a = env.manager.create(env.job("a", gated=True, **kw_a), txn)  # type: ignore[arg-type]
    b = env.manager.create(env.job("b", gated=True), txn)
    env.manager.start(b)
    env.manager.start(a)
    env.events.take()
    return env, a, b


async def test_grouped_success_waits_for_every_member() -> None:
    env, a, b = await pair()
    a.allow(4)
    await settle()
    assert env.events.take() == jsc("a", "waiting")
    assert a.status is JobStatus.WAITING and a.calls == []
    b.allow(4)
    await settle()
    assert env.events.take() == [
        *jsc("b", "waiting"),
        *jsc("b", "pending"), *jsc("a", "pending"),
        completed("b"), *jsc("b", "concluded", "null"),
        completed("a"), *jsc("a", "concluded", "null"),
    ]
    assert a.calls == b.calls == ["prepare", "commit", "clean"]


async def test_grouped_manual_finalize_on_any_member() -> None:
    env, a, b = await pair(auto_finalize=False)
    a.allow(4)
    b.allow(4)
    await settle()
    assert env.events.take() == [
        *jsc("b", "waiting"), *jsc("a", "waiting"),
        *jsc("b", "pending"), *jsc("a", "pending"),
        (ev.BLOCK_JOB_PENDING, {"type": "backup", "id": "a"}),
    ]
    await env.manager.finalize(b)  # b is auto-finalize but waits for a
    assert env.events.take() == [
        completed("b"), *jsc("b", "concluded", "null"),
        completed("a"), *jsc("a", "concluded", "null"),
    ]


async def test_cancel_of_waiting_member_cancels_the_group() -> None:
    env, a, b = await pair()
    a.allow(4)
    b.allow(1)
    await settle()
    env.events.take()
    await env.manager.cancel(a, force=True)  # a waits for b to wind down, inside the command
    assert env.events.take() == [
        *jsc("b", "aborting"),
        (ev.BLOCK_JOB_CANCELLED, {"type": "backup", "device": "b", "len": 4 * MiB, "offset": MiB, "speed": 0}),
        *jsc("b", "concluded", "null"),
        *jsc("a", "aborting"),
        (ev.BLOCK_JOB_CANCELLED, {"type": "backup", "device": "a", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0}),
        *jsc("a", "concluded", "null"),
    ]


async def test_cancel_of_running_member_cancels_waiting_sibling() -> None:
    env, a, b = await pair()
    a.allow(4)
    await settle()
    env.events.take()
    await env.manager.cancel(b, force=True)
    assert env.events.take() == []
    await settle()
    assert env.events.statuses() == ["aborting", "concluded", "null", "aborting", "concluded", "null"]
    assert [d["device"] for n, d in env.events.events if n == ev.BLOCK_JOB_CANCELLED] == ["b", "a"]


class FailingPrepare(FakeJob):
    def prepare(self) -> None:
        super().prepare()
        raise JobError(errno.EPERM, "prepare failed")


async def test_prepare_failure_aborts_the_transaction() -> None:
    env = Env()
    txn = JobTxn()
    a = env.manager.create(env.job("a"), txn)
    b = env.manager.create(env.job("b", cls=FailingPrepare), txn)
    env.manager.start(b)
    env.manager.start(a)
    env.events.take()
    await settle()
    events = env.events.take()
    assert events[:4] == [*jsc("b", "waiting"), *jsc("a", "waiting"), *jsc("b", "pending"), *jsc("a", "pending")]
    # b's prepare failed: b aborts with its message, a is force-cancelled
    assert events[4:] == [
        *jsc("b", "aborting"),
        (ev.BLOCK_JOB_COMPLETED, {"type": "backup", "device": "b", "len": 4 * MiB, "offset": 4 * MiB,
                                  "speed": 0, "error": "prepare failed"}),
        *jsc("b", "concluded", "null"),
        *jsc("a", "aborting"),
        (ev.BLOCK_JOB_CANCELLED, {"type": "backup", "device": "a", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0}),
        *jsc("a", "concluded", "null"),
    ]
    assert b.calls == ["prepare", "abort", "clean"] and a.calls == ["abort", "clean"]


async def test_unstarted_member_is_rolled_back_with_a_failed_sibling() -> None:
    env = Env()
    txn = JobTxn()
    a = env.manager.create(env.job("a"), txn)
    b = env.manager.create(env.job("b", gated=True), txn)
    env.manager.start(b)
    env.events.take()
    await env.manager.cancel(b, force=True)
    await settle()
    assert env.events.take() == [
        *jsc("b", "aborting"),
        (ev.BLOCK_JOB_CANCELLED, {"type": "backup", "device": "b", "len": 4 * MiB, "offset": 0, "speed": 0}),
        *jsc("b", "concluded", "null"),
        *jsc("a", "aborting", "concluded", "null"),
    ]
    assert a.calls == ["abort", "clean"]
