"""What a running backup job shows when an export of one of its nodes
goes away, and when it is then cancelled: the whole message stream
(events and replies, in order) as qemu-storage-daemon 7.2 sends it for
the same commands.

QEMU drains the exported node twice as the export's BlockBackend leaves
it, so a job holding that node or a node above it shows two transient
``paused``/``running`` pairs before ``BLOCK_EXPORT_DELETED``; a
``sync: none`` job, idle until cancelled, ends (``aborting``,
``BLOCK_JOB_CANCELLED``, ``concluded``) before the cancel's reply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.scenario.test_pull_qcow2_scratch import Qsd, Recorder
from tests.support.daemon import short_socket_dir
from tests.support.nbd import have, make_disk, run

pytestmark = [pytest.mark.skipif(not have("qemu-storage-daemon", "qemu-img"), reason="needs QEMU"),
              pytest.mark.timeout(120)]

MiB = 1 << 20


def stream(peer: Recorder, exported: str, *, paused: bool = False) -> list[dict[str, Any]]:
    """The sequence on ``peer`` (``paused``: only job-pause and a forced
    cancel, auto-dismissed); :return: every message after the setup."""
    out: list[dict[str, Any]] = []

    def q(command: str, **arguments: Any) -> dict[str, Any]:
        peer.qmp.send(json.dumps({"execute": command, "arguments": arguments}))
        out.append({"execute": command})
        while True:
            msg = peer.qmp.read_msg()
            msg.pop("timestamp", None)
            out.append(msg)
            if "event" not in msg:
                return msg

    tmp = peer.tmp
    for name, driver, extra in (("f0", "file", {"filename": str(tmp / "disk.img")}),
                                ("drive0", "raw", {"file": "f0"}),
                                ("f1", "file", {"filename": str(tmp / "scratch.qcow2")}),
                                ("scratch", "qcow2", {"file": "f1", "backing": "drive0"}),
                                ("other", "null-co", {})):
        assert "return" in q("blockdev-add", driver=driver, **{"node-name": name}, **extra)
    assert "return" in q("nbd-server-start", addr={"type": "unix", "data": {"path": peer.sock}})
    assert "return" in q("blockdev-backup", device="drive0", target="scratch", sync="none",
                         **{"job-id": "j0", "auto-dismiss": paused})
    del out[:]
    if paused:
        q("job-pause", id="j0")
        q("query-jobs")
        q("block-job-cancel", device="j0", force=True)
        return out
    q("block-export-add", type="nbd", id="e0", **{"node-name": exported})
    q("block-export-del", id="e0")
    q("query-jobs")
    q("block-job-cancel", device="j0", force=True)
    q("job-dismiss", id="j0")
    return out


@pytest.mark.parametrize("exported", ["scratch", "f0", "other"])
def test_stream_matches_qsd(tmp_path: Path, exported: str) -> None:
    got = []
    for cls in (Qsd, Recorder):
        (tmp_path / cls.__name__).mkdir()
        with short_socket_dir(tmp_path / cls.__name__) as tmp:
            make_disk(tmp / "disk.img", size=4 * MiB)
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp / "disk.img"), "-F", "raw",
                str(tmp / "scratch.qcow2"))
            peer = cls(tmp)
            try:
                got.append(stream(peer, exported))
            finally:
                peer.close()
    ref, ours = got
    assert ours == ref
    pauses = [m for m in ours if m.get("data", {}).get("status") == "paused"]
    assert len(pauses) == (0 if exported == "other" else 2)


def test_cancel_of_a_paused_sync_none_job_matches_qsd(tmp_path: Path) -> None:
    """job-pause, then block-job-cancel force: ``running``, ``aborting``,
    ``BLOCK_JOB_CANCELLED``, ``concluded``, ``null``, then the reply."""
    got = []
    for cls in (Qsd, Recorder):
        (tmp_path / cls.__name__).mkdir()
        with short_socket_dir(tmp_path / cls.__name__) as tmp:
            make_disk(tmp / "disk.img", size=4 * MiB)
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp / "disk.img"), "-F", "raw",
                str(tmp / "scratch.qcow2"))
            peer = cls(tmp)
            try:
                got.append(stream(peer, "other", paused=True))
            finally:
                peer.close()
    ref, ours = got
    assert ours == ref
    statuses = [m["data"]["status"] for m in ours if m.get("event") == "JOB_STATUS_CHANGE"]
    assert statuses == ["paused", "running", "aborting", "concluded", "null"]
    assert ours[-1] == {"return": {}} and ours[-2]["data"]["status"] == "null"
