"""Pull-mode backup end to end, as libvirt 9 and QEMU's tests/image-fleecing
do it with ``snapshot-access`` over ``copy-before-write`` (the qcow2
scratch-overlay variant needs qcow2, which qmpd does not have yet).

The guest keeps writing (through the filter) while the backup client reads
the point-in-time view over NBD; a full backup is then extended by an
incremental made only from the extents the exported bitmap marks dirty,
and the result equals the disk at the incremental's point in time, byte for
byte.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nbd import needs_nbd_clients, MiB, NbdDaemon, daemon_with_disk, run

PROBE = Path(__file__).resolve().parents[1] / "integration" / "libnbd_probe.py"
SIZE = 64 * MiB
CLUSTER = 64 * 1024

pytestmark = [
    pytest.mark.timeout(300),
    needs_nbd_clients(),
]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[NbdDaemon]:
    with daemon_with_disk(tmp_path, SIZE) as d:
        yield d


def guest_writes(env: NbdDaemon, node: str, rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Random writes through ``node``; :return: their (offset, length)."""
    done = []
    for _ in range(count):
        off = rng.randrange(0, SIZE - 300 * 1024) // 512 * 512
        n = rng.randrange(1, 600) * 512
        env.hmp(f'qemu-io {node} "write -P {rng.randrange(1, 255)} {off} {n}"')
        done.append((off, n))
    return done


def clusters(writes: list[tuple[int, int]]) -> list[list[int]]:
    """The dirty extents (64 KiB clusters, merged) that ``writes`` leave."""
    bits = sorted({c for off, n in writes for c in range(off // CLUSTER, (off + n - 1) // CLUSTER + 1)})
    out: list[list[int]] = []
    for c in bits:
        if out and out[-1][0] + out[-1][1] == c * CLUSTER:
            out[-1][1] += CLUSTER
        else:
            out.append([c * CLUSTER, CLUSTER])
    return out


def fleece(env: NbdDaemon, scratch: str) -> None:
    """copy-before-write over the disk into a scratch file, and the
    snapshot-access node exported by libvirt's pull mode."""
    path = env.tmp / f"{scratch}.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    env.add_raw(scratch, path)
    env.ok("blockdev-add", driver="copy-before-write", **{"node-name": f"{scratch}-cbw"},
           file="drive0", target=scratch)
    env.ok("blockdev-add", driver="snapshot-access", **{"node-name": f"{scratch}-snap"},
           file=f"{scratch}-cbw")


def unfleece(env: NbdDaemon, scratch: str) -> None:
    for node in (f"{scratch}-snap", f"{scratch}-cbw", scratch):
        env.ok("blockdev-del", **{"node-name": node})
    (env.tmp / f"{scratch}.img").unlink()


def test_full_then_incremental_pull(env: NbdDaemon) -> None:
    rng = random.Random(11)
    disk = env.tmp / "disk.img"
    env.add_raw("drive0", disk)
    env.start_server()

    # Full backup: checkpoint chk1 and the fleecing filter at the same point.
    t0 = disk.read_bytes()
    fleece(env, "s1")
    env.ok("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "chk1",
                                                    "persistent": False, "disabled": False}}])
    env.ok("block-export-add", type="nbd", id="libvirt-nbd-s1", **{"node-name": "s1-snap"},
           writable=False, name="vda")
    during = guest_writes(env, "s1-cbw", rng, 20)           # the guest goes on writing
    run("nbdcopy", env.uri("vda"), str(env.tmp / "full.img"))
    assert (env.tmp / "full.img").read_bytes() == t0
    env.ok("block-export-del", id="libvirt-nbd-s1")
    unfleece(env, "s1")

    # More guest writes, then the incremental of everything since chk1.
    after = guest_writes(env, "drive0", rng, 25)
    t1 = disk.read_bytes()
    fleece(env, "s2")
    env.ok("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "chk2",
                                                    "persistent": False, "disabled": False}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "s2-snap", "name": "backup-vda",
                                                    "persistent": False, "disabled": True,
                                                    "granularity": CLUSTER}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "s2-snap", "target": "backup-vda",
                                                      "bitmaps": [{"node": "drive0", "name": "chk1"}]}}])
    env.ok("block-export-add", type="nbd", id="libvirt-nbd-s2", **{"node-name": "s2-snap"},
           writable=False, name="vda", bitmaps=["backup-vda"])
    guest_writes(env, "s2-cbw", rng, 20)                     # and keeps writing during the pull
    inc = env.tmp / "restored.img"
    shutil.copyfile(env.tmp / "full.img", inc)
    proc = subprocess.run(["/usr/bin/python3", str(PROBE), "pull", env.sock, "vda", "backup-vda", str(inc)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dirty = json.loads(proc.stdout)["dirty"]
    assert dirty == clusters(during + after)
    assert sum(n for _, n in dirty) < SIZE // 2
    assert inc.read_bytes() == t1
    # qemu-img map with x-dirty-bitmap lists exactly the same extents.
    opts = (f"driver=nbd,export=vda,server.type=unix,server.path={env.sock},"
            "x-dirty-bitmap=qemu:dirty-bitmap:backup-vda")
    extents = json.loads(run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)
    assert [[e["start"], e["length"]] for e in extents if not e["data"]] == dirty
    env.ok("block-export-del", id="libvirt-nbd-s2")
    env.ok("nbd-server-stop")
    unfleece(env, "s2")
    assert [e["event"] for e in env.events].count("BLOCK_EXPORT_DELETED") == 2


def test_image_fleecing_push_from_snapshot(env: NbdDaemon) -> None:
    """tests/image-fleecing's variant: the snapshot-access node is also a
    backup source; the NBD export and a backup job read the same view while
    the guest writes."""
    rng = random.Random(5)
    disk = env.tmp / "disk.img"
    env.add_raw("drive0", disk)
    env.start_server()
    t0 = disk.read_bytes()
    fleece(env, "fl")
    env.ok("block-export-add", type="nbd", id="fl", **{"node-name": "fl-snap"})
    with open(env.tmp / "target.img", "wb") as f:
        f.truncate(SIZE)
    env.add_raw("target", env.tmp / "target.img")
    guest_writes(env, "fl-cbw", rng, 10)
    env.ok("blockdev-backup", device="fl-snap", target="target", sync="full", **{"job-id": "push"})
    guest_writes(env, "fl-cbw", rng, 10)
    while not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in env.events):
        env.events.append(env.qmp.read_msg())
    assert (env.tmp / "target.img").read_bytes() == t0
    run("nbdcopy", env.uri("fl-snap"), str(env.tmp / "pulled.img"))
    assert (env.tmp / "pulled.img").read_bytes() == t0
    assert disk.read_bytes() != t0
