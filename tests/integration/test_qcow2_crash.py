"""kill -9 during allocating writes, zero writes, discards and backups: ``qemu-img
check`` may report leaked clusters (as after a QEMU crash), never
corruption.  The child reports each finished request on stdout; the test
kills it after a random number of them, while later ones are in flight."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_bitmap_crash import Client, Zygote
from tests.support.daemon import short_socket_dir

CHILD = r"""
import asyncio, random, sys
from qmpd.block.graph import BlockGraph
async def main(path, seed):
    g = BlockGraph()
    n = await g.add({"driver": "qcow2", "node-name": "d", "discard": "unmap",
                     "file": {"driver": "file", "filename": path}})
    rng = random.Random(seed)
    size = n.length
    while True:
        off = rng.randrange(0, size - (2 << 20)) & ~511
        op = rng.random()
        if op < 0.6:
            await n.write(off, bytes([rng.randrange(1, 255)]) * rng.randrange(512, 2 << 20, 512))
        elif op < 0.8:
            await n.write_zeroes(off, rng.randrange(65536, 2 << 20, 65536), may_unmap=True)
        else:
            await n.discard(off & ~0xFFFF, rng.randrange(65536, 2 << 20, 65536))
        print("ok", flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=1",
                                  "cluster_size=65536,lazy_refcounts=on"])
def test_kill_during_writes_never_corrupts(tmp_path: Path, opts: str) -> None:
    rng = random.Random(opts)
    img = tmp_path / "crash.qcow2"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for round_ in range(12):
        if round_ % 4 == 0:
            subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", opts, str(img), "64M"],
                           check=True, capture_output=True)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(img), str(round_)],
                                 stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        for _ in range(rng.randrange(1, 40)):
            assert child.stdout.readline() == b"ok\n"
        child.send_signal(signal.SIGKILL)
        child.wait()
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert r.returncode in (0, 3) and "ERROR" not in r.stdout, (round_, r.stdout, r.stderr)


# --- kill -9 of a qmpd daemon during allocating writes and backups --------

KILLS = int(os.environ.get("QMPD_QCOW2_KILLS", "200"))
DSIZE = 16 << 20
#: Counted over the whole run (printed at the end).
STATS = {"kills during backup": 0, "backups completed": 0}


def _img_check(path: Path) -> None:
    """0 corruptions (exit 2 would be corruption); leaked clusters (3) allowed."""
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode in (0, 3) and "ERROR" not in r.stdout, (path.name, r.stdout, r.stderr)


