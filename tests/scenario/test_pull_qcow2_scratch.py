"""libvirt 9.0's pull-mode backup with a qcow2 scratch overlay (image
fleecing): the scratch is a qcow2 file backed by the disk node, the
``blockdev-backup sync=none`` job copies old data into it before each guest
write, and the scratch node is exported with the backup bitmap.

The sequence is libvirt's (src/qemu/qemu_backup.c): blockdev-add of the
scratch storage, blockdev-create qcow2 + query-jobs/job-dismiss,
blockdev-add of the qcow2 format node with ``backing`` = the disk, a
transaction with the checkpoint and backup bitmaps and the job,
block-export-add, then at the end block-export-del, block-job-cancel
{force}, job-dismiss, nbd-server-stop and blockdev-del x2.  The guest keeps
writing through the disk node while the client reads the export.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.scenario.test_pull_backup import CLUSTER, PROBE, SIZE, clusters, guest_writes
from tests.support.daemon import short_socket_dir
from tests.support.nbd import needs_nbd_clients, NbdDaemon, connect_monitor, daemon_with_disk, have, make_disk, run

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.slow,
    needs_nbd_clients(),
]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[NbdDaemon]:
    with daemon_with_disk(tmp_path, SIZE) as d:
        yield d


def wait_event(env: NbdDaemon, name: str, **data: Any) -> None:
    """Read until the event ``name`` whose data includes ``data`` arrives."""
    def match(e: dict[str, Any]) -> bool:
        return e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in data.items())
    while not any(match(e) for e in env.events):
        msg = env.qmp.read_msg()
        msg.pop("timestamp", None)
        env.events.append(msg)


def scratch_begin(env: NbdDaemon, n: int, bitmaps: list[dict[str, Any]]) -> Path:
    """libvirt's scratch creation and backup transaction for job ``n``;
    :return: the scratch file."""
    path = env.tmp / f"scratch{n}.qcow2"
    path.touch()
    storage, fmt = f"libvirt-{n}-storage", f"libvirt-{n}-format"
    env.ok("blockdev-add", driver="file", filename=str(path), **{"node-name": storage,
           "auto-read-only": True, "discard": "unmap"})
    env.ok("blockdev-create", **{"job-id": f"create-{fmt}"},
           options={"driver": "qcow2", "file": storage, "size": SIZE})
    wait_event(env, "JOB_STATUS_CHANGE", id=f"create-{fmt}", status="concluded")
    jobs = env.ok("query-jobs")
    assert [(j["id"], j["status"]) for j in jobs] == [(f"create-{fmt}", "concluded")]
    env.ok("job-dismiss", id=f"create-{fmt}")
    env.ok("blockdev-add", **{"node-name": fmt, "read-only": False}, driver="qcow2",
           file=storage, backing="drive0")
    env.ok("transaction", actions=bitmaps + [
        {"type": "blockdev-backup", "data": {"device": "drive0", "job-id": f"backup-vda-{fmt}",
                                             "target": fmt, "sync": "none",
                                             "auto-finalize": True, "auto-dismiss": False}}])
    wait_event(env, "JOB_STATUS_CHANGE", id=f"backup-vda-{fmt}", status="running")
    return path


def scratch_end(env: NbdDaemon, n: int, path: Path) -> None:
    """libvirt's teardown: export, job, server, nodes; the scratch file
    then passes ``qemu-img check``."""
    fmt = f"libvirt-{n}-format"
    env.ok("block-export-del", id=f"libvirt-nbd-{fmt}")
    wait_event(env, "BLOCK_EXPORT_DELETED", id=f"libvirt-nbd-{fmt}")
    env.ok("block-job-cancel", device=f"backup-vda-{fmt}", force=True)
    wait_event(env, "JOB_STATUS_CHANGE", id=f"backup-vda-{fmt}", status="concluded")
    assert [j["id"] for j in env.ok("query-jobs")] == [f"backup-vda-{fmt}"]
    env.ok("job-dismiss", id=f"backup-vda-{fmt}")
    env.ok("nbd-server-stop")
    env.ok("blockdev-del", **{"node-name": fmt})
    env.ok("blockdev-del", **{"node-name": f"libvirt-{n}-storage"})
    check = run("qemu-img", "check", "--output=json", "-f", "qcow2", str(path))
    assert json.loads(check.stdout)["check-errors"] == 0
    path.unlink()


def test_libvirt_pull_full_then_incremental_qcow2_scratch(env: NbdDaemon) -> None:
    rng = random.Random(94)
    disk = env.tmp / "disk.img"
    env.add_raw("drive0", disk)

    # Full backup with checkpoint chk1.
    t0 = disk.read_bytes()
    s1 = scratch_begin(env, 4, [
        {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "chk1",
                                                    "persistent": False, "disabled": False}}])
    env.start_server()
    env.ok("block-export-add", type="nbd", id="libvirt-nbd-libvirt-4-format",
           **{"node-name": "libvirt-4-format"}, writable=False, name="vda")
    during = guest_writes(env, "drive0", rng, 20)           # the guest goes on writing
    run("nbdcopy", env.uri("vda"), str(env.tmp / "full.img"))
    assert (env.tmp / "full.img").read_bytes() == t0
    during += guest_writes(env, "drive0", rng, 5)         # before the teardown too
    scratch_end(env, 4, s1)

    # More guest writes; then the incremental of everything since chk1.
    after = guest_writes(env, "drive0", rng, 25)
    t1 = disk.read_bytes()
    s2 = scratch_begin(env, 5, [
        {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "chk2",
                                                    "persistent": False, "disabled": False}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "libvirt-5-format", "name": "backup-vda",
                                                    "persistent": False, "disabled": True,
                                                    "granularity": CLUSTER}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "libvirt-5-format", "target": "backup-vda",
                                                      "bitmaps": [{"node": "drive0", "name": "chk1"}]}}])
    env.start_server()
    env.ok("block-export-add", type="nbd", id="libvirt-nbd-libvirt-5-format",
           **{"node-name": "libvirt-5-format"}, writable=False, name="vda", bitmaps=["backup-vda"])
    guest_writes(env, "drive0", rng, 20)                     # and keeps writing during the pull
    inc = env.tmp / "restored.img"
    shutil.copyfile(env.tmp / "full.img", inc)
    proc = subprocess.run(["/usr/bin/python3", str(PROBE), "pull", env.sock, "vda", "backup-vda", str(inc)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dirty = json.loads(proc.stdout)["dirty"]
    assert dirty == clusters(during + after)
    assert inc.read_bytes() == t1
    scratch_end(env, 5, s2)
    assert disk.read_bytes() != t1


class Recorder(NbdDaemon):
    """qmpd, logging every command and reply of the sequence."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.log: list[tuple[str, dict[str, Any]]] = []

    def q(self, command: str, **arguments: Any) -> dict[str, Any]:
        reply = super().q(command, **arguments)
        self.log.append((command, reply))
        return reply


