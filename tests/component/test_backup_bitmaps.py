"""Sync-bitmap finalisation (spec 4.7) and transaction rollback (2.6, 3.5 k)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qmpd.commands.actions import TxnContext, run_actions
from qmpd.commands.backup import BlockdevBackupAction
from qmpd.commands.transaction import AbortAction
from qmpd.errors import GenericError
from qmpd.jobs import JobTxn
from qmpd.qapi.models import BlockdevBackup
from tests.component.backup_env import CLUSTER, MiB, BackupEnv, pattern, read
from tests.component.test_job_helpers import jsc

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SIZE = 4 * MiB
BITS = {0, 5, 20}
DATA = {c * CLUSTER: pattern(c + 1) for c in BITS}
#: the second read (cluster 5) fails once
FAIL_SECOND_READ = {"inject-error": [{"event": "read_aio", "sector": 5 * 128, "errno": 5, "once": True}]}


def bits(env: BackupEnv, gran: int = CLUSTER) -> set[int]:
    bm = env.graph.lookup("drive0").bitmaps.lookup("b0")
    assert not bm.busy and bm.successor is None
    return {off // gran for off, n in bm.hbitmap.dirty_extents() for off in range(off, off + n, gran)}


async def setup(tmp_path: Path, *, fail: bool = False, gran: int = CLUSTER) -> BackupEnv:
    env = BackupEnv(tmp_path)
    src = await env.node("drive0", SIZE, DATA, blkdebug=FAIL_SECOND_READ if fail else {})
    await env.node("t", SIZE)
    bm = src.bitmaps.add("b0", gran)
    for c in BITS:
        bm.hbitmap.set(c * CLUSTER, 1)
    return env


async def start(env: BackupEnv, mode: str, sync: str = "bitmap", **kw: Any) -> None:
    args: dict[str, Any] = {"auto_finalize": False, **kw}
    await env.backup(device="drive0", target="t", sync=sync, bitmap="b0", bitmap_mode=mode, job_id="j",
                     filter_node_name="fl", x_perf={"max_workers": 1}, **args)


# mode -> (success, cancel in pending, failure) expected bits; write {7} while pending
TABLE = {
    "on-success": ({7}, BITS | {7}, BITS),
    "never": (BITS | {7}, BITS | {7}, BITS),
    "always": ({7}, {7}, {5, 20}),
}


@pytest.mark.parametrize("mode", list(TABLE))
@pytest.mark.parametrize("outcome", ["success", "cancel-pending", "failure"])
async def test_finalisation_table(tmp_path: Path, mode: str, outcome: str) -> None:
    env = await setup(tmp_path, fail=outcome == "failure")
    await start(env, mode)
    expected = TABLE[mode][["success", "cancel-pending", "failure"].index(outcome)]
    job = env.jobs.find_job("j")
    if outcome == "failure":
        await env.wait_status("j", "null")
        assert env.finished("j") == ("BLOCK_JOB_COMPLETED", {
            "type": "backup", "device": "j", "len": 3 * CLUSTER, "offset": CLUSTER, "speed": 0,
            "error": "Input/output error"})
    else:
        await env.wait_status("j", "pending")
        await env.graph.lookup("fl").write(7 * CLUSTER + 100, b"w")
        if outcome == "success":
            await env.jobs.finalize(job)
        else:
            await env.jobs.cancel(job, force=True)
        name, data = env.finished("j")  # type: ignore[misc]
        assert name == ("BLOCK_JOB_COMPLETED" if outcome == "success" else "BLOCK_JOB_CANCELLED")
        assert data["offset"] == data["len"] == 3 * CLUSTER
    assert bits(env) == expected
    assert env.graph.lookup("drive0").bitmaps.lookup("b0").enabled
    assert [b.name for b in env.graph.lookup("drive0").bitmaps] == ["b0"]


@pytest.mark.parametrize("gran,expected", [(2 * CLUSTER, {2, 10}), (CLUSTER // 2, {10, 11, 40, 41})])
async def test_always_failure_converts_granularity(tmp_path: Path, gran: int, expected: set[int]) -> None:
    env = await setup(tmp_path, fail=True, gran=gran)
    await start(env, "always")
    await env.wait_status("j", "null")
    assert bits(env, gran) == expected


async def test_full_always_failure_marks_uncopied(tmp_path: Path) -> None:
    env = await setup(tmp_path, fail=True)
    await start(env, "always", sync="full")
    await env.wait_status("j", "null")
    # cluster 0 read, 1-4 zeroed, cluster 5 failed: 64 - 5 clusters left
    assert bits(env) == set(range(5, SIZE // CLUSTER))


async def test_disabled_bitmap_stays_disabled(tmp_path: Path) -> None:
    env = await setup(tmp_path)
    env.graph.lookup("drive0").bitmaps.lookup("b0").disabled = True
    await start(env, "on-success", auto_finalize=True)
    await env.wait_status("j", "null")
    bm = env.graph.lookup("drive0").bitmaps.lookup("b0")
    assert bm.disabled and bm.count == 0


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
async def test_transaction_rollback_leaves_bitmap(tmp_path: Path, mode: str) -> None:
    env = await setup(tmp_path)
    before = env.state()[0]
    data = BlockdevBackup.model_validate({"device": "drive0", "target": "t", "sync": "bitmap", "bitmap": "b0",
                                          "bitmap-mode": mode, "job-id": "j"})
    txn = TxnContext()
    with pytest.raises(GenericError, match="Transaction aborted using Abort action"):
        await run_actions([BlockdevBackupAction(env.ctx, data, txn), AbortAction(env.ctx, None, txn)])
    assert env.events.take() == jsc("j", "created", "aborting", "concluded", "null")
    assert env.state()[0] == before and env.jobs.jobs == []


async def test_grouped_one_fails(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    await env.node("drive0", SIZE, DATA, blkdebug=FAIL_SECOND_READ)
    await env.node("t", SIZE)
    await env.node("d1", SIZE, DATA)
    await env.node("t1", SIZE)
    txn = TxnContext(job_txn=JobTxn())
    acts = [BlockdevBackupAction(env.ctx, BlockdevBackup.model_validate(
        {"device": d, "target": t, "sync": "full", "job-id": j, "speed": s, "x-perf": {"max-workers": 1}}), txn)
        for d, t, j, s in (("d1", "t1", "ok", 1), ("drive0", "t", "bad", 0))]
    await run_actions(acts)  # type: ignore[arg-type]
    await env.wait_status("ok", "null")
    await env.wait_status("bad", "null")
    assert env.named("BLOCK_JOB_ERROR") == [("BLOCK_JOB_ERROR", {"device": "bad", "operation": "read",
                                                                 "action": "report"})]
    assert env.finished("bad")[0] == "BLOCK_JOB_COMPLETED"  # type: ignore[index]
    assert env.finished("bad")[1]["error"] == "Input/output error"  # type: ignore[index]
    assert env.finished("ok")[0] == "BLOCK_JOB_CANCELLED"  # type: ignore[index]
    # commit runs in reverse: the last backup of the list starts first
    starts = [d["id"] for n, d in env.events.events if n == "JOB_STATUS_CHANGE" and d["status"] == "running"]
    assert starts[:2] == ["bad", "bad"]


async def test_success_target_matches(tmp_path: Path) -> None:
    env = await setup(tmp_path)
    await start(env, "on-success", auto_dismiss=False)
    await env.wait_status("j", "pending")
    await env.jobs.finalize(env.jobs.find_job("j"))
    src, tgt = read(tmp_path / "drive0.img"), read(tmp_path / "t.img")
    for c in range(SIZE // CLUSTER):
        want = src[c * CLUSTER:(c + 1) * CLUSTER] if c in BITS else bytes(CLUSTER)
        assert tgt[c * CLUSTER:(c + 1) * CLUSTER] == want