def _bitmap_flags(path: Path) -> dict[str, list[str]]:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                       capture_output=True, text=True, check=True)
    data = json.loads(r.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


async def _qcow2_writer(c: Client, rng: random.Random) -> None:
    while True:
        off = rng.randrange(0, DSIZE // 4096 - 64) * 4096
        length = rng.choice((4096, 65536, 200 * 1024, 1 << 20))
        op = rng.random()
        cmd = (f"write -P {rng.randrange(1, 256)} {off} {length}" if op < 0.6
               else f"write -z -u {off} {length}" if op < 0.8 else f"discard {off} {length}")
        await c.cmd("human-monitor-command", command_line=f'qemu-io d0 "{cmd}"')


async def _qcow2_backup(c: Client, rng: random.Random, target: Path, n: int) -> None:
    compress = rng.random() < 0.4
    if rng.random() < 0.3:
        await c.cmd("drive-backup", device="d0", target=str(target), format="qcow2", mode="existing",
                    sync="full", compress=compress, job_id=f"db{n}")
    else:
        await c.cmd("blockdev-add", driver="qcow2", node_name="t0",
                    file={"driver": "file", "filename": str(target)})
        sync = {"sync": "incremental", "bitmap": "b0"} if rng.random() < 0.5 else {"sync": "full"}
        await c.cmd("blockdev-backup", device="d0", target="t0", compress=compress, job_id=f"bb{n}", **sync)
    await c.event("BLOCK_JOB_COMPLETED")


async def _qcow2_cycle(zyg: Zygote, argv: list[str], pidfile: str, sock: str, disk: Path, target: Path,
                       rng: random.Random, n: int, clean: bool, expect_inconsistent: bool) -> bool:
    """One daemon life; returns whether b0 must come back inconsistent next time."""
    flags = _bitmap_flags(disk)["b0"]
    assert ("in-use" in flags) == expect_inconsistent, (n, flags)  # what QEMU would load
    reply = zyg.ask("spawn", argv, pidfile)
    assert "pid" in reply, reply
    pid = reply["pid"]
    c = await Client.connect(sock)
    node = {"driver": "qcow2", "node-name": "d0", "discard": "unmap",
            "file": {"driver": "file", "filename": str(disk)}}
    await c.cmd("blockdev-add", **node)

    async def b0() -> dict[str, Any]:
        nodes = await c.cmd("query-named-block-nodes")
        bms = next(x["dirty-bitmaps"] for x in nodes if x["node-name"] == "d0")
        assert [b["name"] for b in bms] == ["b0"], (n, bms)
        return dict(bms[0])

    assert (await b0()).get("inconsistent", False) == expect_inconsistent, n
    if expect_inconsistent:  # repair as a user would, stored cleanly by blockdev-del
        await c.cmd("block-dirty-bitmap-remove", node="d0", name="b0")
        await c.cmd("block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
        await c.cmd("blockdev-del", node_name="d0")
        assert "in-use" not in _bitmap_flags(disk)["b0"], n
        await c.cmd("blockdev-add", **node)
        assert "inconsistent" not in await b0(), n
    if rng.random() < 0.5:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(DSIZE)], check=True)
    writers = [c] + [await Client.connect(sock) for _ in range(2)]
    tasks = [asyncio.ensure_future(_qcow2_writer(w, random.Random(rng.random()))) for w in writers[1:]]
    if rng.random() < 0.7:
        tasks.append(asyncio.ensure_future(_qcow2_backup(c, rng, target, n)))
    backup = tasks[2] if len(tasks) == 3 else None
    done, _ = await asyncio.wait(tasks, timeout=rng.uniform(0.0, 0.15))
    for t in done:
        assert t.exception() is None, (n, t.exception())  # a refused command is a failure
    STATS["kills during backup"] += backup is not None and not backup.done() and not clean
    STATS["backups completed"] += backup is not None and backup.done()
    for t in tasks:
        t.cancel()
    if clean:
        await asyncio.gather(*tasks, return_exceptions=True)
        quitter = await Client.connect(sock)
        await quitter.cmd("quit")
        assert zyg.ask("wait", pid)["status"] == 0
        quitter.close()
    else:
        assert zyg.ask("kill", pid)["status"] == -9  # while the requests are still coming
        await asyncio.gather(*tasks, return_exceptions=True)
    for w in writers:
        w.close()
    _img_check(disk)
    _img_check(target)
    return not clean


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_daemon_during_writes_and_backups(tmp_path: Path) -> None:
    """``QMPD_QCOW2_KILLS`` (default 200) kills; every tenth life also ends
    with a clean ``quit`` instead, after which b0 must be consistent."""
    rng = random.Random(int(os.environ.get("QMPD_CRASH_SEED", "10")))
    disk, target = tmp_path / "disk.qcow2", tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(DSIZE)], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {DSIZE // 2}", str(disk)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b0"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(DSIZE)], check=True)
    with short_socket_dir(tmp_path) as sock_dir:
        sock = str(sock_dir / "q.sock")
        zyg = Zygote()
        try:
            t0 = time.perf_counter()
            kills = lives = 0
            inconsistent = False
            while kills < KILLS:
                clean = lives % 10 == 9
                inconsistent = asyncio.run(_qcow2_cycle(
                    zyg, ["--socket", sock], str(tmp_path / "pid"), sock, disk, target, rng, lives,
                    clean, inconsistent))
                kills += not clean
                lives += 1
            assert ("in-use" in _bitmap_flags(disk)["b0"]) == inconsistent
            print(f"\n{kills} kill -9 and {lives - kills} clean quits in {time.perf_counter() - t0:.1f} s, "
                  + ", ".join(f"{k} {v}" for k, v in STATS.items()))
        finally:
            zyg.close()
