"""``/metrics`` parses with prometheus_client.parser and agrees with what QMP reports."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import AsyncRawClient
from tests.support.web import web_daemon

pytestmark = pytest.mark.asyncio
SIZE = 4 << 20


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_match_qmp(sock_dir: Path, tmp_path: Path) -> None:
    for name in ("disk.img", "target.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(SIZE)
    async with web_daemon(sock_dir) as wd:
        client = await AsyncRawClient.connect(wd.running.path)
        sent: Counter[tuple[str, str]] = Counter({("qmp_capabilities", "ok"): 1})
        events: list[dict[str, Any]] = []

        async def run(request: dict[str, Any]) -> dict[str, Any]:
            reply, evs = await client.execute(request)
            events.extend(evs)
            outcome = reply["error"]["class"] if "error" in reply else "ok"
            sent[(request["execute"], outcome)] += 1
            return reply

        try:
            for node, name in (("drive0", "disk.img"), ("target", "target.img")):
                assert await run({"execute": "blockdev-add", "arguments": {
                    "driver": "raw", "node-name": node,
                    "file": {"driver": "file", "filename": str(tmp_path / name)}}}) == {"return": {}}
            await run({"execute": "block-dirty-bitmap-add", "arguments": {"node": "drive0", "name": "b0"}})
            await run({"execute": "human-monitor-command", "arguments": {
                "command-line": 'qemu-io drive0 "write -P 7 0 1M"'}})
            await run({"execute": "human-monitor-command", "arguments": {
                "command-line": 'qemu-io drive0 "write -P 7 3M 64k"'}})
            for _ in range(3):
                await run({"execute": "query-name"})
            assert "error" in await run({"execute": "blockdev-del", "arguments": {"node-name": "nosuch"}})
            assert "error" in await run({"execute": "query-name", "arguments": {"x": 1}})
            await run({"execute": "blockdev-backup", "arguments": {
                "device": "drive0", "target": "target", "sync": "full", "job-id": "j0"}})
            while not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in events):
                msg = json.loads(await asyncio.wait_for(client.reader.readline(), 30))
                events.append(msg)
            while events[-1].get("data") != {"id": "j0", "status": "null"}:
                events.append(json.loads(await asyncio.wait_for(client.reader.readline(), 30)))
            nodes = (await run({"execute": "query-named-block-nodes"}))["return"]
            samples = await scrape(wd.url)
        finally:
            await client.close()

        # requests by command and outcome; the histogram counted each one too
        for (command, outcome), n in sent.items():
            assert value(samples, "qmpd_qmp_requests_total", command=command, outcome=outcome) == n, command
        per_command: Counter[str] = Counter()
        for (command, _), n in sent.items():
            per_command[command] += n
        for command, n in per_command.items():
            assert value(samples, "qmpd_qmp_request_duration_seconds_count", command=command) == n
            assert value(samples, "qmpd_qmp_request_duration_seconds_bucket", command=command, le="+Inf") == n
        assert sum(v for (name, _), v in samples.items() if name == "qmpd_qmp_requests_total") == sum(sent.values())
        assert value(samples, "qmpd_qmp_requests_total", command="query-name", outcome="GenericError") == 1

        # dirty bytes per bitmap, as query-named-block-nodes counts them
        drive0 = next(n for n in nodes if n["node-name"] == "drive0")
        count = next(b["count"] for b in drive0["dirty-bitmaps"] if b["name"] == "b0")
        assert count == (1 << 20) + (64 << 10)
        assert value(samples, "qmpd_bitmap_dirty_bytes", node="drive0", bitmap="b0") == count

        # the finished backup: bytes copied and jobs by outcome, as BLOCK_JOB_COMPLETED says
        completed = next(e for e in events if e["event"] == "BLOCK_JOB_COMPLETED")["data"]
        assert completed["offset"] == completed["len"] == SIZE
        assert value(samples, "qmpd_job_bytes_copied_total") == completed["offset"]
        assert value(samples, "qmpd_jobs_finished_total", type="backup", outcome="completed") == 1
        assert not any(name == "qmpd_jobs" for name, _ in samples)  # no job left

        # bytes per node: the guest wrote 1M + 64k; the backup read exactly those
        # (the rest of the source is a hole) and wrote or zeroed the target
        written = (1 << 20) + (64 << 10)
        assert value(samples, "qmpd_node_written_bytes_total", node="drive0", driver="raw") == written
        assert value(samples, "qmpd_node_read_bytes_total", node="drive0", driver="raw") == written
        assert value(samples, "qmpd_node_written_bytes_total", node="target", driver="raw") <= SIZE
        target_file = next(n["node-name"] for n in nodes if n["node-name"].startswith("#") and
                           n["file"] == str(tmp_path / "target.img") and n["drv"] == "file")
        assert value(samples, "qmpd_node_written_bytes_total", node=target_file, driver="file") == \
            value(samples, "qmpd_node_written_bytes_total", node="target", driver="raw")

        # events emitted: what the client saw, by name
        seen = Counter(e["event"] for e in events)
        for name, n in seen.items():
            assert value(samples, "qmpd_events_total", event=name) == n, name
        assert value(samples, "qmpd_clients", transport="socket") == 1


async def test_running_job_gauges(sock_dir: Path, tmp_path: Path) -> None:
    with open(tmp_path / "d.img", "wb") as f:
        f.truncate(SIZE)
    async with web_daemon(sock_dir) as wd:
        client = await AsyncRawClient.connect(wd.running.path)
        try:
            await client.execute({"execute": "blockdev-add", "arguments": {
                "driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": str(tmp_path / "d.img")}}})
            await client.execute({"execute": "blockdev-add", "arguments": {
                "driver": "null-co", "node-name": "t", "size": SIZE}})
            reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
                "device": "d", "target": "t", "sync": "full", "job-id": "slow", "speed": 1}})
            assert reply == {"return": {}}
            samples = await scrape(wd.url)
            jobs = (await client.execute({"execute": "query-jobs"}))[0]["return"]
            assert value(samples, "qmpd_jobs", type="backup", status=jobs[0]["status"]) == 1
            assert value(samples, "qmpd_job_total_bytes", id="slow", type="backup") == SIZE
            assert value(samples, "qmpd_job_progress_bytes", id="slow", type="backup") <= jobs[0]["current-progress"]
            assert ("qmpd_job_throughput_bytes_per_second", (("id", "slow"), ("type", "backup"))) in samples
        finally:
            await client.execute({"execute": "job-cancel", "arguments": {"id": "slow"}})
            await client.close()
