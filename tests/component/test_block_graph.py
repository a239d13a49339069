"""BlockGraph: blockdev-add / blockdev-del rules and texts (spec 2.7, 2.8)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from qmpd.block import BlockGraph, NodeInUse, NodeNameError, NodeNotFound, NodeOpenError
from qmpd.block.graph import MAX_NODE_NAME
from qmpd.commands.views import block_device_info, named_block_nodes

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SIZE = 1 << 20


def image(tmp_path: Path, name: str = "a.img", size: int = SIZE) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def raw_opts(path: str, name: str = "drive0", **extra: Any) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": path}, **extra}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_add_raw_over_file_creation_order_and_auto_name(tmp_path: Path) -> None:
    g = BlockGraph(rng=random.Random(1))
    node = await g.add(raw_opts(image(tmp_path)))
    names = g.names()
    # as in QEMU 7.2: the parent is listed before its inline file child
    assert names[0] == "drive0"
    child = g.get(names[1])
    assert child is not None and node.children == {"file": child}
    assert names[1].startswith("#block1") and len(names[1]) == len("#block1") + 2
    assert child.auto_named and not child.owned_by_monitor
    assert node.owned_by_monitor and not node.auto_named
    assert child.parents == [node]
    assert node.length == SIZE and node.drv == "raw"
    # counter increments across adds; the newest add is listed first
    await g.add(raw_opts(image(tmp_path, "b.img"), "drive1"))
    assert g.names()[0] == "drive1" and g.names()[1].startswith("#block2")
    assert g.names()[2:] == names


async def test_root_node_name_mandatory(tmp_path: Path) -> None:
    g = BlockGraph()
    with pytest.raises(NodeNameError) as ei:
        await g.add({"driver": "file", "filename": image(tmp_path)})
    assert ei.value.desc == "'node-name' must be specified for the root node"
    assert ei.value.to_wire()["class"] == "GenericError"


@pytest.mark.parametrize("name", ["1abc", "", "a b", "#block1", "a/b", "é"])
async def test_invalid_node_name(tmp_path: Path, name: str) -> None:
    g = BlockGraph()
    with pytest.raises(NodeNameError) as ei:
        await g.add(raw_opts(image(tmp_path), name))
    assert ei.value.desc == f"Invalid node-name: '{name}'"


async def test_name_length_and_charset(tmp_path: Path) -> None:
    g = BlockGraph()
    ok = "a" + "Z9-._" * 6  # 31 chars
    assert len(ok) == MAX_NODE_NAME
    await g.add(raw_opts(image(tmp_path), ok))
    with pytest.raises(NodeNameError) as ei:
        await g.add(raw_opts(image(tmp_path, "b.img"), "b" * 32))
    assert ei.value.desc == "Node name too long"


async def test_duplicate_and_device_conflict(tmp_path: Path) -> None:
    g = BlockGraph(device_names=lambda: {"dev0"})
    path = image(tmp_path)
    await g.add(raw_opts(path))
    before = g.names()
    with pytest.raises(NodeNameError) as ei:
        await g.add(raw_opts(path))
    assert ei.value.desc == "Duplicate nodes with node-name='drive0'"
    with pytest.raises(NodeNameError) as ei:
        await g.add(raw_opts(path, "dev0"))
    assert ei.value.desc == "node-name=dev0 is conflicting with a device id"
    # duplicate is checked before length
    with pytest.raises(NodeNameError) as ei:
        await g.add({"driver": "raw", "node-name": "x", "file": {
            "driver": "file", "filename": path, "node-name": "x"}})
    assert ei.value.desc == "Duplicate nodes with node-name='x'"
    assert g.names() == before


async def test_missing_file_leaves_nothing(tmp_path: Path) -> None:
    g = BlockGraph()
    fds = open_fds()
    missing = str(tmp_path / "nope.img")
    with pytest.raises(NodeOpenError) as ei:
        await g.add(raw_opts(missing))
    assert ei.value.desc == f"Could not open '{missing}': No such file or directory"
    assert g.names() == [] and open_fds() == fds
    # the name is free again
    await g.add(raw_opts(image(tmp_path)))


async def test_failure_after_child_opened_closes_it(tmp_path: Path) -> None:
    g = BlockGraph()
    fds = open_fds()
    path = image(tmp_path, size=4096)
    with pytest.raises(NodeOpenError) as ei:
        await g.add(raw_opts(path, size=8192))
    assert ei.value.desc == (
        "The sum of offset (0) and size (8192) has to be smaller or equal to the "
        " actual size of the containing file (4096)"
    )
    with pytest.raises(NodeOpenError) as ei:
        await g.add(raw_opts(path, offset=8192))
    assert ei.value.desc == "Offset (8192) cannot be greater than size of the containing file (4096)"
    with pytest.raises(NodeOpenError) as ei:
        await g.add(raw_opts(path, size=1000))
    assert ei.value.desc == "Specified size is not multiple of 512"
    assert g.names() == [] and open_fds() == fds


async def test_raw_window(tmp_path: Path) -> None:
    g = BlockGraph()
    path = image(tmp_path, size=8192)
    node = await g.add(raw_opts(path, offset=1024, size=4096))
    assert node.length == 4096
    await node.write(0, b"\x11" * 4096)
    with open(path, "rb") as f:
        data = f.read()
    assert data[:1024] == bytes(1024) and data[1024:5120] == b"\x11" * 4096
    assert data[5120:] == bytes(3072)


async def test_read_only_file_opened_rdonly(tmp_path: Path) -> None:
    path = image(tmp_path)
    os.chmod(path, 0o444)
    g = BlockGraph()
    if os.geteuid() != 0:
        with pytest.raises(NodeOpenError) as ei:
            await g.add(raw_opts(path))
        assert ei.value.desc == f"Could not open '{path}': Permission denied"
    node = await g.add(raw_opts(path, "ro0", **{"read-only": True}))
    child = node.children["file"]
    assert node.read_only and child.read_only  # inherited
    assert block_device_info(node)["ro"] is True


async def test_child_by_name_and_del_order(tmp_path: Path) -> None:
    g = BlockGraph()
    path = image(tmp_path)
    f = await g.add({"driver": "file", "node-name": "f0", "filename": path})
    r = await g.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    assert r.children["file"] is f and f.owned_by_monitor
    assert f.discard_mode == "ignore"  # no inheritance for named children
    with pytest.raises(NodeNotFound) as ei:
        await g.add({"driver": "raw", "node-name": "r1", "file": "nope"})
    assert ei.value.desc == "Cannot find device='nope' nor node-name='nope'"
    with pytest.raises(NodeNotFound) as ei:
        await g.delete("zz")
    assert ei.value.desc == "Failed to find node with node-name='zz'"
    with pytest.raises(NodeInUse) as ei:
        await g.delete("f0")
    assert ei.value.desc == "Block device f0 is in use"
    await g.delete("r0")
    assert g.names() == ["f0"] and f.parents == []
    await g.delete("f0")
    assert g.names() == []


async def test_del_refusals_in_order(tmp_path: Path) -> None:
    g = BlockGraph()
    node = await g.add(raw_opts(image(tmp_path)))
    child_name = g.names()[1]
    with pytest.raises(NodeInUse) as ei:
        await g.delete(child_name)
    assert ei.value.desc == f"Node {child_name} is not owned by the monitor"
    # op blocker beats "not owned" and "in use"
    child = g.get(child_name)
    assert child is not None
    child.add_blocker("block device is in use by block job: backup")
    with pytest.raises(NodeInUse) as ei:
        await g.delete(child_name)
    assert ei.value.desc == (
        f"Node '{child_name}' is busy: block device is in use by block job: backup"
    )
    child.remove_blocker("block device is in use by block job: backup")
    # backend beats everything but lookup
    node.backend = "dev0"
    node.add_blocker("x")
    with pytest.raises(NodeInUse) as ei:
        await g.delete("drive0")
    assert ei.value.desc == "Node drive0 is in use"
    node.backend = None
    node.remove_blocker("x")
    node.hold()
    with pytest.raises(NodeInUse) as ei:
        await g.delete("drive0")
    assert ei.value.desc == "Block device drive0 is in use"
    node.release()
    fds = open_fds()
    await g.delete("drive0")
    assert g.names() == [] and open_fds() == fds - 1


async def test_lookup_flavours(tmp_path: Path) -> None:
    g = BlockGraph()
    node = await g.add(raw_opts(image(tmp_path)))
    assert g.lookup("drive0") is node and g.lookup_node("drive0") is node
    with pytest.raises(NodeNotFound) as ei:
        g.lookup("x")
    assert ei.value.desc == "Cannot find device='x' nor node-name='x'"
    with pytest.raises(NodeNotFound) as ei:
        g.lookup("x", device="")
    assert ei.value.desc == "Cannot find device='' nor node-name='x'"
    with pytest.raises(NodeNotFound) as ei:
        g.lookup_node("x")
    assert ei.value.desc == "Node 'x' not found"


async def test_inline_children_inherit(tmp_path: Path) -> None:
    g = BlockGraph()
    node = await g.add(raw_opts(image(tmp_path), cache={"direct": False, "no-flush": True}))
    child = node.children["file"]
    assert node.discard_mode == "ignore" and child.discard_mode == "unmap"
    assert child.cache_no_flush and node.cache_no_flush


async def test_detect_zeroes_unmap_needs_discard(tmp_path: Path) -> None:
    g = BlockGraph()
    with pytest.raises(NodeOpenError) as ei:
        await g.add(raw_opts(image(tmp_path), **{"detect-zeroes": "unmap"}))
    assert ei.value.desc == (
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    )
    node = await g.add(raw_opts(image(tmp_path), **{"detect-zeroes": "unmap", "discard": "unmap"}))
    assert block_device_info(node)["detect_zeroes"] == "unmap"


async def test_null_drivers(tmp_path: Path) -> None:
    g = BlockGraph()
    n = await g.add({"driver": "null-co", "node-name": "n0"})
    assert n.length == 1 << 30
    assert await n.read(0, 16) == bytes(16)
    await n.write(0, b"x" * 16)
    assert await n.block_status(0, 4096) == (True, 4096)
    z = await g.add({"driver": "null-aio", "node-name": "n1", "size": 65536,
                     "read-zeroes": True, "latency-ns": 1000})
    assert z.length == 65536 and await z.block_status(0, 1 << 20) == (False, 65536)
    # QEMU 7.2 lists actual-size 0, and a json: filename once size/read-zeroes are given
    assert block_device_info(z)["drv"] == "null-aio" and block_device_info(z)["image"]["actual-size"] == 0
    assert block_device_info(z)["file"] == 'json:{"read-zeroes": true, "driver": "null-aio", "size": 65536}'
    assert block_device_info(n)["file"] == "null-co://"


async def test_info_shape(tmp_path: Path) -> None:
    g = BlockGraph()
    node = await g.add(raw_opts(image(tmp_path)))
    info = block_device_info(node)
    assert list(info) == [
        "file", "node-name", "ro", "drv", "backing_file_depth", "encrypted", "detect_zeroes",
        "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "image", "cache",
        "write_threshold",
    ]
    assert info["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    assert info["image"]["format"] == "raw" and info["image"]["virtual-size"] == SIZE
    assert "dirty-bitmaps" not in info
    node.bitmaps.add("b0")
    node.bitmaps.add("b1")
    assert [b["name"] for b in block_device_info(node, flat=True)["dirty-bitmaps"]] == ["b1", "b0"]
    assert [i["node-name"] for i in named_block_nodes(g)] == g.names()


async def test_graph_close(tmp_path: Path) -> None:
    g = BlockGraph()
    fds = open_fds()
    f = await g.add({"driver": "file", "node-name": "f0", "filename": image(tmp_path)})
    await g.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    await g.add(raw_opts(image(tmp_path, "b.img")))
    assert f.parents
    await g.close()
    assert len(g) == 0 and open_fds() == fds
