"""The dashboard's data: snapshots pushed on /live, /api/state, heat strips, buttons."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qmpd.bitmap.hbitmap import HBitmap
from qmpd.server.plan import StartupPlan
from tests.support.daemon import AsyncRawClient
from tests.support.web import TOKEN, web_daemon

SIZE = 8 << 20


def test_density_downsamples() -> None:
    h = HBitmap(8, 1)
    h.set(0, 2)
    h.set(7, 1)
    assert h.density(4) == [1.0, 0.0, 0.0, 0.5]
    assert h.density(100) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert HBitmap(0, 1).density(4) == []
    big = HBitmap(1 << 30, 1 << 16)
    big.set(512 << 20, 1 << 20)
    heat = big.density(128)
    assert len(heat) == 128 and heat[64] == pytest.approx(1 / 8) and sum(x > 0 for x in heat) == 1


async def _setup(client: AsyncRawClient, tmp_path: Path) -> None:
    with open(tmp_path / "d.img", "wb") as f:
        f.truncate(SIZE)
    for req in (
        {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "d", "file": {
            "driver": "file", "filename": str(tmp_path / "d.img")}}},
        {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "t", "size": SIZE}},
        {"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "b0"}},
        {"execute": "human-monitor-command", "arguments": {"command-line": 'qemu-io d "write 6M 1M"'}},
    ):
        reply, _ = await client.execute(req)
        assert "return" in reply, reply


@pytest.mark.asyncio
async def test_live_snapshots_and_buttons(sock_dir: Path, tmp_path: Path) -> None:
    async with web_daemon(sock_dir, name="vm1") as wd:
        client = await AsyncRawClient.connect(wd.running.path)
        try:
            await _setup(client, tmp_path)
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(wd.url + "live") as live:
                    first: dict[str, Any] = json.loads(await live.receive_str(timeout=10))
                    assert first["name"] == "vm1"
                    assert [c["transport"] for c in first["clients"]] == ["socket"]
                    d = next(n for n in first["nodes"] if n["name"] == "d")
                    assert d["children"]["file"].startswith("#block")
                    (b0,) = d["bitmaps"]
                    assert b0["count"] == 1 << 20 and len(b0["heat"]) == 128
                    hot = [i for i, x in enumerate(b0["heat"]) if x > 0]
                    assert hot == list(range(96, 112))  # 6M..7M of 8M
                    assert first["events"] == []

                    reply, _ = await client.execute({"execute": "blockdev-backup", "arguments": {
                        "device": "d", "target": "t", "sync": "full", "job-id": "j", "speed": 1}})
                    assert reply == {"return": {}}
                    # the next push shows the job; nobody asked for it
                    while True:
                        snap = json.loads(await live.receive_str(timeout=10))
                        if snap["jobs"]:
                            break
                    (job,) = snap["jobs"]
                    assert job["id"] == "j" and job["type"] == "backup" and job["total"] == SIZE
                    assert job["speed"] == 1 and job["finished"] is False
                    assert snap["events"][0]["event"] == "JOB_STATUS_CHANGE"

                    # buttons: a token is required, and they go through the dispatcher
                    async with http.post(wd.url + "api/jobs/j/pause") as resp:
                        assert resp.status == 401
                    auth = {"Authorization": f"Bearer {TOKEN}"}
                    async with http.post(wd.url + "api/jobs/j/pause", headers=auth) as resp:
                        assert (resp.status, await resp.json()) == (200, {"return": {}})
                    msgs = []
                    while not msgs or msgs[-1].get("data") != {"id": "j", "status": "paused"}:
                        msgs.append(json.loads(await asyncio.wait_for(client.reader.readline(), 10)))
                    async with http.post(wd.url + "api/jobs/nosuch/resume", headers=auth) as resp:
                        assert resp.status == 409
                        assert await resp.json() == {"error": {"class": "GenericError", "desc": "Job not found"}}
                    async with http.post(wd.url + "api/jobs/j/explode", headers=auth) as resp:
                        assert resp.status == 404
                    async with http.post(wd.url + "api/jobs/j/cancel", headers=auth) as resp:
                        assert resp.status == 200
                    while True:
                        snap = json.loads(await live.receive_str(timeout=10))
                        if snap["jobs"] and snap["jobs"][0]["finished"]:
                            break
                    assert snap["jobs"][0]["outcome"] == "cancelled"
                async with http.get(wd.url + "api/state") as resp:
                    state = await resp.json()
                    assert state["jobs"][0]["id"] == "j" and state["jobs"][0]["outcome"] == "cancelled"
            metrics = wd.web.metrics.render().decode()
            assert 'qmpd_qmp_requests_total{command="job-pause",outcome="ok"} 1.0' in metrics
            assert 'qmpd_qmp_requests_total{command="job-resume",outcome="GenericError"} 1.0' in metrics
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_assets_are_served_from_the_package(sock_dir: Path) -> None:
    async with web_daemon(sock_dir) as wd:
        async with aiohttp.ClientSession() as http:
            async with http.get(wd.url) as resp:
                page = await resp.text()
            assert "/static/dashboard.js" in page and "http" not in page.replace('href="/', "")
            for asset in ("dashboard.js", "dashboard.css"):
                async with http.get(wd.url + "static/" + asset) as resp:
                    assert resp.status == 200
                    assert "//cdn" not in await resp.text()


@pytest.mark.asyncio
async def test_snapshot_lists_backends_and_devices(sock_dir: Path, tmp_path: Path) -> None:
    """``-drive`` BlockBackends and ``-device``s, as the CLI's start-up plan
    builds them: named, implicit (``if=virtio``) and anonymous (``drive=NODE``)."""
    for name in ("a.img", "b.img", "c.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(1 << 20)
    plan = StartupPlan(
        blockdevs=[f'{{"driver": "raw", "node-name": "disk2", "file": {{"driver": "file", '
                   f'"filename": "{tmp_path / "c.img"}"}}}}'],
        drives=[f"if=none,id=drive0,file={tmp_path / 'a.img'},format=raw,node-name=disk0",
                f"if=virtio,file={tmp_path / 'b.img'},format=raw,node-name=disk1"],
        devices=["virtio-blk-pci,drive=drive0,id=vda", "virtio-scsi-pci,id=scsi0",
                 "scsi-hd,drive=disk2,id=sd0"])
    async with web_daemon(sock_dir, plan=plan) as wd:
        async with aiohttp.ClientSession() as http:
            async with http.get(wd.url + "api/state") as resp:
                state = await resp.json()
    backends = [(b["name"], b["root"], b["device"] and (b["device"]["id"], b["device"]["model"],
                                                         b["device"]["path"])) for b in state["backends"]]
    assert backends == [
        ("drive0", "disk0", ("vda", "virtio-blk-pci", "/machine/peripheral/vda")),
        ("virtio0", "disk1", (None, "virtio-blk-pci", "/machine/peripheral-anon/device[0]")),
        ("", "disk2", ("sd0", "scsi-hd", "/machine/peripheral/sd0")),   # anonymous: drive=NODE
    ]
    assert state["backends"][0]["device"]["qdev"] == "/machine/peripheral/vda/virtio-backend"
    assert state["backends"][0]["io_status"] == "ok"
    devices = [(d["id"], d["model"], d["path"], d["backend"]) for d in state["devices"]]
    assert devices == [
        (None, "virtio-blk-pci", "/machine/peripheral-anon/device[0]", "virtio0"),
        ("vda", "virtio-blk-pci", "/machine/peripheral/vda", "drive0"),
        ("scsi0", "virtio-scsi-pci", "/machine/peripheral/scsi0", None),
        ("sd0", "scsi-hd", "/machine/peripheral/sd0", ""),
    ]
