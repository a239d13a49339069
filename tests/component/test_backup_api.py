"""blockdev-backup / drive-backup / blockdev-create: every refusal of spec
4.1, 4.8 and the API failure matrix of 7.6, each leaving nothing changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qmpd.bitmap import DirtyBitmap
from qmpd.commands.backup import blockdev_create
from qmpd.errors import GenericError
from qmpd.qapi.models import BlockdevCreateArgs
from qmpd.commands.views import job_info
from tests.component.backup_env import CLUSTER, MiB, BackupEnv, read
from tests.component.test_job_helpers import jsc

SIZE = 4 * MiB

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def world(tmp_path: Path) -> tuple[BackupEnv, DirtyBitmap]:
    env = BackupEnv(tmp_path)
    src = await env.node("drive0", SIZE)
    await env.node("backup_target", SIZE)
    bm = src.bitmaps.add("bitmap0", CLUSTER)
    bm.hbitmap.set(0, CLUSTER)
    return env, bm


async def refused(env: BackupEnv, text: str, drive: bool = False, **args: Any) -> None:
    before = env.state()
    with pytest.raises(GenericError) as err:
        await (env.drive_backup if drive else env.backup)(**args)
    assert err.value.desc == text
    assert env.state() == before


# ---------------------------------------------------------------- spec 7.6

MATRIX: list[tuple[str, str | None, str | None, str]] = []
for _mode in (None, "on-success", "always", "never"):
    MATRIX.append(("incremental", None, _mode, "must provide a valid bitmap name for 'incremental' sync mode"))
    MATRIX.append(("bitmap", None, _mode, "must provide a valid bitmap name for 'bitmap' sync mode"))
    MATRIX.append(("bitmap", "bitmap404", _mode, "Bitmap 'bitmap404' could not be found"))
for _mode in (None, "on-success"):
    MATRIX.append(("incremental", "bitmap404", _mode, "Bitmap 'bitmap404' could not be found"))
for _bm in ("bitmap404", "bitmap0"):
    for _mode in ("always", "never"):
        MATRIX.append(("incremental", _bm, _mode,
                       "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"))
MATRIX.append(("bitmap", "bitmap0", None, "Bitmap sync mode must be given when providing a bitmap"))
for _sync in ("full", "top", "none"):
    for _mode in ("on-success", "always", "never"):
        MATRIX.append((_sync, None, _mode, "Cannot specify bitmap sync mode without a bitmap"))
    for _mode in (None, "on-success", "always", "never"):
        MATRIX.append((_sync, "bitmap404", _mode, "Bitmap 'bitmap404' could not be found"))
    MATRIX.append((_sync, "bitmap0", None, "Bitmap sync mode must be given when providing a bitmap"))
for _sync in ("full", "top"):
    MATRIX.append((_sync, "bitmap0", "never",
                   f"Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{_sync}'"))
for _mode in ("on-success", "always", "never"):
    MATRIX.append(("none", "bitmap0", _mode, "sync mode 'none' does not produce meaningful bitmap outputs"))


@pytest.mark.parametrize("sync,bitmap,mode,text", MATRIX)
async def test_api_failure_matrix(tmp_path: Path, sync: str, bitmap: str | None, mode: str | None,
                                  text: str) -> None:
    env, _ = await world(tmp_path)
    args: dict[str, Any] = {"device": "drive0", "target": "backup_target", "sync": sync, "job_id": "api_job"}
    if bitmap is not None:
        args["bitmap"] = bitmap
    if mode is not None:
        args["bitmap_mode"] = mode
    await refused(env, text, **args)


# ---------------------------------------------------------------- spec 4.1 step 3, 5

BASE = {"device": "drive0", "target": "backup_target", "sync": "full", "job_id": "j"}


@pytest.mark.parametrize("change,text", [
    ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"device": "nope", "target": "nope2"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"target": "drive0"}, "Source and target cannot be the same"),
    ({"compress": True}, "Compression is not supported for this drive "),
    ({"x_perf": {"max_workers": 0}}, "max-workers must be between 1 and 2147483647"),
    ({"x_perf": {"max_workers": 2**31}}, "max-workers must be between 1 and 2147483647"),
    ({"x_perf": {"max_chunk": -1}}, "max-chunk must be zero (which means no limit) or positive"),
    ({"target": "small"}, "Source and target image have different sizes"),
    ({"filter_node_name": "1bad"}, "Could not create node: Invalid node-name: '1bad'"),
    ({"filter_node_name": "backup_target"},
     "Could not create node: Duplicate nodes with node-name='backup_target'"),
    ({"filter_node_name": "x" * 32}, "Could not create node: Node name too long"),
    ({"x_perf": {"max_chunk": 4096}}, "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ({"job_id": None}, "Invalid job ID ''"),
    ({"job_id": "0bad"}, "Invalid job ID '0bad'"),
    ({"bitmap": "bitmap0", "bitmap_mode": "on-success", "target": "small"},
     "Source and target image have different sizes"),
    ({"bitmap": "bitmap0", "bitmap_mode": "always", "x_perf": {"max_chunk": 1}},
     "Required max-chunk (1) is less than backup cluster size (65536)"),
])
async def test_refusals_change_nothing(tmp_path: Path, change: dict[str, Any], text: str) -> None:
    env, bm = await world(tmp_path)
    await env.node("small", SIZE // 2)
    args = {**BASE, **change}
    args = {k: v for k, v in args.items() if v is not None}
    await refused(env, text, **args)
    assert not bm.busy and bm.successor is None


async def test_job_id_in_use_and_busy_target(tmp_path: Path) -> None:
    env, bm = await world(tmp_path)
    await env.node("t2", SIZE)
    await env.node("t3", SIZE)
    await env.backup(**BASE, speed=1, bitmap="bitmap0", bitmap_mode="on-success")
    await refused(env, "Job ID 'j' already in use", device="drive0", target="t2", sync="full", job_id="j")
    await refused(env, "Node 'backup_target' is busy: block device is in use by block job: backup",
                  device="t2", target="backup_target", sync="full", job_id="k")
    await refused(env, "Bitmap 'bitmap0' is currently in use by another operation and cannot be used",
                  device="drive0", target="t3", sync="bitmap", bitmap="bitmap0", bitmap_mode="never",
                  job_id="k")
    filt = [n.node_name for n in env.graph if n.drv == "copy-before-write"]
    assert len(filt) == 1 and filt[0].startswith("#block")
    await refused(env, f"Node '{filt[0]}' is busy: block device is in use by block job: backup",
                  device=filt[0], target="t3", sync="full", job_id="k")
    await env.jobs.cancel(env.jobs.find_job("j"), force=True)
    await env.wait_status("j", "null")


async def test_target_is_another_backups_source(tmp_path: Path) -> None:
    """QEMU 7.2: the running backup's filter unshares 'write' on its source, so
    a second backup cannot write there; refused before the job ID is checked
    (tools/differential.py seed 55)."""
    env, _ = await world(tmp_path)
    await env.node("t2", SIZE)
    await env.backup(**BASE, speed=1)
    filt = next(n.node_name for n in env.graph if n.drv == "copy-before-write")
    conflict = ("Could not create node: Permission conflict on node 'drive0': permissions 'write' are "
                "both required by node '{}' (uses node 'drive0' as 'target' child) and unshared by "
                f"node '{filt}' (uses node 'drive0' as 'file' child).")
    await refused(env, conflict.format("flt"), device="t2", target="drive0", sync="none", job_id="j",
                  filter_node_name="flt")
    before = env.state()
    with pytest.raises(GenericError) as err:
        await env.backup(device="t2", target="drive0", sync="none", job_id="k")
    auto = err.value.desc.split("required by node '")[1].split("'")[0]
    assert auto.startswith("#block") and auto != filt and err.value.desc == conflict.format(auto)
    assert env.state() == before
    await env.jobs.cancel(env.jobs.find_job("j"), force=True)
    await env.wait_status("j", "null")
    await env.backup(device="t2", target="drive0", sync="none", job_id="k", speed=1)  # free again
    await env.jobs.cancel(env.jobs.find_job("k"), force=True)
    await env.wait_status("k", "null")


async def test_negative_speed_created_then_null(tmp_path: Path) -> None:
    env, bm = await world(tmp_path)
    before_nodes = env.graph.names()
    with pytest.raises(GenericError) as err:
        await env.backup(**BASE, speed=-1, bitmap="bitmap0", bitmap_mode="always")
    assert err.value.desc == "Parameter 'speed' expects a non-negative value"
    assert env.events.take() == jsc("j", "created", "null")
    assert env.graph.names() == before_nodes and not bm.busy and env.jobs.jobs == []
    assert [b.name for b in env.graph.get("drive0").bitmaps] == ["bitmap0"]  # type: ignore[union-attr]


# ---------------------------------------------------------------- drive-backup (spec 4.8)


async def test_drive_backup_texts(tmp_path: Path) -> None:
    env, _ = await world(tmp_path)
    tgt = str(tmp_path / "new.img")
    await refused(env, "Backing file not supported for file format 'raw'", drive=True,
                  device="drive0", target=tgt, sync="none", job_id="d")
    existing = env.make_file("exist.img", SIZE)
    before = env.graph.names()
    with pytest.raises(GenericError) as err:
        await env.drive_backup(device="drive0", target=str(existing), sync="none", mode="existing", job_id="d")
    assert err.value.desc.startswith("Driver 'raw' of node '#block")
    assert err.value.desc.endswith("' does not support backing files")
    assert env.graph.names() == before
    await refused(env, "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'",
                  drive=True, device="drive0", target=tgt, sync="top", bitmap="bitmap0", bitmap_mode="never",
                  job_id="d")
    await refused(env, "Could not open '/nonexistent/x.img': No such file or directory", drive=True,
                  device="drive0", target="/nonexistent/x.img", sync="full", mode="existing", job_id="d")
    await refused(env, "Cannot find device='zz' nor node-name='zz'", drive=True, device="zz", target=tgt,
                  sync="full")


async def test_drive_backup_truncates_and_closes(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    data = {0: b"\x11" * CLUSTER, 3 * MiB: b"\x22" * CLUSTER}
    await env.node("drive0", SIZE, data)
    tgt = env.make_file("t.img", 3 * SIZE, {SIZE: b"junk"})
    before = env.graph.names()
    await env.drive_backup(device="drive0", target=str(tgt), sync="top", job_id="d", auto_dismiss=False)
    await env.wait_status("d", "concluded")
    assert read(tgt) == read(tmp_path / "drive0.img")
    assert env.graph.names() == before  # the auto-named target nodes are gone
    assert env.finished("d") == ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "d", "len": SIZE,
                                                          "offset": SIZE, "speed": 0})


async def test_drive_backup_target_listed_during_job(tmp_path: Path) -> None:
    env, _ = await world(tmp_path)
    before = env.graph.names()
    await env.drive_backup(device="drive0", target=str(tmp_path / "n.img"), sync="full", job_id="d", speed=1)
    auto = [n for n in env.graph if n.node_name not in before]
    assert all(n.node_name.startswith("#block") for n in auto)
    assert sorted(n.drv for n in auto) == ["copy-before-write", "file", "raw"]
    raw = next(n for n in auto if n.drv == "raw")
    assert raw.discard_mode == "unmap" and raw.detect_zeroes == "unmap"
    await env.jobs.cancel(env.jobs.find_job("d"), force=True)
    await env.wait_status("d", "null")
    assert env.graph.names() == before


# ---------------------------------------------------------------- blockdev-create


async def test_blockdev_create(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    path = env.make_file("c.img", 10, {0: b"x" * 10})
    args = BlockdevCreateArgs.model_validate(
        {"job-id": "c", "options": {"driver": "file", "filename": str(path), "size": SIZE}})
    await blockdev_create(env.ctx, args)
    await env.wait_status("c", "concluded")
    assert env.events.take() == jsc("c", "created", "running", "waiting", "pending", "concluded")
    assert read(path) == bytes(SIZE)
    job = env.jobs.find_job("c")
    assert job_info(job) == {"id": "c", "type": "create", "status": "concluded",
                              "current-progress": 1, "total-progress": 1}
    env.jobs.dismiss(job)
    assert env.events.take() == jsc("c", "null")


@pytest.mark.parametrize("driver", ["raw", "null-co", "blkdebug", "copy-before-write"])
async def test_blockdev_create_other_drivers_refused(tmp_path: Path, driver: str) -> None:
    """As QEMU 7.2 (recorded from qemu-storage-daemon): no job, GenericError."""
    env = BackupEnv(tmp_path)
    args = BlockdevCreateArgs.model_validate({"job-id": "c", "options": {"driver": driver}})
    with pytest.raises(GenericError, match="^Driver does not support blockdev-create$"):
        await blockdev_create(env.ctx, args)
    assert env.jobs.jobs == [] and env.events.take() == []


async def test_blockdev_create_failure(tmp_path: Path) -> None:
    env = BackupEnv(tmp_path)
    args = BlockdevCreateArgs.model_validate(
        {"job-id": "c", "options": {"driver": "file", "filename": "/nonexistent/d/x", "size": SIZE}})
    await blockdev_create(env.ctx, args)
    await env.wait_status("c", "concluded")
    assert job_info(env.jobs.find_job("c"))["error"] == \
        "Could not create '/nonexistent/d/x': No such file or directory"
    assert "aborting" in env.events.statuses("c")
