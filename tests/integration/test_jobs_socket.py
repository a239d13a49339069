"""Job events relative to command replies, verbs and quit, on the wire (spec §3.5)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qmpd.jobs import ManualClock
from tests.support.daemon import AsyncRawClient, RunningDaemon

SIZE = 8 << 20


def _jsc(job: str, *statuses: str) -> list[tuple[str, Any]]:
    return [("JOB_STATUS_CHANGE", {"id": job, "status": s}) for s in statuses]


def _brief(msgs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["event"], m.get("data")) if "event" in m else ("reply", m.get("return", m.get("error")))
            for m in msgs]


async def _client(qmpd: RunningDaemon, tmp_path: Path) -> AsyncRawClient:
    for name in ("disk.img", "target.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(SIZE)
    client = await AsyncRawClient.connect(qmpd.path)
    for node, name in (("drive0", "disk.img"), ("target", "target.img")):
        reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": node, "file": {"driver": "file", "filename": str(tmp_path / name)}}})
        assert reply == {"return": {}}
    reply, _ = await client.execute({"execute": "human-monitor-command", "arguments": {
        "command-line": 'qemu-io drive0 "write -P 7 0 8M"'}})
    return client


async def _read_until(client: AsyncRawClient, pred: Any) -> list[dict[str, Any]]:
    out = []
    while True:
        msg = json.loads(await asyncio.wait_for(client.reader.readline(), 30))
        out.append(msg)
        if pred(msg):
            return out


def _fake_clock(qmpd: RunningDaemon) -> ManualClock:
    """Give the daemon's jobs a clock that only the test moves: a throttled
    job then sleeps in its rate limiter until the test says otherwise."""
    clock = ManualClock()
    assert qmpd.daemon.state.jobs is not None
    qmpd.daemon.state.jobs.clock = clock
    return clock


async def _wait_throttled(clock: ManualClock) -> None:
    """Until the job sleeps in its rate limiter.  With one worker, its first
    chunk was copied before that."""
    await asyncio.wait_for(clock.wait_timer(), 30)


def _start(job: str, **extra: Any) -> dict[str, Any]:
    return {"execute": "blockdev-backup", "arguments": {
        "device": "drive0", "target": "target", "sync": "full", "job-id": job, **extra}}


#: One worker: the first chunk is done before the job's first limiter sleep.
ONE_WORKER = {"x-perf": {"max-workers": 1}}


@pytest.mark.asyncio
async def test_start_events_precede_the_reply_and_cancel_follows_it(qmpd: RunningDaemon, tmp_path: Path) -> None:
    client = await _client(qmpd, tmp_path)
    clock = _fake_clock(qmpd)
    try:
        reply, events = await client.execute(_start("j", speed=1, **ONE_WORKER))
        assert _brief([*events, reply]) == [*_jsc("j", "created", "running", "paused", "running"), ("reply", {})]
        # speed=1: exactly one 1 MiB chunk is copied before the first throttle
        # sleep, which lasts until the (fake) clock moves: it never does
        await _wait_throttled(clock)
        reply, events = await client.execute({"execute": "query-block-jobs"})
        assert reply["return"][0]["offset"] == 1 << 20 and reply["return"][0]["len"] == SIZE
        assert reply["return"][0]["busy"] is False
        # (e) cancel while running: the reply first, then the wind-down
        client.writer.write(b'{"execute": "job-cancel", "arguments": {"id": "j"}}')
        msgs = await _read_until(client, lambda m: m.get("data") == {"id": "j", "status": "null"})
        assert _brief(msgs) == [("reply", {}), *_jsc("j", "aborting"),
                                ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE,
                                                         "offset": 1 << 20, "speed": 1}),
                                *_jsc("j", "concluded", "null")]
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_pause_resume_set_speed_and_verbs(qmpd: RunningDaemon, tmp_path: Path) -> None:
    client = await _client(qmpd, tmp_path)
    clock = _fake_clock(qmpd)
    try:
        await client.execute(_start("j", speed=1, **ONE_WORKER, **{"auto-finalize": False, "auto-dismiss": False}))
        refusals = [
            ({"execute": "job-finalize", "arguments": {"id": "j"}},
             "Job 'j' in state 'running' cannot accept command verb 'finalize'"),
            ({"execute": "job-dismiss", "arguments": {"id": "j"}},
             "Job 'j' in state 'running' cannot accept command verb 'dismiss'"),
            ({"execute": "block-job-complete", "arguments": {"device": "j"}},
             "Job 'j' in state 'running' cannot accept command verb 'complete'"),
            ({"execute": "job-resume", "arguments": {"id": "j"}}, "Can't resume a job that was not paused"),
            ({"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": -1}},
             "Parameter 'speed' expects a non-negative value"),
            ({"execute": "job-pause", "arguments": {"id": "nope"}}, "Job not found"),
        ]
        for req, desc in refusals:
            reply, _ = await client.execute(req)
            assert reply == {"error": {"class": "GenericError", "desc": desc}}, req
        reply, _ = await client.execute({"execute": "block-job-pause", "arguments": {"device": "nope"}})
        assert reply == {"error": {"class": "DeviceNotActive", "desc": "Block job 'nope' not found"}}

        await _wait_throttled(clock)
        # the job sleeps in the rate limiter: like QEMU, it reaches its pause
        # point inside the command, so the event precedes the reply
        reply, events = await client.execute({"execute": "job-pause", "arguments": {"id": "j"}})
        assert _brief([*events, reply]) == [*_jsc("j", "paused"), ("reply", {})]
        reply, _ = await client.execute({"execute": "job-pause", "arguments": {"id": "j"}})
        assert reply == {"error": {"class": "GenericError", "desc": "Job is already paused"}}
        reply, _ = await client.execute({"execute": "block-job-cancel", "arguments": {"device": "j"}})
        assert reply == {"error": {"class": "GenericError",
                                   "desc": "The block job for device 'j' is currently paused"}}
        reply, _ = await client.execute({"execute": "query-block-jobs"})
        info = reply["return"][0]
        assert (info["status"], info["paused"], info["busy"], info["speed"]) == ("paused", True, False, 1)
        # raise the speed while paused, resume: the job runs to pending at full speed
        assert (await client.execute({"execute": "block-job-set-speed",
                                      "arguments": {"device": "j", "speed": 0}}))[0] == {"return": {}}
        reply, events = await client.execute({"execute": "job-resume", "arguments": {"id": "j"}})
        msgs = [*events, reply, *await _read_until(client, lambda m: m.get("event") == "BLOCK_JOB_PENDING")]
        assert _brief(msgs) == [*_jsc("j", "running"), ("reply", {}), *_jsc("j", "waiting", "pending"),
                                ("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"})]
        # (c)+(d) finalize runs synchronously: its events come before its reply
        reply, events = await client.execute({"execute": "job-finalize", "arguments": {"id": "j"}})
        assert _brief([*events, reply]) == [
            ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "j", "len": SIZE, "offset": SIZE, "speed": 0}),
            *_jsc("j", "concluded"), ("reply", {})]
        reply, _ = await client.execute({"execute": "query-jobs"})
        assert reply["return"] == [{"id": "j", "type": "backup", "status": "concluded",
                                    "current-progress": SIZE, "total-progress": SIZE}]
        reply, _ = await client.execute({"execute": "job-cancel", "arguments": {"id": "j"}})
        assert reply["error"]["desc"] == "Job 'j' in state 'concluded' cannot accept command verb 'cancel'"
        reply, events = await client.execute({"execute": "job-dismiss", "arguments": {"id": "j"}})
        assert _brief([*events, reply]) == [*_jsc("j", "null"), ("reply", {})]
        assert (tmp_path / "target.img").read_bytes() == (tmp_path / "disk.img").read_bytes()
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_negative_speed_at_creation(qmpd: RunningDaemon, tmp_path: Path) -> None:
    client = await _client(qmpd, tmp_path)
    try:
        reply, events = await client.execute(_start("j", speed=-1))
        assert _brief([*events, reply]) == [
            *_jsc("j", "created", "null"),
            ("reply", {"class": "GenericError", "desc": "Parameter 'speed' expects a non-negative value"})]
        reply, _ = await client.execute({"execute": "query-named-block-nodes"})
        # newest first, as QEMU lists them
        assert [n["node-name"] for n in reply["return"]][::2] == ["target", "drive0"]
        assert all("dirty-bitmaps" not in n for n in reply["return"])
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_quit_cancels_running_jobs(qmpd: RunningDaemon, tmp_path: Path) -> None:
    client = await _client(qmpd, tmp_path)
    try:
        await client.execute(_start("j", speed=1))
        client.writer.write(b'{"execute": "quit", "id": "q"}')
        msgs = await _read_until(client, lambda m: m.get("id") == "q")
        brief = _brief(msgs)
        assert brief[0] == ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        assert brief[1:] == [*_jsc("j", "aborting"),
                             ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE,
                                                      "offset": 1 << 20, "speed": 1}),
                             *_jsc("j", "concluded", "null"), ("reply", {})]
        assert qmpd.daemon.stopping
        assert qmpd.daemon.state.jobs is not None and qmpd.daemon.state.jobs.jobs == []
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_k_transaction_rollback_after_backup_created(qmpd: RunningDaemon, tmp_path: Path) -> None:
    client = await _client(qmpd, tmp_path)
    try:
        await client.execute({"execute": "block-dirty-bitmap-add", "arguments": {"node": "drive0", "name": "b0"}})
        await client.execute({"execute": "human-monitor-command", "arguments": {
            "command-line": 'qemu-io drive0 "write -P 9 64k 128k"'}})
        before, _ = await client.execute({"execute": "x-debug-block-dirty-bitmap-sha256",
                                          "arguments": {"node": "drive0", "name": "b0"}})
        reply, events = await client.execute({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "drive0", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"device": "drive0", "target": "target", "sync": "incremental",
                                                 "bitmap": "b0", "job-id": "j"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "b1"}},
            {"type": "abort", "data": {}},
        ]}})
        assert _brief([*events, reply]) == [
            *_jsc("j", "created", "aborting", "concluded", "null"),
            ("reply", {"class": "GenericError", "desc": "Transaction aborted using Abort action"})]
        after, _ = await client.execute({"execute": "x-debug-block-dirty-bitmap-sha256",
                                         "arguments": {"node": "drive0", "name": "b0"}})
        assert after == before
        nodes, _ = await client.execute({"execute": "query-named-block-nodes"})
        assert [n["node-name"] for n in nodes["return"] if not n["node-name"].startswith("#")] == [
            "target", "drive0"]
        drive0 = next(n for n in nodes["return"] if n["node-name"] == "drive0")
        assert drive0["dirty-bitmaps"] == [{"name": "b0", "recording": True, "persistent": False, "busy": False,
                                            "granularity": 65536, "count": 131072}]
        assert (await client.execute({"execute": "query-jobs"}))[0] == {"return": []}
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_l_grouped_one_failure_cancels_the_other(qmpd: RunningDaemon, tmp_path: Path) -> None:
    client = await _client(qmpd, tmp_path)
    try:
        with open(tmp_path / "t2.img", "wb") as f:
            f.truncate(SIZE)
        # the second target fails its first write
        reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": "bad", "file": {
                "driver": "blkdebug", "image": {"driver": "file", "filename": str(tmp_path / "t2.img")},
                "inject-error": [{"event": "write_aio", "errno": 5}]}}})
        assert reply == {"return": {}}
        reply, events = await client.execute({"execute": "transaction", "arguments": {
            "actions": [
                {"type": "blockdev-backup", "data": {"device": "drive0", "target": "target", "sync": "full",
                                                     "job-id": "ok", "speed": 1}},
                {"type": "blockdev-backup", "data": {"device": "drive0", "target": "bad", "sync": "full",
                                                     "job-id": "fail"}},
            ],
            "properties": {"completion-mode": "grouped"}}})
        assert reply == {"return": {}}
        msgs = list(events)
        while not all(("JOB_STATUS_CHANGE", {"id": j, "status": "null"}) in _brief(msgs) for j in ("ok", "fail")):
            msgs += await _read_until(client, lambda m: True)
        brief = _brief(msgs)
        assert ("BLOCK_JOB_ERROR", {"device": "fail", "operation": "write", "action": "report"}) in brief
        completed = [b for b in brief if b[0] == "BLOCK_JOB_COMPLETED"]
        cancelled = [b for b in brief if b[0] == "BLOCK_JOB_CANCELLED"]
        assert [c[1]["device"] for c in completed] == ["fail"]
        assert completed[0][1]["error"] == "Input/output error"
        assert [c[1]["device"] for c in cancelled] == ["ok"]
        # the later action's job started first (commit runs in reverse)
        assert brief.index(("JOB_STATUS_CHANGE", {"id": "fail", "status": "running"})) < brief.index(
            ("JOB_STATUS_CHANGE", {"id": "ok", "status": "running"}))
    finally:
        await client.close()