class Qsd(Recorder):
    """The same interface over qemu-storage-daemon 7.2 (the reference)."""

    def __init__(self, tmp: Path) -> None:  # pylint: disable=super-init-not-called
        self.tmp = tmp
        self.sock = str(tmp / "nbd.sock")
        self.events = []
        self.log = []
        qmp = tmp / "qsd.sock"
        self.qsd = subprocess.Popen(["qemu-storage-daemon", "--chardev",
                                     f"socket,path={qmp},server=on,wait=off,id=m", "--monitor", "chardev=m"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.qmp = connect_monitor(qmp, self.qsd)
        except BaseException:
            self.qsd.kill()
            self.qsd.wait()
            raise

    def close(self) -> None:
        self.qmp.close()
        self.qsd.terminate()
        assert self.qsd.wait(timeout=30) == 0


def libvirt_transcript(peer: Recorder) -> tuple[list[Any], dict[str, list[str]]]:
    """libvirt's full then incremental pull sequence on ``peer`` (no NBD
    client); :return: the (command, reply) list with the directory and the
    export's free-form fields normalised, and each job's status sequence."""
    peer.add_raw("drive0", peer.tmp / "disk.img")
    for n, bitmaps in ((4, [{"type": "block-dirty-bitmap-add",
                             "data": {"node": "drive0", "name": "chk1", "persistent": False,
                                      "disabled": False}}]),
                       (5, [{"type": "block-dirty-bitmap-add",
                             "data": {"node": "drive0", "name": "chk2", "persistent": False,
                                      "disabled": False}},
                            {"type": "block-dirty-bitmap-add",
                             "data": {"node": "libvirt-5-format", "name": "backup-vda", "persistent": False,
                                      "disabled": True, "granularity": CLUSTER}},
                            {"type": "block-dirty-bitmap-merge",
                             "data": {"node": "libvirt-5-format", "target": "backup-vda",
                                      "bitmaps": [{"node": "drive0", "name": "chk1"}]}}])):
        path = scratch_begin(peer, n, bitmaps)
        peer.start_server()
        peer.ok("block-export-add", type="nbd", id=f"libvirt-nbd-libvirt-{n}-format",
                **{"node-name": f"libvirt-{n}-format"}, writable=False, name="vda",
                **({"bitmaps": ["backup-vda"]} if n == 5 else {}))
        peer.ok("query-block-exports")
        scratch_end(peer, n, path)
    peer.ok("block-dirty-bitmap-remove", node="drive0", name="chk1")
    log = json.loads(json.dumps(peer.log).replace(str(peer.tmp), "TEST_DIR"))
    jobs: dict[str, list[str]] = {}
    for e in peer.events:
        if e["event"] == "JOB_STATUS_CHANGE":
            jobs.setdefault(e["data"]["id"], []).append(e["data"]["status"])
    return log, jobs


@pytest.mark.skipif(not have("qemu-storage-daemon"), reason="needs qemu-system-common")
def test_libvirt_pull_sequence_replies_match_qsd(tmp_path: Path) -> None:
    """Every reply of libvirt's pull-mode sequence, and every job's status
    sequence, as qemu-storage-daemon 7.2 gives them for the same sequence."""
    out = []
    for cls in (Qsd, Recorder):
        (tmp_path / cls.__name__).mkdir()
        with short_socket_dir(tmp_path / cls.__name__) as tmp:
            make_disk(tmp / "disk.img", size=SIZE)
            peer = cls(tmp)
            try:
                out.append(libvirt_transcript(peer))
            finally:
                peer.close()
    (ref_log, ref_jobs), (log, jobs) = out
    assert [c for c, _ in log] == [c for c, _ in ref_log]
    for (cmd, want), (_, got) in zip(ref_log, log):
        assert got == want, cmd
    # QEMU drains the graph on the transaction and twice more on block-export-del
    # (the export's BlockBackend leaving the backup target), each showing a
    # transient paused/running pair; qmpd shows them too.
    assert jobs == ref_jobs
    assert undrained(jobs["backup-vda-libvirt-4-format"]) == ["created", "running", "aborting", "concluded", "null"]
    assert jobs["backup-vda-libvirt-4-format"].count("paused") == 3
    assert jobs["create-libvirt-5-format"] == ["created", "running", "waiting", "pending", "concluded", "null"]


def undrained(statuses: list[str]) -> list[str]:
    """``statuses`` without the transient paused/running pairs of drains."""
    out: list[str] = []
    for s in statuses:
        if s == "running" and out[-1:] == ["paused"]:
            out.pop()
        else:
            out.append(s)
    return out
