"""The qcow2 driver against qemu-storage-daemon 7.2, the same commands sent
to both: ``block-dirty-bitmap-add persistent=true`` refusals come back in
QEMU's words (through bitmaps_ext.can_store_new), and a ``compress: true``
backup packs compressed clusters as QEMU does (compress.py): both images
check clean, equal the source, and are about the same size."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import AsyncRawClient, RunningDaemon
from tests.support.qsd import Qsd

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

MiB = 1 << 20


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


async def send(c: AsyncRawClient, command: str, **args: Any) -> dict[str, Any]:
    reply, _ = await c.execute({"execute": command, "arguments": args})
    return dict(reply)


async def until(c: AsyncRawClient, event: str) -> None:
    while json.loads(await asyncio.wait_for(c.reader.readline(), 60)).get("event") != event:
        pass


def blockdev(node: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": node, **extra,
            "file": {"driver": "file", "filename": str(path)}}


async def test_persistent_add_refusals_as_qemu(qmpd: RunningDaemon, tmp_path: Path) -> None:
    imgs: dict[str, tuple[str, list[str]]] = {
        "v3": ("64M", []), "v2": ("64M", ["-o", "compat=0.10"]), "ro": ("64M", []),
        "big": ("8T", [])}
    adds = []
    for side in ("q", "m"):
        for node, (size, opts) in imgs.items():
            path = tmp_path / f"{side}-{node}.qcow2"
            assert sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size).returncode == 0
            adds.append((side, blockdev(node, path, **({"read-only": True} if node == "ro" else {}))))
    cases = [("v2", "a", 65536), ("ro", "a", 65536), ("v3", "a", 65536), ("v3", "a", 65536),
             ("v3", "x" * 1023, 65536), ("v3", "y" * 1024, 65536), ("v3", "g31", 1 << 31),
             ("big", "small", 512), ("big", "ok", 65536)]
    qsd = Qsd()
    c = await AsyncRawClient.connect(qmpd.path)
    try:
        for side, args in adds:
            r = qsd.cmd("blockdev-add", **args) if side == "q" else await send(c, "blockdev-add", **args)
            assert r == {"return": {}}, r
        for node, name, gran in cases:
            want = qsd.cmd("block-dirty-bitmap-add", node=node, name=name, granularity=gran,
                           persistent=True)
            got = await send(c, "block-dirty-bitmap-add", node=node, name=name, granularity=gran,
                             persistent=True)
            assert got == want, (node, name[:8], gran)
        # The texts themselves, as QEMU 7.2 gives them.
        r = qsd.cmd("block-dirty-bitmap-add", node="v2", name="b", persistent=True)
        assert r["error"]["desc"] == ("Can't make bitmap 'b' persistent in 'v2': "
                                      "Cannot store dirty bitmaps in qcow2 v2 files")
        for node in imgs:
            want = qsd.cmd("blockdev-del", **{"node-name": node})
            assert await send(c, "blockdev-del", **{"node-name": node}) == want
    finally:
        qsd.quit()
        await c.close()
    for node in ("v3", "big"):
        infos = [json.loads(sh("qemu-img", "info", "--output=json",
                               str(tmp_path / f"{side}-{node}.qcow2")).stdout)
                 for side in ("q", "m")]
        assert infos[0]["format-specific"]["data"].get("bitmaps") == \
            infos[1]["format-specific"]["data"].get("bitmaps")
        assert sh("qemu-img", "check", str(tmp_path / f"m-{node}.qcow2")).returncode == 0


@pytest.mark.slow
async def test_compressed_backup_packs_as_qemu(qmpd: RunningDaemon, tmp_path: Path) -> None:
    """Clusters that compress to a few KiB share host clusters in both."""
    rng = random.Random(10)
    src = tmp_path / "src.img"
    clusters = []
    for i in range(64):
        kind = i % 4
        if kind == 0:
            clusters.append(bytes(65536))                       # zero: not written
        elif kind == 1:
            clusters.append(rng.randbytes(65536))               # incompressible: plain
        else:
            clusters.append((rng.randbytes(3000 * kind) + bytes(65536))[:65536])
    src.write_bytes(b"".join(clusters))
    dst = {s: tmp_path / f"{s}.qcow2" for s in ("q", "m")}
    for p in dst.values():
        assert sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "4M").returncode == 0
    s_add = {"driver": "raw", "node-name": "s", "file": {"driver": "file", "filename": str(src)}}
    backup = {"job-id": "j", "device": "s", "target": "d", "sync": "full", "compress": True}
    qsd = Qsd()
    try:
        assert qsd.cmd("blockdev-add", **s_add) == {"return": {}}
        assert qsd.cmd("blockdev-add", **blockdev("d", dst["q"])) == {"return": {}}
        assert qsd.cmd("blockdev-backup", **backup) == {"return": {}}
        qsd.until("BLOCK_JOB_COMPLETED")
        qsd.cmd("blockdev-del", **{"node-name": "d"})
    finally:
        qsd.quit()
    c = await AsyncRawClient.connect(qmpd.path)
    assert await send(c, "blockdev-add", **s_add) == {"return": {}}
    assert await send(c, "blockdev-add", **blockdev("d", dst["m"])) == {"return": {}}
    assert await send(c, "blockdev-backup", **backup) == {"return": {}}
    await until(c, "BLOCK_JOB_COMPLETED")
    assert await send(c, "blockdev-del", **{"node-name": "d"}) == {"return": {}}
    await c.close()
    checks = {}
    for s, p in dst.items():
        r = sh("qemu-img", "check", str(p))
        assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout
        alloc, frag, comp = r.stdout.splitlines()[-2].split(", ")
        checks[s] = (alloc, comp, r.stdout.splitlines()[-1])
        r = sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(p))
        assert r.returncode == 0, r.stdout + r.stderr
    # Same allocation, compression and image end as QEMU's image (the
    # fragmentation figure depends on the order the job's requests land).
    assert checks["m"] == checks["q"], checks
    sizes = {s: p.stat().st_size for s, p in dst.items()}
    # Packed: 32 compressed clusters of 6-9 KiB take ~5 host clusters, not 32.
    assert sizes["m"] <= sizes["q"] + 2 * 65536, sizes
