"""blkdebug rules, state machine and events (spec 6, 7.4)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from qmpd.block import BlockGraph, BlockIOError, BlockNode, run_qemu_io
from qmpd.block.drivers.blkdebug import BlkdebugDriver

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SIZE = 64 << 20
K64 = 65536


async def debug_drive(
    tmp_path: Path, inject: list[dict[str, Any]] | None = None,
    set_state: list[dict[str, Any]] | None = None,
) -> tuple[BlockGraph, BlockNode, BlkdebugDriver]:
    path = tmp_path / "a.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    dbg: dict[str, Any] = {"driver": "blkdebug", "node-name": "dbg",
                           "image": {"driver": "file", "filename": str(path)}}
    if inject is not None:
        dbg["inject-error"] = inject
    if set_state is not None:
        dbg["set-state"] = set_state
    g = BlockGraph()
    node = await g.add({"driver": "raw", "node-name": "drive0", "file": dbg})
    drv = g.lookup("dbg").driver
    assert isinstance(drv, BlkdebugDriver)
    return g, node, drv


CONFIG_257 = {
    "set_state": [{"event": "flush_to_disk", "state": 1, "new_state": 2},
                  {"event": "read_aio", "state": 2, "new_state": 3}],
    "inject": [{"event": "read_aio", "errno": 5, "state": 3,
                "immediately": False, "once": True}],
}


async def test_iotest_257_configuration(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(tmp_path, **CONFIG_257)
    assert drv.state == 1
    # reads and writes before the flush do not change the state
    await run_qemu_io(node, "write -P0x65 0 64k")
    for _ in range(5):
        await node.read(0, K64)
    assert drv.state == 1
    # explicit flush after a write: flush_to_disk fires -> state 2
    assert await run_qemu_io(node, "flush") == ""
    assert drv.state == 2
    # a second flush without writes does not raise flush_to_disk again
    await node.flush()
    assert drv.state == 2
    # first read succeeds and moves to 3
    assert await node.read(0, K64) == b"\x65" * K64
    assert drv.state == 3
    # second read: error activated by read_aio in state 3, fails once
    with pytest.raises(BlockIOError) as ei:
        await node.read(0xF0000, 2 * K64)
    assert ei.value.errno == errno.EIO
    assert drv.active_rules == []
    # the rule is gone: later reads succeed
    assert await node.read(0, K64) == b"\x65" * K64
    assert await run_qemu_io(node, "read -q -P0x65 0 64k") == ""
    await g.close()


async def test_flush_without_writes_does_not_arm(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(tmp_path, **CONFIG_257)
    await node.flush()
    assert drv.state == 1
    await g.close()


async def test_persistent_rule_and_iotype(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(
        tmp_path, inject=[{"event": "read_aio", "iotype": "write", "errno": 28}])
    await node.write(0, b"x" * 512)  # write_aio: no rule for it, nothing active
    await node.read(0, 512)  # activates the rule; this read itself is checked
    # ...but iotype write does not match a read
    with pytest.raises(BlockIOError) as ei:
        await node.write(0, b"y" * 512)
    assert ei.value.errno == errno.ENOSPC
    assert await run_qemu_io(node, "write 0 512") == "write failed: No space left on device\n"
    await node.write_zeroes(0, 512)  # write-zeroes is another iotype
    await g.close()


async def test_default_iotypes_exclude_block_status(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(tmp_path, inject=[{"event": "read_aio"}])
    with pytest.raises(BlockIOError):
        await node.read(0, 512)  # activated, then checked by the same read
    assert await node.block_status(0, 512) == (False, 512)
    for op in ("write 0 512", "write -z 0 512"):
        assert await run_qemu_io(node, op) == "write failed: Input/output error\n"
    await g.close()


async def test_sector_matching(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(
        tmp_path, inject=[{"event": "write_aio", "sector": 128}])
    await node.write(0, b"a" * 512)  # activates; sector 128 = byte 65536 not in [0, 512)
    await node.write(K64 + 512, b"a" * 512)
    with pytest.raises(BlockIOError):
        await node.write(K64 - 512, b"a" * 1024)
    with pytest.raises(BlockIOError):
        await node.read(K64, 1)
    await g.close()


async def test_set_state_first_listed_wins_and_state_filter(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(tmp_path, set_state=[
        {"event": "write_aio", "new_state": 5},
        {"event": "write_aio", "state": 1, "new_state": 7},
        {"event": "write_aio", "state": 5, "new_state": 9},
    ])
    await node.write(0, b"x")
    assert drv.state == 5  # evaluated against old state 1: first listed wins
    await node.write(0, b"x")
    assert drv.state == 5  # "any state" rule listed first again
    await g.close()


async def test_active_set_replaced_only_when_something_applies(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(
        tmp_path,
        inject=[{"event": "read_aio", "state": 1, "iotype": "flush", "errno": 5},
                {"event": "write_aio", "state": 2, "iotype": "flush", "errno": 28}],
        set_state=[{"event": "write_aio", "state": 1, "new_state": 2}])
    await node.read(0, 1)
    assert len(drv.active_rules) == 1
    await node.write(0, b"x")  # write_aio in state 1: only set-state applies
    assert drv.state == 2 and drv.active_rules[0].errno == 5
    with pytest.raises(BlockIOError) as ei:
        await node.flush()
    assert ei.value.errno == errno.EIO
    await node.write(0, b"x")  # write_aio in state 2 replaces the active set
    assert [r.errno for r in drv.active_rules] == [28]
    await g.close()


async def test_pwritev_events_on_blkdebug_node(tmp_path: Path) -> None:
    g, node, drv = await debug_drive(tmp_path, set_state=[
        {"event": "pwritev", "state": 1, "new_state": 2},
        {"event": "pwritev_done", "state": 2, "new_state": 3},
        {"event": "pwritev_zero", "state": 3, "new_state": 4},
        {"event": "pwritev_done", "state": 4, "new_state": 5},
        {"event": "flush_to_os", "state": 5, "new_state": 6},
    ])
    await node.write(0, b"x")
    assert drv.state == 3
    await node.write_zeroes(0, 512)
    assert drv.state == 5
    await node.flush()
    assert drv.state == 6
    await g.close()


async def test_iotest_257_configuration_under_qcow2(tmp_path: Path) -> None:
    """qcow2 raises ``read_aio`` on its file child for data reads only (as
    QEMU's qcow2_co_preadv_task), so 257's rules fail the second data read
    after a flush; reads of unallocated clusters raise nothing."""
    import subprocess

    path = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "64M"],
                   check=True, capture_output=True)
    g = BlockGraph()
    node = await g.add({"driver": "qcow2", "node-name": "drive0", "file": {
        "driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "file", "filename": str(path)},
        "inject-error": CONFIG_257["inject"], "set-state": CONFIG_257["set_state"]}})
    drv = g.lookup("dbg").driver
    assert isinstance(drv, BlkdebugDriver)
    await run_qemu_io(node, "write -P0x65 0 128k")
    assert await run_qemu_io(node, "flush") == ""
    assert drv.state == 2
    assert await node.read(K64 * 4, K64) == bytes(K64)  # unallocated: no event
    assert drv.state == 2
    assert await node.read(0, K64) == b"\x65" * K64      # read_aio -> state 3
    assert drv.state == 3
    with pytest.raises(BlockIOError) as ei:
        await node.read(K64, K64)
    assert ei.value.errno == errno.EIO
    assert await node.read(K64, K64) == b"\x65" * K64
    await g.close()
