"""Guest side: -drive parsing, run state, block_resize, blkdebug breakpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qmpd.bitmap.hbitmap import HBitmap
from qmpd.block import BlockGraph, run_qemu_io
from qmpd.errors import GenericError
from qmpd.events import EventBus
from qmpd.machine import Machine
from qmpd.machine.drive import parse_drive
from qmpd.qapi.service import SchemaService

K64 = 65536


def test_drive_default_names_and_children() -> None:
    idx: dict[str, int] = {}
    names = [parse_drive(f"if={i},file=/x.img,format=raw", idx).backend
             for i in ("virtio", "virtio", "ide", "ide", "ide", "scsi")]
    assert names == ["virtio0", "virtio1", "ide0-hd0", "ide0-hd1", "ide1-hd0", "scsi0-hd0"]
    spec = parse_drive("if=virtio,id=drive0,file=blkdebug::/t.img,format=raw,cache=writeback,aio=threads,"
                       "node-name=source", {})
    assert spec.options == {
        "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": "/t.img", "aio": "threads"}},
        "driver": "raw", "node-name": "source",
        "cache": {"direct": "off", "no-flush": "off"}, "discard": "ignore"}
    none = parse_drive("if=none,file=/t.img,format=raw,cache=none,file.locking=off,werror=stop", {})
    assert none.options is not None and none.options["cache"]["direct"] == "on"
    assert none.options["file"] == {"driver": "file", "filename": "/t.img", "locking": "off"}
    assert (none.werror, none.rerror, none.writeback) == ("stop", "report", True)
    assert parse_drive("if=none,file=/t.img,cache=writethrough", {}).writeback is False
    assert parse_drive("if=ide,media=cdrom", {"ide": 3}).backend == "ide1-cd1"
    empty = parse_drive("if=ide,media=cdrom,id=cd", {})
    assert empty.options is None and empty.media == "cdrom"
    with pytest.raises(GenericError, match="invalid cache option"):
        parse_drive("file=/x,cache=bogus", {})


def test_hbitmap_truncate() -> None:
    hb = HBitmap(4 * K64, K64)
    hb.set(0, 4 * K64)
    hb.truncate(2 * K64 + 1)
    assert (hb.size, hb.count(), hb.nbits) == (2 * K64 + 1, 3, 3)
    hb.truncate(8 * K64)
    assert hb.count() == 3 and not hb.get(5 * K64)


@pytest.mark.asyncio
async def test_runstate_events_and_drives(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    events: list[tuple[str, Any]] = []
    bus = EventBus()
    bus.subscribe(lambda msg: events.append((msg["event"], msg.get("data"))))
    graph = BlockGraph()
    m = Machine(graph, bus, prelaunch=True)
    assert m.runstate.info() == {"status": "prelaunch", "running": False}
    m.runstate.stop()
    m.runstate.cont()
    m.runstate.cont()
    m.runstate.stop()
    m.runstate.stop()
    assert [e[0] for e in events] == ["RESUME", "STOP"]
    assert all(e[1] is None for e in events)
    schema = SchemaService.load()
    await m.add_drive(f"if=none,id=drive0,file={img},format=raw,node-name=disk0", schema)
    dev = m.add_device("virtio-blk,drive=drive0,id=vblk0")
    assert dev.qdev == "/machine/peripheral/vblk0/virtio-backend"
    assert graph.lookup("drive0").node_name == "disk0"       # BlockBackend first
    assert m.qom_get("/machine/peripheral/vblk0", "drive") == "drive0"
    with pytest.raises(GenericError, match="conflicts with an existing node name"):
        await m.add_drive(f"if=none,id=disk0,file={img},format=raw", schema)
    with pytest.raises(GenericError, match="in use"):
        m.add_device("virtio-blk-pci,drive=drive0")
    await graph.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_block_resize_bitmaps_follow(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(4 * K64)
    graph = BlockGraph()
    node = await graph.add({"driver": "raw", "node-name": "d0",
                            "file": {"driver": "file", "filename": str(img)}})
    bm = node.bitmaps.add("b0", granularity=K64)
    await run_qemu_io(node, "write -P 0x11 0 256k")
    assert bm.count == 4 * K64
    await graph.resize(node, 2 * K64 + 512)
    assert (node.length, img.stat().st_size, bm.count, bm.size) == (2 * K64 + 512,) * 2 + (3 * K64, 2 * K64 + 512)
    await graph.resize(node, 8 * K64)
    assert (node.length, bm.count) == (8 * K64, 3 * K64)
    assert "wrote 65536/65536 bytes at offset 458752" in await run_qemu_io(node, "write 448k 64k")
    await graph.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_blkdebug_breakpoint_holds_a_request(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(4 * K64)
    graph = BlockGraph()
    node = await graph.add({"driver": "raw", "node-name": "d0", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(img)}}})
    assert await run_qemu_io(node, "break read_aio bp0") == ""
    assert await run_qemu_io(node, "break nonsense bp0") == "break: No such file or directory\n"
    reader = asyncio.ensure_future(node.read(0, K64))
    assert await run_qemu_io(node, "wait_break bp0") == ""
    assert not reader.done()
    assert await run_qemu_io(node, "resume nope") == "resume: No such file or directory\n"
    assert await run_qemu_io(node, "resume bp0") == ""
    assert await reader == bytes(K64)
    # one-shot: the next read passes; remove_break of a used tag finds nothing
    assert await node.read(0, 512) == bytes(512)
    assert await run_qemu_io(node, "remove_break bp0") == "remove_break: No such file or directory\n"
    await run_qemu_io(node, "break write_aio bp1")
    writer = asyncio.ensure_future(node.write(0, b"\x01" * 512))
    await run_qemu_io(node, "wait_break bp1")
    assert await run_qemu_io(node, "remove_break bp1") == ""
    await writer
    raw = await graph.add({"driver": "raw", "node-name": "plain", "file": {
        "driver": "file", "filename": str(img)}})
    assert await run_qemu_io(raw, "break read_aio x") == "break: Operation not supported\n"
    await graph.close()
