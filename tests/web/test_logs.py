"""INFO log lines for connections, nodes and every job's life; ``--log-format json``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support.daemon import DaemonProcess, RawClient

SIZE = 4 << 20


def test_job_life_in_json_logs(sock_dir: Path, tmp_path: Path) -> None:
    for name in ("d.img", "t.img", "b.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(SIZE)
            if name == "b.img":
                f.write(b"\1" * 65536)
    proc = DaemonProcess(sock_dir, "--log-level", "info", "--log-format", "json")
    try:
        client = RawClient(proc.path)
        ok = {"return": {}, "id": "t"}
        assert client.cmd("blockdev-add", **{"driver": "raw", "node-name": "d", "file": {
            "driver": "file", "filename": str(tmp_path / "d.img")}}) == ok
        assert client.cmd("blockdev-add", **{"driver": "raw", "node-name": "t", "file": {
            "driver": "file", "filename": str(tmp_path / "t.img")}}) == ok
        assert client.cmd("blockdev-add", **{"driver": "raw", "node-name": "bad", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": str(tmp_path / "b.img")},
            "inject-error": [{"event": "read_aio", "errno": 5}]}}) == ok
        assert client.cmd("human-monitor-command", **{"command-line": 'qemu-io d "write 0 1M"'})["return"] == ""
        assert client.cmd("blockdev-backup", device="d", target="t", sync="full", **{"job-id": "good"}) == ok
        while client.read_msg().get("data") != {"id": "good", "status": "null"}:
            pass
        assert client.cmd("blockdev-add", **{"driver": "null-co", "node-name": "n", "size": SIZE}) == ok
        assert client.cmd("blockdev-backup", device="bad", target="n", sync="full", **{"job-id": "failing"}) == ok
        while client.read_msg().get("data") != {"id": "failing", "status": "null"}:
            pass
        assert client.cmd("blockdev-del", **{"node-name": "n"}) == ok
        client.sock.sendall(b'{"execute": "quit"}')
        client.read_line()
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
    assert proc.proc.stderr is not None
    records = [json.loads(line) for line in proc.proc.stderr.read().decode().splitlines()]
    assert {r.keys() == {"time", "level", "logger", "message"} for r in records} == {True}
    info = [(r["logger"], r["message"]) for r in records if r["level"] in ("info", "warning")]
    assert info[0] == ("qmpd.server.daemon", f"listening on {proc.path}")
    assert info[1][0].startswith("qmpd.connection.") and info[1][1] == "client connected"
    messages = [m for _, m in info]
    assert f"node d added (raw, {tmp_path / 'd.img'})" in messages
    assert any(m.startswith("node bad added (raw, json:{") for m in messages)
    good = [m for m in messages if m.startswith("job good")]
    assert good[:2] == ["job good (backup) created", "job good running"]
    assert good[2].startswith(f"job good completed: {SIZE} bytes in ") and good[2].endswith(" MB/s)")
    failing = [m for m in messages if m.startswith("job failing")]
    assert failing[:2] == ["job failing (backup) created", "job failing running"]
    assert failing[2] == "job failing: read error (Input/output error), action report"
    # the holes count as done, the one data cluster failed
    match = re.fullmatch(rf"job failing failed after (\d+) of {SIZE} bytes: Input/output error", failing[3])
    assert match and int(match.group(1)) <= SIZE - 65536
    assert "node n removed" in messages
    assert messages[-1] == "client disconnected" or "client disconnected" in messages


def _execute(client: RawClient, name: str, arguments: dict[str, object]) -> dict[str, object]:
    client.send(json.dumps({"execute": name, "arguments": arguments, "id": "t"}))
    while "event" in (msg := client.read_msg()):
        pass
    return msg


def test_export_changes_logged(sock_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "e.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    nbd_sock = str(sock_dir / "nbd.sock")
    proc = DaemonProcess(sock_dir, "--log-level", "info", "--log-format", "json")
    try:
        client = RawClient(proc.path)
        ok = {"return": {}, "id": "t"}
        assert client.cmd("blockdev-add", **{"driver": "raw", "node-name": "e", "file": {
            "driver": "file", "filename": str(img)}}) == ok
        assert _execute(client, "block-dirty-bitmap-add", {"node": "e", "name": "bm", "disabled": True}) == ok
        assert client.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd_sock}}) == ok
        assert client.cmd("block-export-add", type="nbd", id="x1", **{"node-name": "e"}) == ok
        assert _execute(client, "block-export-add", {"type": "nbd", "id": "x2", "writable": True,
                                               "bitmaps": ["bm"], "name": "two", "node-name": "e"}) == ok
        assert client.cmd("block-export-del", id="x1") == ok
        assert client.cmd("nbd-server-stop") == ok
        client.sock.sendall(b'{"execute": "quit"}')
        client.read_line()
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
    assert proc.proc.stderr is not None
    records = [json.loads(line) for line in proc.proc.stderr.read().decode().splitlines()]
    nbd = [r["message"] for r in records if r["logger"] == "qmpd.nbd.server" and r["level"] == "info"]
    assert nbd == [
        f"NBD server listening on {nbd_sock}",
        "export x1 added (node e, NBD name 'e', read-only)",
        "export x2 added (node e, NBD name 'two', writable, bitmap bm)",
        "export x1 removed",
        "export x2 removed",
        "NBD server stopped",
    ]
