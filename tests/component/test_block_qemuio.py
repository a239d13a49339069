"""qemu-io command parsing and messages (spec 2.9)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from qmpd.block import BlockGraph, BlockNode, ReadOnlyNode, run_qemu_io

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SIZE = 4 << 20


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[BlockNode]:
    path = tmp_path / "a.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    g = BlockGraph()
    yield await g.add({"driver": "raw", "node-name": "drive0",
                       "file": {"driver": "file", "filename": str(path)}})
    await g.close()


WRITE_USAGE = ("write [-bcCfnquz] [-P pattern | -s source_file] off len -- "
               "writes a number of bytes at a specified offset\n")
READ_USAGE = ("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
              "reads a number of bytes at a specified offset\n")


@pytest.mark.parametrize(("cmd", "out"), [
    ("write -z -P 1 0 512", "Only one of -z, -P, and -s can be specified at the same time\n"),
    ("write -u 0 512", "-u requires -z to be specified\n"),
    ("write -n 0 512", "-n requires -z to be specified\n"),
    ("write -b -z 0 512", "-b and -z cannot be specified at the same time\n"),
    ("write -f -c 0 512", "-f and -b or -c cannot be specified at the same time\n"),
    ("write -P 256 0 512", "256 is not a valid pattern byte\n"),
    ("write -P x 0 512", "x is not a valid pattern byte\n"),
    ("write 0 512 3", WRITE_USAGE),
    ("write -x 0 512", "write: invalid option -- 'x'\n" + WRITE_USAGE),
    ("write 0 512 -P", "write: option requires an argument -- 'P'\n" + WRITE_USAGE),
    ("write zz 512", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- zz\n"),
    ("write 0 9E", "Parsing error: argument too large -- 9E\n"),
    ("write 0 4G", "length cannot exceed 2147483136, given 4G\n"),
    ("write -c 1 512", "1 is not a sector-aligned value for 'offset'\n"),
    ("write -c 0 512", "write failed: Operation not supported\n"),
    ("read -s 0 0 512", READ_USAGE),
    ("read -P 1 -l 1k 0 512", "pattern verification range exceeds end of read data\n"),
    ("write", "command write requires at least 2 argument(s)\n"),
    ("flush now", "command flush doesn't take any arguments\n"),
    ("frobnicate 1", 'command "frobnicate" not found\n'),
    ("", ""),
])
async def test_messages(node: BlockNode, cmd: str, out: str) -> None:
    assert await run_qemu_io(node, cmd) == out


async def test_options_after_operands_and_attached(node: BlockNode) -> None:
    assert (await run_qemu_io(node, "write 0 4k -P0x2a")).startswith("wrote 4096/4096")
    assert await run_qemu_io(node, "read 0 4k -q -P 42") == ""
    assert await run_qemu_io(node, "w -qP 0x2b 4k 4k") == ""
    assert await run_qemu_io(node, "r -qP43 4k 4k") == ""


async def test_csv_report_and_dump(node: BlockNode) -> None:
    out = await run_qemu_io(node, "write -C -P 0x41 0 16")
    assert out.startswith("16,1,") and out.count(",") == 4
    assert await run_qemu_io(node, "read -v -q 0 16") == ""
    out = await run_qemu_io(node, "read -v 0 20")
    assert out.startswith(
        "00000000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\n"
        "00000010:  00 00 00 00  ....\n"
        "read 20/20 bytes at offset 0\n20 bytes, 1 ops; ")


async def test_read_only_node_refused(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    g = BlockGraph()
    ro = await g.add({"driver": "raw", "node-name": "ro", "read-only": True,
                      "file": {"driver": "file", "filename": str(path)}})
    with pytest.raises(ReadOnlyNode) as ei:
        await run_qemu_io(ro, "write 0 512")
    assert ei.value.desc == "Block node is read-only"
    with pytest.raises(ReadOnlyNode):
        await run_qemu_io(ro, "discard 0 512")
    assert (await run_qemu_io(ro, "read 0 512")).startswith("read 512/512")
    assert await run_qemu_io(ro, "flush") == ""
    await g.close()
